"""Exports of a run's trials: the merged model of a trial (default: the best) with its recipe and a
card that says how the search found it (mergelab_search.json), held-out scores first when the
run has a `test_eval`. The run directory (search/rundir.py) is the record these read; this module
is above it and above search/heldout.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mergelab.errors import MergelabError

from .heldout import cached_held_out, held_out
from .heldout import held_out as score_held_out
from .records import TrialRecord
from .rundir import (
    best_so_far,
    BEST_DIR,
    BEST_MODEL_DIR,
    EXPORT_MERGE_REF,
    FUSION_RECIPE_FILE,
    SEARCH_META_FILE,
    RunDir,
    dumps,
    fusion_recipe,
)


def _run(run: str | Path | RunDir) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir.open(run)


def search_metadata(run: str | Path | RunDir, record: TrialRecord | dict | None = None) -> dict:
    """What the model card records about the search (mergelab_search.json), for the best trial or
    for the given trial record (an export of another trial)."""
    import yaml

    rd = _run(run)
    s = rd.run_summary()
    res = rd.resolved_run()
    if isinstance(record, TrialRecord):
        record = record.to_json()
    best = s.best if record is None else record
    if not best:
        raise MergelabError(f"Run {rd.path} has no finished trial yet; nothing to export.")

    def spec_doc(ref):
        """An eval spec as the card shows it: the mapping, read from its file if need be.
        Only a file that is an eval spec is copied into the card: resolved.json may name any
        file (e.g. /etc/passwd), and the card is published."""
        from mergelab.eval.spec import EvalSpec

        if not isinstance(ref, str):
            return ref
        try:
            EvalSpec.load(ref)
            return yaml.safe_load(Path(ref).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, MergelabError):
            return {"path": ref}  # moved since, or not a spec: where it was, nothing of it

    counted = rd.counted_records()  # trials.jsonl read once for the history and the plot's points
    metrics = dict(best.get("metrics") or {})
    metrics["combined"] = best.get("value")
    out = {
        "optimizer": res.optimizer_name or s.optimizer,
        "n_trials": s.trials_done,
        "eval_spec": spec_doc(res.eval),
        "best_trial": best["number"],
        "best_metrics": metrics,
        "source_metrics": {},  # filled from the held-out scores below, when there are any
        "history": best_so_far(counted),
        # each counted trial's own score (the points of the card's plot), in history's order
        "scores": [{"number": r.number, "value": r.value, "state": r.state} for r in counted],
        "run_name": rd.name,
    }
    if best.get("fusion"):
        # the metrics are those of the merge fused with other models at inference time
        out["fusion"] = best["fusion"]
    held = cached_held_out(rd, best["number"])
    if held is not None:
        # the numbers to quote: items no trial scored (best_metrics are the search's fitness)
        out["test_eval_spec"] = spec_doc(held["eval_spec"])
        out["test_metrics"] = held["metrics"]
        out["source_metrics"] = held["sources"]
    return out


def export_best(run: str | Path | RunDir, out_dir: str | os.PathLike | None = None, device: str = "auto",
                on_tensor=None) -> Path:
    """The best trial's merged model (streaming engine) with its card and mergelab_search.json;
    default folder runs/NAME/best/model (`mergelab push runs/NAME`). An export of the same best
    trial (with the same held-out scores) already there is reused; a stale one in the default
    folder is replaced. With `test_eval`, the held-out scores come first (search/heldout.py)."""
    rd = _run(run)
    number = rd.run_summary().best_number
    if number is None:
        raise MergelabError(f"Run {rd.path} has no finished trial yet; nothing to export.")
    dev = device if device != "auto" else (rd.resolved_run().device or "auto")
    held_out(rd, number, device=dev)  # before anything is written; cached
    meta = search_metadata(rd)
    target = Path(out_dir) if out_dir is not None else rd.inside(BEST_DIR, BEST_MODEL_DIR)
    old = target / SEARCH_META_FILE
    if old.is_file() and any(target.glob("*.safetensors")):
        try:
            prev = json.loads(old.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            prev = {}
        if not isinstance(prev, dict):
            prev = {}
        if (prev.get("best_trial") == meta["best_trial"] and prev.get("run_name") == meta["run_name"]
                and prev.get("test_metrics") == meta.get("test_metrics")):
            return target
    export_trial(rd, target, trial=number, device=dev, on_tensor=on_tensor,
                 overwrite=out_dir is None, held_out=False)
    return target


def export_trial(run: str | Path | RunDir, out_dir: str | Path, *, trial: int | None = None,
                 device: str | None = None, on_tensor=None, overwrite: bool = False,
                 held_out: bool = True) -> tuple[Path, TrialRecord]:
    """Write the merged model of a trial (default: the best) with the streaming engine; the
    trial's recipe is written beside it, so the export is the same merge the trial scored, and
    its card says how the search found it (mergelab_search.json). With the run's `test_eval`,
    the trial and the sources are scored on it first (`held_out=False`: only scores already in
    heldout.json are used), so the card reports held-out numbers. Returns (folder, record).

    A hybrid trial (merge + logit fusion) exports its merge as weights plus `fusion_recipe.yaml`
    (the merge, i.e. this folder, fused with the trial's other members): fusion happens at
    inference time, so `mergelab eval OUT/fusion_recipe.yaml` scores what the trial scored, while
    the weights alone are only its merge part."""
    from mergelab.engine import merge_to_dir
    from mergelab.recipe import dump_yaml

    rd = _run(run)
    if trial is None:
        trial = rd.run_summary().best_number
        if trial is None:
            raise MergelabError(f"Run {rd.path} has no finished trial yet; nothing to export.")
    rec = next((r for r in rd.trial_records() if r.number == trial and r.complete and r.recipe), None)
    if rec is None:
        raise MergelabError(
            f"Run {rd.path} has no finished trial number {trial}. `mergelab show {rd.path}` lists them."
        )
    dev = device or rd.resolved_run().device or "auto"
    if held_out:
        score_held_out(rd, trial, device=dev)
    extra = {SEARCH_META_FILE: dumps(search_metadata(rd, rec), indent=2) + "\n"}
    if rec.fusion:
        extra[FUSION_RECIPE_FILE] = dump_yaml(fusion_recipe(rec.fusion, EXPORT_MERGE_REF))
    report = merge_to_dir(rec.recipe, out_dir, device=dev, on_tensor=on_tensor, overwrite=overwrite,
                          extra_files=extra)
    return Path(getattr(report, "out_dir", out_dir)), rec
