"""The trial loop: ask -> candidate recipe -> objective -> tell -> trials.jsonl -> best/summary.

`prepare_run` validates a config and creates the run directory; `run_search` runs (or resumes,
or joins as a worker) until the budget is met; `SearchController` steers it from a UI.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import TrialState

from mergelab.errors import MergelabError

from .config import SearchConfig, load_search_config, parse_search_config
from .optimizers import (
    ABANDONED_ATTR,
    INTERRUPTED_ATTR,
    RETRY_ATTR,
    counted,
    make_sampler,
    n_counted,
)
from .rundir import (
    EXPORT_MERGE_REF,
    FUSION_RECIPE_FILE,
    SEARCH_META_FILE,
    HEARTBEAT_S,
    STALE_AFTER_S,
    RunDir,
    dumps,
    fusion_recipe,
    worker_id,
)
from .pycma_sampler import SLOT_ATTR, PycmaSampler
from .space import Space, build_space
from .recovery import (
    check_identity,
    check_storage_present,
    config_hash,
    load_study_checked,
    repair_trials,
    stamp_study,
)
from .summary import rebuild_summary, update_summary

STUDY_NAME = "mergelab"
FAIL_FAST = 3  # a session whose first this-many trials fail for one reason stops with that reason
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the run cannot be written: stop, keep it
STORAGE_ENV = "MERGELAB_STORAGE"  # the full storage URL (with password) for resume / workers
RECORD_ATTR = "mergelab_record"
optuna.logging.set_verbosity(optuna.logging.WARNING)


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


def _outcome(res: Any) -> Outcome:
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


# -- versions / resolved config ---------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("mergelab", "torch", "transformers", "optuna", "cmaes", "cma"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is recorded as absent, not an error
            out[mod] = None
    return out


def _abs_ref(ref: str) -> str:
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def _scorer_names(spec_ref: str | dict, base_dir: str | Path = ".") -> list[str]:
    return [s.name for s in _load_eval_spec(spec_ref, base_dir).scorers]


def _load_eval_spec(spec_ref: str | dict, base_dir: str | Path = ".", field: str = "eval"):
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


def validate_config(cfg: SearchConfig, *, check_eval: bool = True,
                    base_dir: str | Path = ".") -> tuple[SearchConfig, Space]:
    """Everything a search needs, checked before the first trial (raises MergelabError)."""
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
    if cfg.warm_start is not None and not Path(cfg.warm_start).is_file():
        raise MergelabError(f"search config `warm_start`: the recipe {cfg.warm_start} does not exist.")
    if cfg.optimizer.name == "nsga2" and cfg.pruner is not None:
        raise MergelabError("search config: `pruner` works with single-objective optimizers, not nsga2.")
    space = build_space(cfg, paths[cfg.base_model])
    if check_eval:
        from mergelab.eval.evaluator import load_data

        load_data(_load_eval_spec(cfg.eval, base_dir))  # reads and checks every scorer's data
        if cfg.test_eval is not None:
            load_data(_load_eval_spec(cfg.test_eval, base_dir, "test_eval"))
    if cfg.warm_start is not None:
        from mergelab.recipe import load_recipe

        r = load_recipe(cfg.warm_start, f"warm_start recipe {cfg.warm_start}")
        if r.merge_method not in space.methods:
            raise MergelabError(
                f"search config `warm_start`: the recipe uses `{r.merge_method}`, which is not in "
                f"`method` ({', '.join(space.methods)})."
            )
    return cfg, space


def resolved_config(cfg: SearchConfig, space: Space, storage: str | None, objective_names: list[str],
                    run_name: str = "") -> dict:
    d = cfg.model_dump(mode="json")
    d["base_model"] = _abs_ref(cfg.base_model)
    d["models"] = [_abs_ref(r) for r in cfg.models]
    d["model_space"] = {_abs_ref(k): v for k, v in cfg.model_space.items()}
    if isinstance(cfg.eval, str):
        d["eval"] = str(Path(cfg.eval).resolve())
    if isinstance(cfg.test_eval, str):
        d["test_eval"] = str(Path(cfg.test_eval).resolve())
    if cfg.warm_start:
        d["warm_start"] = str(Path(cfg.warm_start).resolve())
    multi = cfg.optimizer.name == "nsga2"
    d.update(
        optimizer=cfg.optimizer.model_dump(mode="json"),
        storage=storage,
        # in a shared storage the study is named after the run, so that every worker (they all
        # pass the same --run NAME) finds it and other runs in the same database stay apart
        study_name=(run_name or STUDY_NAME) if storage is None else f"{STUDY_NAME}-{run_name}",
        num_layers=space.num_layers,
        params=space.describe(),
        objective_names=objective_names if multi else ["combined"],
        directions=["maximize"] * (len(objective_names) if multi else 1),
        versions=_versions(),
        created=time.time(),
        cwd=str(Path.cwd()),
    )
    return d


def _open_storage(url: str, heartbeat: bool):
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        kw = {"heartbeat_interval": 5, "grace_period": 20} if heartbeat and not url.startswith("sqlite") else {}
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except Exception as e:  # connection errors come from many drivers
            raise MergelabError(
                f"Cannot open the study storage {url.split('@')[-1]}: {type(e).__name__}: {e}. Check the "
                "URL (postgresql+psycopg2://user:password@host/db, mysql+pymysql://..., sqlite:///path, "
                "journal:PATH) and that the server is running."
            ) from None
    raise MergelabError(
        f"--storage {url!r} is not a storage URL. Use postgresql+psycopg2://user:password@host/db, "
        "mysql+pymysql://user:password@host/db, sqlite:///PATH or journal:PATH."
    )


def public_url(url: str | None) -> str | None:
    """A storage URL without its password: what the run directory keeps (it is shared and read
    by anyone; the password comes from --storage or MERGELAB_STORAGE on resume)."""
    if url is None or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def storage_of(rd: RunDir, given: str | None = None) -> str:
    """The URL to open a run's storage with: `given` (--storage) or $MERGELAB_STORAGE when they
    name the run's storage (with a password the run directory does not keep), else the run's."""
    stored = rd.storage_url()
    given = given or os.environ.get(STORAGE_ENV)
    if given and given.startswith("journal:"):
        given = "journal:" + str(Path(given[len("journal:"):]).resolve())
    if not given or given == stored:
        return stored
    if public_url(given) != stored:
        raise MergelabError(
            f"The storage given ({public_url(given)}, from --storage or ${STORAGE_ENV}) is not the "
            f"storage of run {rd.path} ({stored}). Give that run's URL (with its password), or unset "
            f"${STORAGE_ENV}."
        )
    return given


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


def describe_study(study: optuna.Study, rd: RunDir, space: Space) -> None:
    """What an Optuna user (optuna-dashboard, optuna.load_study) needs to read the study without
    mergelab: its metric names, the run it belongs to, and each parameter's meaning."""
    from .labels import layer_span, param_labels

    res = rd.resolved()
    with warnings.catch_warnings():  # experimental in Optuna 3.2-5.x, and the API optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(res["objective_names"]))
    labels = param_labels(space)
    study.set_user_attr("mergelab_run", rd.name)
    study.set_user_attr("mergelab_base_model", res["base_model"])
    study.set_user_attr("mergelab_models", list(res["models"]))
    study.set_user_attr("mergelab_params", {
        p.name: {"label": labels.get(p.name, p.name), "kind": p.kind, "parameter": p.param,
                 "model": (space.models[p.model] if p.model is not None and 0 <= p.model < len(space.models)
                           else p.model),  # a data-flow slot may index the PS model, past the sources
                 "layers": (list(layer_span(p.group, space.num_layers, space.layer_groups) or []) or None
                            if p.group is not None else None),
                 "filter": p.filter, "low": p.low, "high": p.high}
        for p in space.params})


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


def prepare_run(config_path: str | Path, run: str | Path | None = None, *, storage: str | None = None,
                device: str | None = None, runs_dir: str | Path = "runs",
                objective_names: list[str] | None = None) -> RunDir:
    """Validate a search config and create its run directory (no trial runs here)."""
    cfg, text = load_search_config(config_path)
    given = cfg.model_dump(mode="json")  # the config as written (recovery compares edits with it)
    if device:
        cfg.device = device
    base_dir = Path(config_path).parent.resolve()
    cfg, space = validate_config(cfg, base_dir=base_dir)
    check_device(cfg.device)
    if objective_names is None:
        objective_names = _scorer_names(cfg.eval, base_dir) if cfg.optimizer.name == "nsga2" else ["combined"]
    if run is None:
        run = Path(runs_dir) / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(run)
    if storage is not None and storage.startswith("journal:"):
        storage = "journal:" + str(Path(storage[len("journal:"):]).resolve())
    if storage is not None and RunDir.is_run_dir(run):
        # a worker joining a run created by another process on this machine (shared storage)
        return RunDir.open(run)
    # everything that can be refused is refused before the run directory exists, so a refused
    # search leaves nothing behind that blocks its --run name
    st = _open_storage(storage, heartbeat=False) if storage is not None else None
    RunDir.check_new(run)
    resolved = resolved_config(cfg, space, public_url(storage), objective_names, run.name)
    resolved["eval_base_dir"] = str(base_dir)
    resolved["config_sha256"] = config_hash(text)
    resolved["given"] = given
    rd = RunDir.create(run, text, resolved)
    try:
        if st is None:
            st = _open_storage(rd.storage_url(), heartbeat=False)
        directions = ["maximize"] * len(resolved["directions"])
        study = optuna.create_study(storage=st, study_name=rd.study_name(), directions=directions,
                                    load_if_exists=True)
        describe_study(study, rd, space)
        stamp_study(study, resolved)
    except BaseException:
        shutil.rmtree(rd.path, ignore_errors=True)
        raise
    rd.log(f"created run {rd.path} ({cfg.optimizer.name}, {space.size_text()}, storage {rd.storage_url().split('@')[-1]})")
    return rd


def config_of(rd: RunDir) -> tuple[SearchConfig, Space]:
    """The run's config with the resolved (absolute) paths, re-validated."""
    res = rd.resolved()
    keys = SearchConfig.model_fields.keys()
    cfg = parse_search_config({k: res[k] for k in keys if k in res}, f"resolved config of {rd.path}")
    return validate_config(cfg, check_eval=False)


# -- control -------------------------------------------------------------------------------------
class SearchController:
    """Pause / resume / stop a search between trials. Goes through the run directory's control
    file, so it works the same for a search in this process and one in another process."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.stop_event = threading.Event()

    def pause(self) -> None:
        self.run_dir.request("pause")

    def resume(self) -> None:
        self.run_dir.request("resume")

    def stop(self) -> None:
        self.stop_event.set()
        self.run_dir.request("stop")


# -- the real objective ------------------------------------------------------------------------
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
    finished scorers' weighted scores plus the running score of the current one), at a step
    counting batches over all scorers, so every trial reports the same steps in the same order.
    """
    from mergelab.eval.evaluator import Evaluator
    from mergelab.trial import TrialMerger

    spec = _load_eval_spec(cfg.eval, rd.resolved().get("eval_base_dir", "."))
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
        done: dict[str, float] = {}  # scorer -> weighted running score (the last one is final)
        step = [0]

        def report(scorer: str, _batch: int, running: float) -> None:
            done[scorer] = weights.get(scorer, 1.0) * float(running)
            if ctx.progress:
                ctx.progress(f"eval {scorer}", min(1.0, (step[0] + 1) / max(1, n_batches)))
            ctx.report(sum(done.values()), step[0])
            step[0] += 1

        res = ev.evaluate(scored(model, ctx.fusion), report=report)
        t2 = time.perf_counter()
        out = _outcome(res)
        out.merge_s, out.eval_s = t1 - t0, t2 - t1
        # read with getattr: older TrialMergers have no last_stats / no kernels in it
        stats = getattr(tm, "last_stats", None)
        out.device = str(getattr(stats, "device", None) or tm.device)
        kernels = getattr(stats, "kernels", None)
        out.kernels = dict(kernels) if kernels else None
        return out

    return objective


# -- the loop ------------------------------------------------------------------------------------
class _Signals:
    def __init__(self):
        self.stop = False
        self.count = 0
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.stop = True
        self.count += 1
        if self.count >= 2 and signum == signal.SIGINT:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _mark_interrupted(study: optuna.Study, rd: RunDir, numbers_alive: Callable[[optuna.trial.FrozenTrial], bool],
                      log: Callable[[str], None], retry: bool, n_params: int) -> None:
    """RUNNING trials whose process is gone -> FAIL (interrupted); then make sure every
    interrupted trial has a re-try queued (idempotent, so a crash here is harmless)."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if numbers_alive(t) and not t.user_attrs.get(INTERRUPTED_ATTR):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first (or it just finished)
        rec = {"number": t.number, "state": "FAIL", "params": t.params, "recipe": None, "value": None,
               "values": None, "metrics": {}, "scores": {}, "error": "interrupted: the search process died",
               "interrupted": True, "retry_of": t.user_attrs.get(RETRY_ATTR), "timings": {},
               "started": t.datetime_start.timestamp() if t.datetime_start else None,
               "finished": time.time(), "device": t.user_attrs.get("device"), "worker": t.user_attrs.get("worker")}
        rd.append_trial(rec)
        log(f"trial {t.number} was running when its process died: marked failed, will be re-tried")
    if not retry:
        return
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    for t in trials:
        # Only a trial that had drawn every parameter is re-tried with them: one killed inside
        # suggest_* holds some of them, and fixing those would shift the sampler's random draws
        # for the rest. The samplers are reseeded from the count of finished trials, so the next
        # ask draws the same point again anyway.
        if (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR) and t.number not in retried
                and t.params and len(t.params) == n_params):
            study.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number}, skip_if_exists=False)


def _heartbeat_on(storage) -> bool:
    """Does this storage keep trial heartbeats (an RDB storage opened with heartbeat_interval)?
    Asked through the storage's own methods, not Optuna's private heartbeat module."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(getattr(storage, "record_heartbeat", None)) and callable(interval) and interval() is not None


def _fail_stale(study: optuna.Study, log) -> None:
    """RUNNING trials whose storage heartbeat stopped (a worker on any machine died) -> marked
    interrupted, so _mark_interrupted records them and queues their re-try."""
    storage = study._storage
    if not _heartbeat_on(storage):
        return
    for tid in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(tid, INTERRUPTED_ATTR, True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished (or failed by another worker) meanwhile
        log(f"trial id {tid}: its worker's storage heartbeat stopped")


def _n_counted_records(rd: RunDir) -> int:
    return sum(1 for r in rd.trials() if not r.get("interrupted"))


def _reconcile_jsonl(study: optuna.Study, rd: RunDir, log) -> None:
    """A trial told to the storage whose line never reached trials.jsonl (killed in between)."""
    have = {r.get("number") for r in rd.trials()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.number in have:
            continue
        rec = t.user_attrs.get(RECORD_ATTR)
        if rec is None:
            continue
        rec = json.loads(rec)
        rd.append_trial(rec)
        update_summary(rd, rec, log)
        log(f"trial {t.number}: restored its trials.jsonl line from the study")


@dataclass
class SearchResult:
    status: str
    detail: str
    trials_done: int
    best: dict | None


def run_search(run: str | Path | RunDir, objective: Objective | None = None, *, worker: bool = False,
               controller: SearchController | None = None, log: Callable[[str], None] | None = None,
               progress: Callable[[dict], None] | None = None, install_signals: bool = True,
               max_trials_this_session: int | None = None, storage: str | None = None,
               device: str | None = None) -> SearchResult:
    """Run (or resume) the search of a run directory until its budget is met.

    worker=True joins a search other processes run on the same shared storage (no exclusive
    claim; stale trials of dead workers are failed and re-tried). `progress` receives events
    ({"event": "trial_start"|"trial_end"|"stage", ...}) for a UI. `max_trials_this_session`
    stops after that many trials (tests use it to simulate interruptions). `storage`: the run's
    storage URL with its password (else $MERGELAB_STORAGE, else the password-free one it keeps);
    `device`: this process's device instead of the run's (a --workers N worker's own GPU).
    """
    rd = run if isinstance(run, RunDir) else RunDir.open(run)
    # One process searches a run (workers of a shared storage coordinate through the storage):
    # taken before anything is read, so two `resume` started together cannot both recover it.
    claim = None if worker else rd.claim()
    try:
        return _run_search(rd, objective, worker=worker, controller=controller, log=log, progress=progress,
                           install_signals=install_signals, max_trials_this_session=max_trials_this_session,
                           storage_url=storage_of(rd, storage), device=device)
    finally:
        if claim is not None:
            claim.release()


def _run_search(rd: RunDir, objective: Objective | None, *, worker: bool, controller: SearchController | None,
                log: Callable[[str], None] | None, progress: Callable[[dict], None] | None,
                install_signals: bool, max_trials_this_session: int | None, storage_url: str,
                device: str | None) -> SearchResult:
    wid = worker_id()
    say = log or (lambda m: None)

    def logline(msg: str, level: str = "INFO") -> None:
        line = rd.log(f"[{wid}] {msg}", level)
        say(line)

    # the run's files against each other, before anything is written or any trial runs
    check_storage_present(rd)
    storage = _open_storage(storage_url, heartbeat=True)
    check_identity(rd, load_study_checked(rd, storage), logline)
    repaired = False if worker else repair_trials(rd, logline)
    cfg, space = config_of(rd)
    if device:
        check_device(device)
        cfg.device = device
    res = rd.resolved()
    live = [w for w in rd.workers() if w["alive"] and w["worker"] != wid]
    if live and not worker:
        raise MergelabError(
            f"Run {rd.path} is being searched right now by {', '.join(w['worker'] for w in live)}. Watch "
            f"it, stop it first, or join it as another worker with `mergelab resume {rd.path} --worker`."
        )
    opt = cfg.optimizer.name
    if opt == "pycma" and (worker or (res.get("storage") and live)):
        raise MergelabError(
            "The pycma optimizer runs in a single process (it hands out the points of one generation "
            "at a time); use `cmaes` (Optuna's CMA-ES, shared through the storage) for several workers."
        )
    sampler = make_sampler(opt, space, cfg.seed, cfg.optimizer.model_dump(), shared=worker)
    pruner = _make_pruner(cfg)
    study = load_study_checked(rd, storage, sampler=sampler, pruner=pruner)
    multi = len(res["directions"]) > 1
    objective_names = res["objective_names"]
    rd.heartbeat(wid, {"trial": None, "paused": False, "started": time.time()})

    # -- recover what an earlier process left behind
    host = socket.gethostname()

    def alive(t) -> bool:
        """Is a RUNNING trial still being evaluated by some process? (taking it over alone, no)"""
        if not worker:
            return False
        w = t.user_attrs.get("worker")
        if w is None:  # asked but not tagged yet: a worker that is starting it right now
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            return time.time() - started < STALE_AFTER_S
        if w == wid:
            return False
        if w.rsplit("-", 1)[0] != host:
            return True  # another machine: the storage heartbeat (below) decides, not our files
        return w in rd.live_workers()

    def recover() -> None:
        if worker:
            _fail_stale(study, logline)
        _mark_interrupted(study, rd, alive, logline, retry=opt != "pycma", n_params=len(space.params))

    recover()
    _reconcile_jsonl(study, rd, logline)
    if repaired or (not worker and int(rd.summary().get("trials_done", 0)) != _n_counted_records(rd)):
        rebuild_summary(rd, logline)  # counts from the (repaired) lines, not from increments
    if cfg.warm_start and not study.get_trials(deepcopy=False) and opt != "pycma":
        from mergelab.recipe import load_recipe

        values, clipped = space.values_from_recipe(load_recipe(cfg.warm_start))
        if clipped:
            logline(f"warm start: {', '.join(clipped)} outside the searched ranges, clipped", "WARNING")
        study.enqueue_trial(values, user_attrs={"warm_start": True})
    if cfg.dataflow is not None:  # trial 0: the identity path; PS + DFS: the PS merge, made once
        from .dataflow import ensure_ps_model

        ensure_ps_model(cfg, logline)
        if not study.get_trials(deepcopy=False) and opt != "pycma":
            study.enqueue_trial(space.identity_values(), user_attrs={"identity_path": True})
    if objective is None:
        objective = real_objective(rd, cfg)
    if not worker:
        rd.clear_control()

    sig = _Signals()
    if install_signals:
        sig.install()
    budget_trials = cfg.budget.trials
    budget_timeout = cfg.budget.timeout
    elapsed_before = float(rd.summary().get("elapsed_s", 0.0))
    session_start = time.time()
    stop_hb = threading.Event()
    current = {"trial": None, "paused": False}

    beat = _heartbeat_on(storage)

    def heartbeat_loop():
        while not stop_hb.wait(HEARTBEAT_S):
            rd.heartbeat(wid, {"trial": current["trial"], "paused": current["paused"], "started": session_start})
            tid = current.get("trial_id")
            if beat and tid is not None:
                # what Study.optimize does for its trials: lets a worker on another machine tell
                # our running trial from one whose process died (fail_stale_trials)
                try:
                    storage.record_heartbeat(tid)
                except Exception as e:  # a lost connection must not kill the search thread
                    logline(f"storage heartbeat failed: {type(e).__name__}: {e}", "WARNING")

    hb = threading.Thread(target=heartbeat_loop, daemon=True, name="mergelab-heartbeat")
    hb.start()

    def set_status(status: str, detail: str, paused: bool = False) -> None:
        def fn(s):
            s.update(status=status, detail=detail, paused=paused)
            s["elapsed_s"] = elapsed_before + (time.time() - session_start)
        rd.update_summary(fn)

    set_status("running", "worker joined" if worker else ("resumed" if study.get_trials(deepcopy=False) else "started"))
    logline(f"search {'worker ' if worker else ''}started: {opt}, {space.size_text()}, budget "
            f"{budget_trials if budget_trials else '-'} trials / {budget_timeout if budget_timeout else '-'} s")
    status, detail = "running", ""
    session_trials = 0
    last_recover = time.time()
    try:
        while True:
            # -- stop / pause between trials
            cmd = rd.control()
            stopping = sig.stop or cmd == "stop" or (controller is not None and controller.stop_event.is_set())
            if stopping:
                status, detail = "stopped", "stopped by signal" if sig.stop else "stopped by user"
                break
            if cmd == "pause":
                if not current["paused"]:
                    current["paused"] = True
                    set_status("running", "paused", paused=True)
                    logline("paused (resume from the dashboard or `control.json`)")
                time.sleep(0.2)
                continue
            if current["paused"]:
                current["paused"] = False
                set_status("running", "running")
                logline("resumed")
            done = n_counted(study)
            elapsed = elapsed_before + (time.time() - session_start)
            if budget_trials is not None and done >= budget_trials:
                status, detail = "finished", f"budget met: {done} trials"
                break
            if budget_timeout is not None and elapsed >= budget_timeout:
                status, detail = "finished", f"budget met: {elapsed:.0f} s of search time"
                break
            if max_trials_this_session is not None and session_trials >= max_trials_this_session:
                status, detail = "stopped", "session trial limit"
                break
            if budget_trials is not None and worker:
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if done + running >= budget_trials:
                    # the last trials are running elsewhere; one may fail or its worker die, and
                    # then its re-try needs us
                    time.sleep(0.3)
                    if time.time() - last_recover > STALE_AFTER_S / 3:
                        recover()
                        last_recover = time.time()
                    continue
            _one_trial(study, rd, space, objective, cfg, wid, multi, objective_names, current,
                       logline, progress, budget_trials if worker else None)
            session_trials += 1
            if session_trials == min(FAIL_FAST, budget_trials or FAIL_FAST):
                _stop_if_hopeless(rd, session_start, session_trials)
            # live viewers compute elapsed as elapsed_s + (now - updated): keep both current
            rd.update_summary(lambda s: s.update(elapsed_s=elapsed_before + (time.time() - session_start)))
    except KeyboardInterrupt:
        status, detail = "stopped", "interrupted (Ctrl-C twice)"
    except MergelabError as e:
        status, detail = "failed", str(e)
        logline(f"search failed: {e}", "ERROR")
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            status, detail = "stopped", f"cannot write the run: {e.strerror}"
            raise MergelabError(
                f"Search of run {rd.path} stopped: {e.strerror} while writing "
                f"{e.filename or 'the run directory'}. The trials finished so far are kept and the run "
                f"is marked stopped; free some space (or make it writable) and continue with "
                f"`mergelab resume {rd.path}`."
            ) from None
        status, detail = "failed", f"{type(e).__name__}: {e}"
        logline(f"search failed: {detail}\n{traceback.format_exc()}", "ERROR")
        raise
    finally:
        stop_hb.set()
        hb.join(timeout=5)
        if status == "running":
            status = "failed"
        others = [w for w in rd.live_workers() if w != wid]
        final = status
        if worker and others and status == "stopped":
            final = "running"  # other workers still search this run
        # "finished" (budget met) holds for the run whatever other workers are doing: two workers
        # ending together each see the other alive, and neither may write "running" last
        try:
            set_status(final, detail)
        except OSError as e:  # the disk is full past even an in-place summary: say it, keep the error
            logline(f"could not record the status {final!r} in summary.json: {e}", "ERROR")
        if status in ("finished", "stopped") and not others:
            rd.clear_control()
        rd.remove_worker(wid)
        if install_signals:
            sig.restore()
        logline(f"search {status}: {detail}")
    s = rd.summary()
    return SearchResult(status, detail, int(s.get("trials_done", 0)), s.get("best"))


def _make_pruner(cfg: SearchConfig):
    p = cfg.pruner
    if p is None:
        return optuna.pruners.NopPruner()
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.HyperbandPruner()


def _one_trial(study, rd: RunDir, space: Space, objective: Objective, cfg: SearchConfig, wid: str, multi: bool, objective_names: list[str], current: dict,
               logline, progress, shared_budget: int | None = None) -> None:
    trial = study.ask()
    trial.set_user_attr("worker", wid)  # first: a worker starting now must see who runs it
    if shared_budget is not None and _over_budget(study, trial.number, shared_budget):
        # Another worker created its trial between our budget check and our ask: the trials
        # with lower numbers fill the budget, so this one is given up before any work (not
        # counted, not re-tried, no trials.jsonl line). The lowest numbers win, so two racing
        # workers never both give up.
        trial.set_user_attr(ABANDONED_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        logline(f"trial {trial.number} given up: the budget is taken by other workers' trials")
        return
    # Optuna samples relative params lazily and skips it when every param is fixed (an
    # enqueued re-try or warm start); CMA-ES must still see the trial (it tags it with its
    # generation and may tell a finished generation), or a resumed run diverges.
    _ = trial.relative_params
    if isinstance(study.sampler, PycmaSampler):
        # the trial's place in pycma's evolution: the sampler re-derives its state from these
        trial.set_user_attr(SLOT_ATTR, study.sampler.slot_of(trial.number))
    values = {p.name: trial.suggest_float(p.name, p.low, p.high) for p in space.params}
    trial.set_user_attr("device", cfg.device)
    current["trial"] = trial.number
    current["trial_id"] = trial._trial_id
    retry_of = trial.user_attrs.get(RETRY_ATTR)
    started = time.time()
    recipe = space.recipe(values)
    fusion = space.fusion_of(values)
    if progress:
        progress({"event": "trial_start", "number": trial.number, "params": values, "recipe": recipe,
                  **({"fusion": fusion} if fusion is not None else {})})

    done_stages: list[str] = []
    last_write = [0.0]

    def stage(name: str, frac: float) -> None:
        if progress:
            progress({"event": "stage", "number": trial.number, "stage": name, "fraction": frac})
        new = not done_stages or done_stages[-1] != name
        if new:
            done_stages.append(name)
        # progress.json for viewers in other processes: every stage change, else at most 5 per s
        if new or frac >= 1.0 or time.time() - last_write[0] > 0.2:
            last_write[0] = time.time()
            rd.write_progress({"trial": trial.number, "stage": name, "frac": float(frac),
                               "stages_done": done_stages[:-1]})

    ctx = TrialContext(number=trial.number, params=values, device=cfg.device, run_dir=rd, trial=trial,
                       pruning=cfg.pruner is not None, log=logline, progress=stage, fusion=fusion)
    state, out, error = "COMPLETE", None, None
    t0 = time.perf_counter()
    try:
        out = _outcome(objective(recipe, ctx))
        if not math.isfinite(out.combined):
            state, error = "FAIL", f"non-finite score {out.combined}"
    except optuna.TrialPruned as e:
        state, error = "PRUNED", str(e) or "pruned"
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise  # the run's disk, not the candidate: the search stops (run_search)
        # any other exception is this candidate's failure (e.g. NonFiniteMergeError: a merge
        # whose values overflowed), recorded with its reason; a cause every candidate shares
        # stops the search after its first trials (FAIL_FAST)
        state, error = "FAIL", str(e) if isinstance(e, MergelabError) else f"{type(e).__name__}: {e}"
        logline(f"trial {trial.number} failed: {error}", "WARNING")
    total = time.perf_counter() - t0
    vals = None
    if state == "COMPLETE" and multi:
        missing = [n for n in objective_names if n not in out.scores]
        if missing:
            state, error = "FAIL", f"the eval gave no score for objective(s) {missing}"
        else:
            vals = [float(out.scores[n]) for n in objective_names]
    rec = {
        "number": trial.number,
        "state": state,
        "params": values,
        "recipe": recipe,
        "value": out.combined if (out is not None and state == "COMPLETE") else None,
        "values": vals,
        "metrics": out.metrics if out is not None else {},
        "scores": out.scores if out is not None else {},
        "error": error,
        "interrupted": False,
        "retry_of": retry_of,
        "timings": {"merge_s": out.merge_s if out else None, "eval_s": out.eval_s if out else None,
                    "total_s": total},
        "started": started,
        "finished": time.time(),
        "device": (out.device if out is not None and out.device else cfg.device),
        "kernels": out.kernels if out is not None else None,
        "worker": wid,
    }
    if hasattr(space, "path_record"):
        rec["path"] = space.path_record(values)  # data flow: [[model, layer, scale], ...]
    if fusion is not None:
        rec["fusion"] = fusion  # a hybrid: the recipe's merge, fused at inference time (see rundir)
    # the record goes into the study first, so a kill before the jsonl append is repaired on resume
    trial.set_user_attr(RECORD_ATTR, dumps(rec))
    # each number its own attribute, so optuna-dashboard and load_study users see them unparsed
    for name, v in {**{f"score/{k}": v for k, v in rec["scores"].items()},
                    **{f"metric/{k}": v for k, v in rec["metrics"].items()}}.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            trial.set_user_attr(name, float(v))
    if error:
        trial.set_user_attr("error", error)
    if state == "COMPLETE":
        study.tell(trial, vals if multi else out.combined)
    elif state == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    rd.append_trial(rec)
    rd.write_progress({"trial": trial.number, "stage": "done", "frac": 1.0, "stages_done": done_stages})
    current["trial"] = None
    current["trial_id"] = None
    update_summary(rd, rec, logline)
    score = f"{rec['value']:.6g}" if rec["value"] is not None else state
    logline(f"trial {trial.number} {state.lower()}: score {score} ({total:.2f} s)")
    if progress:
        progress({"event": "trial_end", "number": trial.number, "record": rec})


def _stop_if_hopeless(rd: RunDir, session_start: float, n: int) -> None:
    """Raise when this session's first n trials all failed with one and the same error."""
    recs = [r for r in rd.trials() if not r.get("interrupted") and (r.get("started") or 0) >= session_start - 1]
    errors = {r.get("error") for r in recs[-n:]}
    if len(recs) >= n and all(r["state"] == "FAIL" for r in recs[-n:]) and len(errors) == 1:
        raise MergelabError(
            f"The first {n} trials of run {rd.path} all failed with the same error: {errors.pop()} "
            f"The search stops here rather than spend its budget on it; fix the cause (the config, "
            f"the eval spec, the device) and continue with `mergelab resume {rd.path}`."
        )


def _over_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Do the counted trials plus the running ones numbered below `number` fill the budget?"""
    trials = study.get_trials(deepcopy=False)
    ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < number)
    return sum(1 for t in trials if counted(t)) + ahead >= budget


def start_search_thread(run: str | Path | RunDir, objective: Objective | None = None, **kw):
    """Run the search in a background thread (for a UI in the main thread).

    Returns (thread, controller); the thread's result is in thread.result once it ends and any
    exception in thread.error."""
    rd = run if isinstance(run, RunDir) else RunDir.open(run)
    ctl = SearchController(rd)

    class _T(threading.Thread):
        result: SearchResult | None = None
        error: BaseException | None = None

        def run(self):
            try:
                self.result = run_search(rd, objective, controller=ctl, install_signals=False, **kw)
            except BaseException as e:  # handed to the UI thread, which decides what to show
                self.error = e

    t = _T(daemon=True, name="mergelab-search")
    t.start()
    return t, ctl


def export_trial(run: str | Path | RunDir, out_dir: str | Path, *, trial: int | None = None,
                 device: str | None = None, on_tensor=None, overwrite: bool = False,
                 held_out: bool = True) -> tuple[Path, dict]:
    """Write the merged model of a trial (default: the best) with the streaming engine; the
    trial's recipe is written beside it, so the export is the same merge the trial scored, and
    its card says how the search found it (mergelab_search.json). With the run's `test_eval`,
    the trial and the sources are scored on it first (`held_out=False`: only scores already in
    heldout.json are used), so the card reports held-out numbers.

    A hybrid trial (merge + logit fusion) exports its merge as weights plus `fusion_recipe.yaml`
    (the merge, i.e. this folder, fused with the trial's other members): fusion happens at
    inference time, so `mergelab eval OUT/fusion_recipe.yaml` scores what the trial scored, while
    the weights alone are only its merge part."""
    from mergelab.engine import merge_to_dir
    from mergelab.recipe import dump_yaml

    from .heldout import held_out as score_held_out

    rd = run if isinstance(run, RunDir) else RunDir.open(run)
    recs = [r for r in rd.trials() if r.get("recipe") and r.get("state") == "COMPLETE"]
    if trial is None:
        best = rd.summary().get("best")
        if not best:
            raise MergelabError(f"Run {rd.path} has no finished trial yet; nothing to export.")
        trial = best["number"]
    rec = next((r for r in recs if r["number"] == trial), None)
    if rec is None:
        raise MergelabError(
            f"Run {rd.path} has no finished trial number {trial}. `mergelab show {rd.path}` lists them."
        )
    dev = device or rd.resolved().get("device") or "auto"
    if held_out:
        score_held_out(rd, trial, device=dev)
    extra = {SEARCH_META_FILE: dumps(rd.search_metadata(rec), indent=2) + "\n"}
    if rec.get("fusion"):
        extra[FUSION_RECIPE_FILE] = dump_yaml(fusion_recipe(rec["fusion"], EXPORT_MERGE_REF))
    report = merge_to_dir(rec["recipe"], out_dir, device=dev, on_tensor=on_tensor, overwrite=overwrite,
                          extra_files=extra)
    return Path(getattr(report, "out_dir", out_dir)), rec
