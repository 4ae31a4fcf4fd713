"""The trial objective: what a trial gets besides its recipe (TrialContext), what it returns
(Outcome), and the real one, which merges in memory (TrialMerger) and scores with the Evaluator.

A test or benchmark passes its own objective (e.g. search/synthetic.py) to search.loop.run_search.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import optuna

from .config import SearchConfig
from .rundir import RunDir
from .validate import load_eval_spec


@dataclass
class TrialContext:
    """What an objective gets besides the recipe."""

    number: int
    params: dict[str, float]
    device: str
    run_dir: RunDir
    trial: optuna.trial.Trial | None = None
    pruning: bool = False
    log: Callable[[str], None] = print
    progress: Callable[[str, float], None] | None = None  # (stage, fraction) for a UI
    fusion: dict | None = None  # a hybrid candidate's fusion (Space.fusion_of), else None

    def report(self, value: float, step: int) -> None:
        """Intermediate value (e.g. after each scorer); raises optuna.TrialPruned when pruned."""
        if self.trial is None or not self.pruning:
            return
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")


class EvalResultLike(Protocol):
    combined: float
    scores: dict
    metrics: dict


Objective = Callable[[dict, TrialContext], Any]


@dataclass
class Outcome:
    combined: float
    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    merge_s: float | None = None
    eval_s: float | None = None
    device: str | None = None  # where the trial merged (TrialMerger.last_stats), else the config's
    kernels: dict[str, int] | None = None  # merge kernels used, by name -> tensors (last_stats)


def outcome(res: Any) -> Outcome:
    """An objective's return value (Outcome, a number, a mapping, an EvalResult) as an Outcome."""
    if isinstance(res, Outcome):
        return res
    if isinstance(res, (int, float)):
        return Outcome(float(res))
    if isinstance(res, dict):
        return Outcome(float(res["combined"]), dict(res.get("scores", {})), dict(res.get("metrics", {})),
                       res.get("merge_s"), res.get("eval_s"))
    return Outcome(float(res.combined), dict(getattr(res, "scores", {}) or {}),
                   dict(getattr(res, "metrics", {}) or {}), getattr(res, "merge_s", None),
                   getattr(res, "eval_s", None))


def candidate_model(model, tokenizer, fusion: dict | None, members: dict[str, tuple[Any, Any]], device):
    """What a trial scores: the merged model itself, or (hybrid candidate) its logit fusion with
    the trial's other members, loaded once into `members` (ref -> (model, tokenizer))."""
    from mergelab.eval.models import HFLogitModel

    if fusion is None:
        return HFLogitModel(model, tokenizer)
    from mergelab.fusion import FusedLogitModel, load_models

    todo = [m for m in fusion["members"] if m != "merge" and m not in members]
    if todo:
        loaded, toks = load_models(todo, device=device)
        members.update({ref: (m, t) for ref, m, t in zip(todo, loaded, toks)})
    chosen = [(model, tokenizer) if m == "merge" else members[m] for m in fusion["members"]]
    return FusedLogitModel([m for m, _ in chosen], fusion["weighting"], fusion["tau"],
                           fusion["grid_step"], tokenizers=[t for _, t in chosen],
                           names=[Path(m).name or m for m in fusion["members"]])


def real_objective(rd: RunDir, cfg: SearchConfig) -> Objective:
    """Merge in memory with TrialMerger, score with the Evaluator.

    Built once per search process: the sources are read once (TrialMerger caches them on the
    device) and the eval data is read and tokenized once (Evaluator); a trial then costs the
    operator calls for the tensors whose parameters changed plus the forward passes.
    Intermediate values for a pruner: after every eval batch, the combined score so far (the
    spec's combine rule over the finished scorers' scores and the running score of the current
    one), at a step counting batches over all scorers, so every trial reports the same steps in
    the same order.
    """
    from mergelab.eval.evaluator import Evaluator, combine
    from mergelab.trial import TrialMerger

    spec = load_eval_spec(cfg.eval, rd.resolved_run().base_dir)
    tm = TrialMerger(cfg.base_model, cfg.models, device=cfg.device)
    ev = Evaluator(spec, tm.tokenizer, tm.device)
    weights = {s.name: float(s.weight) for s in ev.scorers}
    n_batches = sum(len(getattr(s, "batches", None) or [None]) for s in ev.scorers)
    members: dict[str, tuple[Any, Any]] = {}  # fusion members other than the merge, loaded once

    def scored(model, fusion: dict | None):
        return candidate_model(model, tm.tokenizer, fusion, members, tm.device)

    first = [True]

    def objective(recipe: dict, ctx: TrialContext) -> Outcome:
        t0 = time.perf_counter()
        if ctx.progress:
            # the first trial of a process reads every source onto the device: say so, it is the
            # long one
            ctx.progress("caching sources" if first[0] else "merge", 0.0)
        first[0] = False
        model = tm.apply(recipe)
        t1 = time.perf_counter()
        done: dict[str, float] = {}  # scorer -> running score (the last one is final)
        step = [0]

        def report(scorer: str, _batch: int, running: float) -> None:
            done[scorer] = float(running)
            if ctx.progress:
                ctx.progress(f"eval {scorer}", min(1.0, (step[0] + 1) / max(1, n_batches)))
            ctx.report(combine(done, weights, spec.combine), step[0])
            step[0] += 1

        res = ev.evaluate(scored(model, ctx.fusion), report=report)
        t2 = time.perf_counter()
        out = outcome(res)
        out.merge_s, out.eval_s = t1 - t0, t2 - t1
        # read with getattr: older TrialMergers have no last_stats / no kernels in it
        stats = getattr(tm, "last_stats", None)
        out.device = str(getattr(stats, "device", None) or tm.device)
        kernels = getattr(stats, "kernels", None)
        out.kernels = dict(kernels) if kernels else None
        return out

    return objective

