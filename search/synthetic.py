"""Deterministic objectives that need no model: for testing the loop, resume and workers, and
for exercising the dashboard without spending minutes on merges."""
from __future__ import annotations

import time


def sphere(recipe: dict, ctx) -> dict:
    """Higher is better, maximum 0 where every searched number sits at 30% of its range; two
    pseudo-scorers ("a": the first half of the parameters, "b": the rest) for multi-objective
    runs. Reads the candidate's values from ctx.params and its run's parameter ranges."""
    defs = {p["name"]: p for p in ctx.run_dir.resolved_run().params}
    names = sorted(ctx.params)
    half = max(1, len(names) // 2)
    parts = {"a": 0.0, "b": 0.0}
    for i, n in enumerate(names):
        d = defs[n]
        u = (ctx.params[n] - d["low"]) / (d["high"] - d["low"])
        parts["a" if i < half else "b"] -= (u - 0.3) ** 2
    ctx.report(parts["a"], 0)
    ctx.report(parts["a"] + parts["b"], 1)
    return {"combined": parts["a"] + parts["b"], "scores": dict(parts),
            "metrics": {"a/dist2": -parts["a"], "b/dist2": -parts["b"]}}


def slow_sphere(recipe: dict, ctx) -> dict:
    """sphere, 0.3 s per trial: lets a test kill or signal a search in the middle of a trial."""
    time.sleep(0.3)
    return sphere(recipe, ctx)
