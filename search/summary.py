"""summary.json and best/ from trial records: counted one record at a time during a search, or
rebuilt from trials.jsonl when a damaged run is repaired (search/recovery.py)."""
from __future__ import annotations

import math

from .rundir import BEST_MERGE_REF, RunDir, fusion_recipe


def _is_better(rec: dict, best: dict | None) -> bool:
    v = rec.get("value")
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return False
    if best is None or best.get("value") is None:
        return True
    return v > best["value"]


def _pareto(points: list[dict]) -> list[dict]:
    front = []
    for p in points:
        dominated = False
        for q in points:
            if q is p:
                continue
            if all(a >= b for a, b in zip(q["values"], p["values"])) and any(
                a > b for a, b in zip(q["values"], p["values"])
            ):
                dominated = True
                break
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["number"])


def update_summary(rd: RunDir, rec: dict, log) -> None:
    """Count one trial record into summary.json (and best/ when it is the new best)."""
    from mergelab.recipe import dump_yaml

    improved = {}

    def fn(s: dict) -> None:
        if rec["state"] == "COMPLETE":
            s["trials_complete"] = s.get("trials_complete", 0) + 1
        elif rec["state"] == "PRUNED":
            s["trials_pruned"] = s.get("trials_pruned", 0) + 1
        else:
            s["trials_failed"] = s.get("trials_failed", 0) + 1
        if not rec.get("interrupted"):
            s["trials_done"] = s.get("trials_done", 0) + 1
        if rec["state"] == "COMPLETE" and _is_better(rec, s.get("best")):
            s["best"] = {k: rec.get(k) for k in ("number", "value", "values", "metrics", "scores", "params")}
            if rec.get("fusion"):
                s["best"]["fusion"] = rec["fusion"]
            improved["yes"] = True
        if rec.get("values") and rec["state"] == "COMPLETE":
            pts = list(s.get("pareto") or []) + [{"number": rec["number"], "values": rec["values"], "params": rec["params"]}]
            s["pareto"] = _pareto(pts)

    with rd.locked():
        s = rd.summary()
        fn(s)
        if improved:
            fusion = dump_yaml(fusion_recipe(rec["fusion"], BEST_MERGE_REF)) if rec.get("fusion") else None
            rd.write_best(dump_yaml(rec["recipe"]), rec, fusion)
        rd.write_summary(s)
    if improved:
        log(f"new best: trial {rec['number']} score {rec['value']:.6g}")


def rebuild_summary(rd: RunDir, log) -> None:
    """Counts, best and Pareto front recomputed from trials.jsonl (one line per trial number)."""
    with rd.locked():
        s = rd.summary()
        s.update(trials_done=0, trials_complete=0, trials_failed=0, trials_pruned=0, best=None, pareto=[])
        rd.write_summary(s)
    for rec in sorted(rd.trial_records(), key=lambda r: r.number):
        update_summary(rd, rec.to_json(), lambda m: None)
    log(f"summary rebuilt from trials.jsonl: {rd.run_summary().trials_done} trials counted")
