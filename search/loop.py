"""Run creation and the trial loop: ask -> candidate recipe -> objective -> tell -> trials.jsonl ->
best/summary.

`prepare_run` validates a config (search/validate.py) and creates the run directory;
`run_search` runs (or resumes, or joins as a worker) until the budget is met, recovering what an
earlier process left behind first (search/recovery.py); `SearchController` steers it from a UI.
The objective is search/objective.py's, the storage search/storage.py's, exports
search/export.py's.
"""
from __future__ import annotations

import errno
import math
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from mergelab.errors import MergelabError

from .config import SearchConfig, load_search_config
from .objective import Objective, TrialContext, outcome, real_objective
from .optimizers import ABANDONED_ATTR, RETRY_ATTR, counted, make_sampler, n_counted
from .pycma_sampler import SLOT_ATTR, PycmaSampler
from .records import RECORD_ATTR
from .recovery import (
    check_identity,
    check_storage_present,
    config_hash,
    load_study_checked,
    mark_interrupted,
    n_counted_records,
    reconcile_jsonl,
    repair_trials,
    stamp_study,
)
from .rundir import HEARTBEAT_S, STALE_AFTER_S, RunDir, dumps, worker_id
from .space import Space
from .storage import TrialIds, fail_stale, heartbeat_on, open_storage, public_url, storage_of
from .summary import rebuild_summary, update_summary
from .validate import check_device, config_of, load_warm_start, scorer_names, validate_config

STUDY_NAME = "mergelab"
FAIL_FAST = 3  # a session whose first this-many trials fail for one reason stops with that reason
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the run cannot be written: stop, keep it
optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- resolved config ------------------------------------------------------------------------------
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


def describe_study(study: optuna.Study, rd: RunDir, space: Space) -> None:
    """What an Optuna user (optuna-dashboard, optuna.load_study) needs to read the study without
    mergelab: its metric names, the run it belongs to, and each parameter's meaning."""
    from .labels import layer_span, param_labels

    res = rd.resolved_run()
    with warnings.catch_warnings():  # experimental in Optuna 3.2-5.x, and the API optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(res.objective_names))
    labels = param_labels(space)
    study.set_user_attr("mergelab_run", rd.name)
    study.set_user_attr("mergelab_base_model", res.base_model)
    study.set_user_attr("mergelab_models", list(res.models))
    study.set_user_attr("mergelab_params", {
        p.name: {"label": labels.get(p.name, p.name), "kind": p.kind, "parameter": p.param,
                 "model": (space.models[p.model] if p.model is not None and 0 <= p.model < len(space.models)
                           else p.model),  # a data-flow slot may index the PS model, past the sources
                 "layers": (list(layer_span(p.group, space.num_layers, space.layer_groups) or []) or None
                            if p.group is not None else None),
                 "filter": p.filter, "low": p.low, "high": p.high}
        for p in space.params})


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
        objective_names = scorer_names(cfg.eval, base_dir) if cfg.optimizer.name == "nsga2" else ["combined"]
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
    st = open_storage(storage, heartbeat=False) if storage is not None else None
    RunDir.check_new(run)
    resolved = resolved_config(cfg, space, public_url(storage), objective_names, run.name)
    resolved["eval_base_dir"] = str(base_dir)
    resolved["config_sha256"] = config_hash(text)
    resolved["given"] = given
    rd = RunDir.create(run, text, resolved)
    try:
        if st is None:
            st = open_storage(rd.storage_url(), heartbeat=False)
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
    storage = open_storage(storage_url, heartbeat=True)
    study0 = load_study_checked(rd, storage)
    check_identity(rd, study0, logline)
    repaired = False if worker else repair_trials(rd, logline)
    cfg, space = config_of(rd)
    if device:
        check_device(device)
        cfg.device = device
    res = rd.resolved_run()
    live = [w for w in rd.workers() if w["alive"] and w["worker"] != wid]
    if live and not worker:
        raise MergelabError(
            f"Run {rd.path} is being searched right now by {', '.join(w['worker'] for w in live)}. Watch "
            f"it, stop it first, or join it as another worker with `mergelab resume {rd.path} --worker`."
        )
    opt = cfg.optimizer.name
    if opt == "pycma" and (worker or (res.storage and live)):
        raise MergelabError(
            "The pycma optimizer runs in a single process (it hands out the points of one generation "
            "at a time); use `cmaes` (Optuna's CMA-ES, shared through the storage) for several workers."
        )
    warm = warm_start_values(study0, cfg, space, logline)
    sampler = make_sampler(opt, space, cfg.seed, cfg.optimizer.model_dump(), shared=worker, x0=warm)
    pruner = _make_pruner(cfg)
    study = load_study_checked(rd, storage, sampler=sampler, pruner=pruner)
    ids = TrialIds(storage, rd.study_name())  # trial number -> the storage's id (public methods)
    multi = res.multi
    objective_names = res.objective_names
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
            fail_stale(study, storage)
        mark_interrupted(study, ids, rd, alive, logline, retry=opt != "pycma", n_params=len(space.params))

    recover()
    reconcile_jsonl(study, rd, logline)
    if repaired or (not worker and rd.run_summary().trials_done != n_counted_records(rd)):
        rebuild_summary(rd, logline)  # counts from the (repaired) lines, not from increments
    if warm is not None and not study.get_trials(deepcopy=False) and opt != "pycma":
        # trial 0 is the warm start itself (pycma asks it as generation 0's first point)
        study.enqueue_trial(warm, user_attrs={"warm_start": True})
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
    elapsed_before = rd.run_summary().elapsed_s
    session_start = time.time()
    stop_hb = threading.Event()
    current = {"trial": None, "paused": False}

    beat = heartbeat_on(storage)

    def heartbeat_loop():
        while not stop_hb.wait(HEARTBEAT_S):
            rd.heartbeat(wid, {"trial": current["trial"], "paused": current["paused"], "started": session_start})
            number = current.get("trial")
            if beat and number is not None:
                # what Study.optimize does for its trials: lets a worker on another machine tell
                # our running trial from one whose process died (fail_stale_trials)
                try:
                    storage.record_heartbeat(ids(number))
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
    s = rd.run_summary()
    return SearchResult(status, detail, s.trials_done, s.best)


WARM_START_ATTR = "mergelab_warm_start"  # study user attribute: the warm start's parameter values


def warm_start_values(study: optuna.Study, cfg, space, logline) -> dict[str, float] | None:
    """The warm start as parameter values, or None. Read from the recipe once, when the run
    first starts, and fixed in the study: every later start and every worker takes them from
    there (the CMA-ES mean starts at them, so a resume must see the same values, and the recipe
    file may be gone or elsewhere by then). The study is the run's, so the values are checked."""
    stored = study.user_attrs.get(WARM_START_ATTR)
    if stored is not None:
        names = [p.name for p in space.params]
        ok = isinstance(stored, dict) and sorted(stored) == sorted(names) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stored.values())
        if not ok:
            raise MergelabError(
                f"The run's study holds a warm start (user attribute `{WARM_START_ATTR}`) that is not a "
                f"value for each of the run's {len(names)} searched parameters. It was edited or "
                "belongs to another search; restore the run's own study, or start a new run."
            )
        return {p.name: min(p.high, max(p.low, float(stored[p.name]))) for p in space.params}
    if not cfg.warm_start or study.get_trials(deepcopy=False):
        return None  # no warm start, or a run begun before warm starts were kept in the study
    values, clipped = space.values_from_recipe(load_warm_start(cfg, space))  # the run's first start
    if clipped:
        logline(f"warm start: {', '.join(clipped)} outside the searched ranges, clipped", "WARNING")
    study.set_user_attr(WARM_START_ATTR, values)
    return values


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
        slot = study.sampler.slot_of(trial.number)
        trial.set_user_attr(SLOT_ATTR, slot)
        if slot == [0, 0] and study.sampler.warm_started:
            trial.set_user_attr("warm_start", True)
    values = {p.name: trial.suggest_float(p.name, p.low, p.high) for p in space.params}
    trial.set_user_attr("device", cfg.device)
    current["trial"] = trial.number
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
        out = outcome(objective(recipe, ctx))
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
    update_summary(rd, rec, logline)
    score = f"{rec['value']:.6g}" if rec["value"] is not None else state
    logline(f"trial {trial.number} {state.lower()}: score {score} ({total:.2f} s)")
    if progress:
        progress({"event": "trial_end", "number": trial.number, "record": rec})


def _stop_if_hopeless(rd: RunDir, session_start: float, n: int) -> None:
    """Raise when this session's first n trials all failed with one and the same error."""
    recs = [r for r in rd.trial_records() if r.counted and (r.started or 0) >= session_start - 1]
    errors = {r.error for r in recs[-n:]}
    if len(recs) >= n and all(r.state == "FAIL" for r in recs[-n:]) and len(errors) == 1:
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

