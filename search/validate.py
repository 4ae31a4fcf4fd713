"""Checking a search config before anything runs: models, eval specs, budget, warm start,
device; loading an eval spec (a path or an inline mapping); a run's re-validated config.

Every problem is one MergelabError paragraph naming the config field and what to do.
"""
from __future__ import annotations

from pathlib import Path

from mergelab.errors import MergelabError

from .config import SearchConfig, parse_search_config
from .rundir import RunDir
from .dataflow import build_dataflow_space
from .space import Space, build_merge_space


def build_space(cfg: SearchConfig, base_path: Path | None = None) -> Space:
    """The config's search space: layer paths for a `dataflow:` config (search/dataflow.py),
    else merge coefficients (search/space.py). base_path: the base model's local directory."""
    if cfg.dataflow is not None:
        return build_dataflow_space(cfg, base_path)
    return build_merge_space(cfg, base_path)


def scorer_names(spec_ref: str | dict, base_dir: str | Path = ".") -> list[str]:
    """The scorer names of an eval spec (a multi-objective search's objectives)."""
    return [s.name for s in load_eval_spec(spec_ref, base_dir).scorers]


def load_eval_spec(spec_ref: str | dict, base_dir: str | Path = ".", field: str = "eval"):
    """An EvalSpec from a path or an inline mapping (relative data paths: from base_dir)."""
    from mergelab.eval.spec import EvalSpec

    if isinstance(spec_ref, dict):
        return EvalSpec.from_dict(spec_ref, base_dir=base_dir, source=f"search config `{field}`")
    return EvalSpec.load(spec_ref)


def missing_spec_file(field: str, ref: str | dict | None) -> str | None:
    """The message for a search config's `eval` / `test_eval` path that is not a file, else None."""
    if not isinstance(ref, str) or Path(ref).is_file():
        return None
    if field == "eval":
        what, hint = "eval spec file", "Give the path of an eval spec YAML or an inline spec."
    else:
        what, hint = ("held-out eval spec file",
                      "Give the path of an eval spec YAML, an inline spec, or leave `test_eval` out.")
    return (f"search config `{field}`: the {what} {ref} does not exist (paths are relative to "
            f"{Path.cwd()}). {hint}")


def _same_spec(a: str | dict, b: str | dict) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def validate_config(cfg: SearchConfig, *, check_eval: bool = True, check_warm: bool = True,
                    base_dir: str | Path = ".") -> tuple[SearchConfig, Space]:
    """Everything a search needs, checked before the first trial (raises MergelabError).
    check_warm: read the warm-start recipe (a run that has started keeps its values in the study)."""
    from mergelab.sources import resolve_local_path

    refs = [cfg.base_model, *cfg.models]
    paths = {}
    for field_name, ref in [("base_model", cfg.base_model)] + [(f"models[{i}]", r) for i, r in enumerate(cfg.models)]:
        try:
            p = resolve_local_path(ref)
        except MergelabError as e:
            raise MergelabError(f"search config `{field_name}`: {e}") from None
        if not (p / "config.json").is_file():
            raise MergelabError(
                f"search config `{field_name}`: {ref} has no config.json; point at a model directory "
                "(config.json + *.safetensors) or a hub id."
            )
        paths[ref] = p
    if len(set(refs)) != len(refs):
        raise MergelabError(f"search config: a model is listed twice (base_model + models: {refs}).")
    for problem in (missing_spec_file("eval", cfg.eval), missing_spec_file("test_eval", cfg.test_eval)):
        if problem:
            raise MergelabError(problem)
    if cfg.test_eval is not None and _same_spec(cfg.eval, cfg.test_eval):
        raise MergelabError(
            "search config: `test_eval` is the same eval spec as `eval`, so it would not be held "
            "out: the search would have scored every one of its items. Point `test_eval` at a "
            "separate split (e.g. eval_val.yml for `eval`, eval_test.yml for `test_eval`)."
        )
    if cfg.budget.trials is None and cfg.budget.timeout is None:
        raise MergelabError("search config `budget`: give `trials`, `timeout` (seconds) or both.")
    if check_warm and cfg.warm_start is not None and not Path(cfg.warm_start).is_file():
        raise MergelabError(f"search config `warm_start`: the recipe {cfg.warm_start} does not exist.")
    if cfg.optimizer.name == "nsga2" and cfg.pruner is not None:
        raise MergelabError("search config: `pruner` works with single-objective optimizers, not nsga2.")
    space = build_space(cfg, paths[cfg.base_model])
    if check_eval:
        from mergelab.eval.evaluator import load_data

        load_data(load_eval_spec(cfg.eval, base_dir))  # reads and checks every scorer's data
        if cfg.test_eval is not None:
            load_data(load_eval_spec(cfg.test_eval, base_dir, "test_eval"))
    if check_warm and cfg.warm_start is not None:
        load_warm_start(cfg, space)
    return cfg, space


def load_warm_start(cfg: SearchConfig, space: Space):
    """The config's warm-start recipe, checked: it exists, is a valid recipe and uses one of the
    searched methods (at validation, and again when a run first starts and reads it)."""
    from mergelab.recipe import load_recipe

    if not Path(cfg.warm_start).is_file():
        raise MergelabError(f"search config `warm_start`: the recipe {cfg.warm_start} does not exist.")
    r = load_recipe(cfg.warm_start, f"warm_start recipe {cfg.warm_start}")
    if r.merge_method not in space.methods:
        raise MergelabError(
            f"search config `warm_start`: the recipe uses `{r.merge_method}`, which is not in "
            f"`method` ({', '.join(space.methods)})."
        )
    return r


def check_device(device: str) -> None:
    """The config's device exists here (before a run directory is created for it)."""
    import torch

    from mergelab.engine import resolve_device

    try:
        d = resolve_device(device)
    except MergelabError as e:
        raise MergelabError(f"search config `device`: {e}") from None
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise MergelabError(
            f"search config `device`: {device} is not here: torch sees {torch.cuda.device_count()} "
            "CUDA device(s). Use cuda, cuda:N with a smaller N, cpu or auto."
        )



def worker_devices(device: str, workers: int, gpus: int, share: bool = False) -> list[str]:
    """The device of each of `workers` local worker processes: with a CUDA device, GPU i for
    worker i (at most one worker per GPU unless `share`: then round-robin); otherwise the
    config's device for all of them."""
    if not device.startswith("cuda") and not (device == "auto" and gpus > 0):
        return [device] * workers
    if gpus == 0:
        raise MergelabError(f"--workers {workers} with device {device}: torch sees no CUDA device here. "
                            "Use device cpu, or run on a machine with GPUs.")
    if ":" in device:  # one named GPU: every worker shares it
        if not share:
            raise MergelabError(
                f"--workers {workers} with device {device}: one GPU for {workers} workers. Give device "
                "cuda (each worker its own GPU), or add --share-gpus to run them all on it."
            )
        return [device] * workers
    if workers > gpus and not share:
        raise MergelabError(
            f"--workers {workers} with device {device}: torch sees {gpus} GPU(s), one per worker. Use "
            f"--workers {gpus}, or add --share-gpus to place the workers round-robin on the GPUs."
        )
    return [f"cuda:{i % gpus}" for i in range(workers)]


def config_of(rd: RunDir) -> tuple[SearchConfig, Space]:
    """The run's config with the resolved (absolute) paths, re-validated."""
    res = rd.resolved_run().to_json()  # checked; the config's own keys are re-validated below
    keys = SearchConfig.model_fields.keys()
    cfg = parse_search_config({k: res[k] for k in keys if k in res}, f"resolved config of {rd.path}")
    return validate_config(cfg, check_eval=False, check_warm=False)  # see loop.warm_start_values

