"""Held-out scores of a search: the best trial and the source models on the `test_eval` spec.

The search's fitness is its `eval` spec (a validation split); the number a user should quote is
the same merge on items no trial ever scored. They are computed once per (spec, trial) and kept
in the run directory (heldout.json), so export, push and `mergelab show` agree and reuse them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from mergelab.errors import MergelabError

from .objective import candidate_model
from .records import ResolvedRun
from .rundir import RunDir, atomic_write_bytes
from .validate import load_eval_spec

HELDOUT_FILE = "heldout.json"


def _spec_key(ref: str | dict) -> str:
    """Identity of the held-out spec: its text (a file) or its mapping, so an edit invalidates."""
    if isinstance(ref, dict):
        data = json.dumps(ref, sort_keys=True).encode()
    else:
        try:
            data = Path(ref).read_bytes()
        except OSError as e:
            raise MergelabError(
                f"The run's held-out eval spec `test_eval` ({ref}) cannot be read: {e}. Restore the "
                "file, or score the export yourself with `mergelab eval MODEL --eval SPEC`."
            ) from None
    return hashlib.sha256(data).hexdigest()[:16]


def _flat(result) -> dict[str, float]:
    out = {k: float(v) for k, v in result.metrics.items()}
    out["combined"] = float(result.combined)
    return out


def _read_cache(rd: RunDir, key: str) -> dict:
    p = rd.path / HELDOUT_FILE
    try:
        cache = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"spec_key": key, "sources": {}, "trials": {}}
    if cache.get("spec_key") != key:  # the spec changed since: nothing cached is valid
        return {"spec_key": key, "sources": {}, "trials": {}}
    return cache


def _trial_or_best(rd: RunDir, trial: int | None) -> int | None:
    if trial is not None:
        return trial
    return rd.run_summary().best_number


def cached_held_out(rd: RunDir, trial: int | None = None) -> dict | None:
    """The held-out scores already computed for `trial` (default: the best), else None."""
    res = rd.resolved_run()
    ref = res.test_eval
    if ref is None:
        return None
    trial = _trial_or_best(rd, trial)
    if trial is None:
        return None
    try:
        cache = _read_cache(rd, _spec_key(ref))
    except MergelabError:
        return None
    if str(trial) not in cache["trials"]:
        return None
    return _answer(res, cache, trial)


def _answer(res: ResolvedRun, cache: dict, trial: int) -> dict:
    refs = [res.base_model, *res.models]
    return {"trial": trial, "metrics": cache["trials"][str(trial)],
            "sources": {r: cache["sources"][r] for r in refs if r in cache["sources"]},
            "eval_spec": res.test_eval}


def _load_source(ref: str, dtype, device):
    """A source model as the search knew it: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    from mergelab.sources import resolve_local_path

    path = resolve_local_path(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=False, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise MergelabError(
            f"Could not load the source model {ref} ({path}) with transformers for the held-out "
            f"eval: {e}. Check that the directory still holds its config.json and safetensors."
        ) from None
    return model.to(device).eval()


def held_out(rd: RunDir, trial: int | None = None, device: str | None = None,
             log: Callable[[str], None] | None = None) -> dict | None:
    """Score `trial` (default: the best) and every source model on the run's `test_eval` spec.

    Returns {"trial", "metrics", "sources": {ref: metrics}, "eval_spec"} (metrics carry every
    scorer metric plus "combined"), or None when the run has no `test_eval`. Scores already in
    heldout.json for the same spec text are reused; each new one is saved as soon as it exists.
    """
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.models import HFLogitModel
    from mergelab.trial import TrialMerger

    res = rd.resolved_run()
    ref = res.test_eval
    if ref is None:
        return None
    trial = _trial_or_best(rd, trial)
    if trial is None:
        raise MergelabError(f"Run {rd.path} has no finished trial yet; there is nothing to score on held-out data.")
    cache = _read_cache(rd, _spec_key(ref))
    todo = [r for r in [res.base_model, *res.models] if r not in cache["sources"]]
    if todo or str(trial) not in cache["trials"]:
        rec = next((r for r in rd.trial_records() if r.number == trial and r.complete and r.recipe), None)
        if rec is None:
            raise MergelabError(
                f"Run {rd.path} has no finished trial number {trial} with a recipe. `mergelab show {rd.path}` lists them."
            )
        spec = load_eval_spec(ref, res.base_dir, "test_eval")
        dev = device or res.device or "auto"
        say = log or (lambda _m: None)

        def save() -> None:
            atomic_write_bytes(rd.inside(HELDOUT_FILE), (json.dumps(cache, indent=2) + "\n").encode())

        # the tokenizer and dtype the search scored with (the merge's reference model's)
        tm = TrialMerger(res.base_model, res.models, device=dev)
        ev = Evaluator(spec, tm.tokenizer, tm.device)
        for src in todo:
            say(f"held-out eval: source {src}")
            model = _load_source(src, tm.model_dtype, tm.device)
            cache["sources"][src] = _flat(ev.evaluate(HFLogitModel(model, tm.tokenizer)))
            del model
            save()
        if str(trial) not in cache["trials"]:
            say(f"held-out eval: trial {trial}")
            model = tm.apply(rec.recipe)
            scored = candidate_model(model, tm.tokenizer, rec.fusion, {}, tm.device)
            cache["trials"][str(trial)] = _flat(ev.evaluate(scored))
            save()
    return _answer(res, cache, trial)


def held_out_table(h: dict) -> str:
    """Plain-text table: the trial and each source, combined score then every metric."""
    metrics = ["combined"] + [k for k in h["metrics"] if k != "combined"]
    rows = [[f"trial {h['trial']}"] + [h["metrics"].get(m) for m in metrics]]
    rows += [[Path(r).name or r] + [v.get(m) for m in metrics] for r, v in h["sources"].items()]
    width = max(12, *(len(r[0]) for r in rows))
    head = f"{'':{width}} " + " ".join(f"{m:>16}" for m in metrics)
    lines = [head] + [f"{r[0]:{width}} " + " ".join(
        f"{v:16.6g}" if isinstance(v, (int, float)) else f"{'-':>16}" for v in r[1:]) for r in rows]
    return "\n".join(lines)
