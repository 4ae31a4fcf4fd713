"""Run directories: the on-disk record of one search, written by the loop and read by viewers.

Everything a dashboard, `mergelab runs` or `mergelab resume` needs is here; none of them talks to
the search loop's memory.

Layout of ``runs/NAME/``::

    config.yaml        the search config exactly as given (frozen; never rewritten)
    resolved.json      the resolved config: absolute paths, layer count, the list of searched
                       parameters, optimizer and its options, budget, seed, device, storage URL,
                       versions of mergelab / torch / transformers / optuna / python, created time;
                       read once into a search.records.ResolvedRun (RunDir.resolved_run())
    study.db           the Optuna study (SQLite) unless --storage named another storage; the run
                       is a normal Optuna study: ``optuna-dashboard sqlite:///runs/NAME/study.db``
    (no pickle)        the pycma optimizer keeps no state file: each trial's user attribute
                       pycma_slot [generation, slot] lets it replay the evolution from the study
                       (search/pycma_sampler.py). Optuna's cmaes sampler does keep a pickled
                       optimizer in study.db: search.optimizers.CmaStateGuard loads every stored
                       state with an unpickler that knows only CMA-ES/numpy classes before Optuna
                       may unpickle it; nothing else in a run directory is unpickled
    trials.jsonl       append-only, one JSON object per line, one line per finished or failed
                       trial (see TRIAL RECORD below); each line is written with one write() on
                       an O_APPEND descriptor under an flock, then fsync'ed, so a reader never
                       sees half a line except the one being written (ignore a last line without
                       "\\n")
    summary.json       the run's state (see SUMMARY below), rewritten (atomic rename) after every
                       trial and on every status change
    best/recipe.yaml   the best trial's recipe (mergekit format), rewritten when the best improves
    best/trial.json    that trial's record
    best/fusion_recipe.yaml  only when the best is a hybrid (search config `fusion:`): the
                       logit_fusion recipe of what that trial scored, its merge given as
                       ./recipe.yaml; `mergelab eval runs/NAME/best/fusion_recipe.yaml` scores it
    best/model/        written on demand by search.export.export_best() (`mergelab push runs/NAME`): the
                       best trial's merged model, its card and mergelab_search.json (optimizer,
                       n_trials, eval_spec, best_trial, best_metrics, history, scores (each
                       trial's {number, value, state}), run_name, and
                       with `test_eval`: test_eval_spec, test_metrics, source_metrics); reused
                       while the best trial and its held-out scores are the same
    heldout.json       only with `test_eval` in the config (search/heldout.py): the held-out
                       scores {"spec_key", "sources": {ref: metrics}, "trials": {N: metrics}},
                       written at the end of a search and on export/push; best_metrics and trial
                       values are validation (fitness) numbers, these are the ones to quote
    log.txt            plain log lines ("2024-05-01 12:00:00 INFO message")
    workers/ID.json    one heartbeat file per search process: {"worker", "pid", "host",
                       "started", "heartbeat" (epoch s, refreshed every HEARTBEAT_S), "trial"
                       (number being evaluated or null), "paused"}; deleted on a clean exit
    control.json       written by a UI to steer the loop: {"command": "pause"|"resume"|"stop",
                       "at": epoch}; the loop reads it between trials (and "stop" also while
                       paused), acts, and on stop/finish removes it
    .lock              flock target serializing writers of summary.json and trials.jsonl
    warm_start.yml     optional: a warm-start recipe placed in the run before it was created
                       (`mergelab demo` writes its equal-weight recipe here; config `warm_start`)

TRIAL RECORD (trials.jsonl): number (Optuna trial number), state ("COMPLETE", "PRUNED" or
"FAIL"), params (the optimizer's values by parameter name), recipe (the candidate recipe dict,
mergekit format), value (combined score, higher is better; null when failed), values (one per
objective for multi-objective runs, else null), metrics (every metric of every scorer), scores
(per scorer, higher is better), error (text when failed), interrupted (true for a trial whose
process died; it is re-tried under a new number and does NOT count towards the budget),
retry_of (number of the interrupted trial this one re-tries, else null), timings {"merge_s",
"eval_s", "total_s"}, started / finished (epoch s), device, worker; and for a hybrid
candidate (config `fusion:`) fusion {weighting, tau, grid_step, members: ["merge" (the recipe's
merged model) or model references]}: the recipe's merge was scored fused with those members at
inference time, so the recipe alone is not what the score measures.

SUMMARY (summary.json): name, status ("running", "stopped", "finished", "failed"), detail (why,
e.g. "budget met", "stopped by user", the error), paused, optimizer, directions, objective_names,
budget {"trials", "timeout"}, trials_done (COMPLETE + PRUNED + FAIL-not-interrupted: what the
budget counts), trials_complete, trials_failed, trials_pruned, elapsed_s (search time summed
over sessions, up to "updated"), created, updated (epoch s), best {number, value, values,
metrics, scores, params, fusion (hybrids only)} or null, pareto (multi-objective: list of {number, values, params}),
device, seed, storage.

A status read by RunDir.status() corrects "running" to "stopped" (detail "interrupted") when no
worker heartbeat is fresh: the process died without a chance to say so.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mergelab.errors import MergelabError

from .records import RecordError, ResolvedRun, RunSummary, TrialRecord

CONFIG_FILE = "config.yaml"
RESOLVED_FILE = "resolved.json"
STUDY_FILE = "study.db"
TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
BEST_DIR = "best"
BEST_MODEL_DIR = "model"  # under best/: search.export.export_best()'s default folder
SEARCH_META_FILE = "mergelab_search.json"  # the name mergelab.card reads
LOG_FILE = "log.txt"
WORKERS_DIR = "workers"
CONTROL_FILE = "control.json"
LOCK_FILE = ".lock"
PROGRESS_FILE = "progress.json"
SESSION_LOCK_FILE = ".session.lock"  # flock'ed exclusively by the one process that runs the search
WARM_START_FILE = "warm_start.yml"  # a warm-start recipe kept in its run (written before the run is created)

FUSION_RECIPE_FILE = "fusion_recipe.yaml"  # beside a hybrid's merge (best/ and exports)
BEST_MERGE_REF = "./recipe.yaml"  # how best/fusion_recipe.yaml names the merge (beside it)
EXPORT_MERGE_REF = "."  # how an export's fusion_recipe.yaml names the merge (its own folder)

HEARTBEAT_S = 2.0
STALE_AFTER_S = 15.0  # a worker whose heartbeat is older than this is taken for dead

STATUSES = ("running", "stopped", "finished", "failed")
COUNTED_STATES = ("COMPLETE", "PRUNED", "FAIL")
CONTROL_COMMANDS = ("pause", "resume", "stop")


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a concurrent reader sees old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a killed process with our pid (or a planted link): never followed
    # O_EXCL | O_NOFOLLOW: the write goes into a new file inside the run, never through a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        os.replace(tmp, path)  # rename replaces a link at `path` itself, never its target
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _overwrite_in_place(path: Path, text: str) -> bool:
    """Rewrite an existing file within its current size (padded with spaces, which JSON allows);
    False when the text does not fit."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        data = text.rstrip("\n").encode("utf-8")
        if len(data) + 1 > size:
            return False
        os.write(fd, data + b" " * (size - len(data) - 1) + b"\n")
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _json_default(o: Any) -> Any:
    # numpy scalars and tuples appear in params / metrics
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN/inf are not JSON; store them as null so every reader can parse the files."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def dumps(o: Any, indent: int | None = None) -> str:
    return json.dumps(_clean(o), default=_json_default, indent=indent, sort_keys=False)


def fusion_recipe(fusion: dict, merge_ref: str) -> dict:
    """The logit_fusion recipe (mergelab.fusion) of a hybrid trial's `fusion` record; `merge_ref`
    names the merge (a merge recipe or a model folder; ./ paths are relative to the recipe)."""
    return {
        "merge_method": "logit_fusion",
        "models": [{"model": merge_ref if m == "merge" else m} for m in fusion["members"]],
        "parameters": {k: fusion[k] for k in ("weighting", "tau", "grid_step")},
    }


def records_of(lines: list) -> list[TrialRecord]:
    """The parsed trials.jsonl lines that are trial records, as TrialRecords (others left out)."""
    out = []
    for d in lines:
        try:
            out.append(TrialRecord.from_json(d))
        except RecordError:
            continue
    return out


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fmt_age(t: float | None, now: float) -> str:
    """How long ago an epoch time was, in the largest whole unit ("3m ago")."""
    if not t:
        return "-"
    s = max(0.0, now - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


@dataclass
class RunStatus:
    """What a runs browser shows for one run directory."""

    name: str
    path: Path
    status: str  # one of STATUSES
    detail: str
    paused: bool
    optimizer: str | None
    trials_done: int
    budget_trials: int | None
    budget_timeout: float | None
    best_value: float | None
    best_trial: int | None
    created: float | None
    last_activity: float | None  # epoch s of the last write (summary, trials, heartbeat)
    elapsed_s: float
    live_workers: list[str] = field(default_factory=list)


class TrialTail:
    """Incremental reader of trials.jsonl for live viewers: poll() returns the new records.

    It remembers a byte offset and keeps a trailing partial line until its newline arrives, so
    following a file another process appends to never yields a broken record.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated or replaced: start over
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended with a newline
        out = []
        for line in lines:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a corrupt line (disk full, manual edit) must not stop a viewer
        return out


class RunClaim:
    """An exclusive flock on a run's .session.lock (RunDir.claim)."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class RunDir:
    """One run directory. Safe to read from any process while a search writes it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- creation / opening -------------------------------------------------------------
    @staticmethod
    def check_new(path: str | os.PathLike) -> None:
        """Raise unless a new run can be created at path (absent, an empty directory, or one that
        holds only warm_start.yml: the recipe its config's `warm_start` names, kept in the run)."""
        p = Path(path)
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise MergelabError(f"--run {p} is a link or a file, not a directory; pick another --run name.")
        if p.exists() and any(c.name != WARM_START_FILE for c in p.iterdir()):
            raise MergelabError(
                f"Run directory {p} already exists and is not empty. Resume it with "
                f"`mergelab resume {p}`, pick another --run name, or delete it first."
            )

    @classmethod
    def create(cls, path: str | os.PathLike, config_text: str, resolved: dict) -> "RunDir":
        """A new run directory with the frozen config, the resolved config and a summary."""
        p = Path(path)
        cls.check_new(p)
        p.mkdir(parents=True, exist_ok=True)
        (p / WORKERS_DIR).mkdir(exist_ok=True)
        (p / BEST_DIR).mkdir(exist_ok=True)
        rd = cls(p)
        _atomic_write(p / CONFIG_FILE, config_text)
        _atomic_write(p / RESOLVED_FILE, dumps(resolved, indent=2) + "\n")
        (p / TRIALS_FILE).touch()
        now = time.time()
        summary = {
            "name": p.name,
            "status": "stopped",
            "detail": "created",
            "paused": False,
            "optimizer": resolved.get("optimizer", {}).get("name"),
            "directions": resolved.get("directions", ["maximize"]),
            "objective_names": resolved.get("objective_names", ["combined"]),
            "budget": resolved.get("budget", {"trials": None, "timeout": None}),
            "trials_done": 0,
            "trials_complete": 0,
            "trials_failed": 0,
            "trials_pruned": 0,
            "elapsed_s": 0.0,
            "created": now,
            "updated": now,
            "best": None,
            "pareto": [],
            "device": resolved.get("device"),
            "seed": resolved.get("seed"),
            "storage": resolved.get("storage"),
        }
        rd.write_summary(summary)
        return rd

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        p = Path(path)
        if not (p / RESOLVED_FILE).is_file() or not (p / CONFIG_FILE).is_file():
            raise MergelabError(
                f"{p} is not a run directory (no {CONFIG_FILE} / {RESOLVED_FILE} in it). Give the "
                f"directory that `mergelab search` created, e.g. runs/NAME; `mergelab runs` lists them."
            )
        return cls(p)

    @staticmethod
    def is_run_dir(path: str | os.PathLike) -> bool:
        p = Path(path)
        return (p / RESOLVED_FILE).is_file() and (p / CONFIG_FILE).is_file()

    @staticmethod
    def list(runs_dir: str | os.PathLike) -> list["RunDir"]:
        """Run directories directly under runs_dir, newest first."""
        d = Path(runs_dir)
        if not d.is_dir():
            return []
        found = [RunDir(p) for p in d.iterdir() if p.is_dir() and RunDir.is_run_dir(p)]
        found.sort(key=lambda r: r.created() or 0.0, reverse=True)
        return found

    @property
    def name(self) -> str:
        return self.path.name

    # -- static content -----------------------------------------------------------------
    def config_text(self) -> str:
        return (self.path / CONFIG_FILE).read_text(encoding="utf-8")

    def resolved(self) -> dict:
        """resolved.json as the raw mapping (what write_resolved writes back); readers use
        resolved_run()."""
        return json.loads((self.path / RESOLVED_FILE).read_text(encoding="utf-8"))

    def resolved_run(self) -> ResolvedRun:
        """resolved.json read once into a ResolvedRun. A file that is not JSON, or a key of the
        wrong type, is a MergelabError naming the file and the key (not a traceback): the run's
        config is what a resume, export or worker runs on, so a damaged one is refused."""
        p = self.path / RESOLVED_FILE
        try:
            return ResolvedRun.from_json(json.loads(p.read_text(encoding="utf-8")), RESOLVED_FILE)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"{RESOLVED_FILE} is not readable JSON ({e})"
        except RecordError as e:
            problem = str(e)
        raise MergelabError(
            f"Run {self.path}: {problem}. {RESOLVED_FILE} is the run's resolved config, written when "
            f"the run was created and read by resume, export and the viewers; restore it from a copy "
            f"of the run, or start a new run from its config: `mergelab search {self.path / CONFIG_FILE} "
            f"--run NEW`."
        )

    def write_resolved(self, resolved: dict | ResolvedRun) -> None:
        if isinstance(resolved, ResolvedRun):
            resolved = resolved.to_json()
        _atomic_write(self.path / RESOLVED_FILE, dumps(resolved, indent=2) + "\n")

    def storage_url(self) -> str:
        url = self.resolved_run().storage
        return url or f"sqlite:///{(self.path / STUDY_FILE).resolve()}"

    def study_name(self) -> str:
        """The Optuna study's name in the storage: the run's name in its own study.db,
        "mergelab-RUNNAME" in a shared --storage (runs sharing a database stay apart); "mergelab"
        for runs made before studies were named after their run."""
        return self.resolved_run().study_name or "mergelab"

    def created(self) -> float | None:
        return self.run_summary().created

    # -- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize writers across processes (summary read-modify-write, jsonl appends)."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock

    def claim(self) -> "RunClaim":
        """The exclusive right to search this run (not as a --worker), held until release() or
        the process ends (the kernel drops an flock with its process, so a killed search never
        leaves the run locked). Raises MergelabError when another process holds it."""
        fd = os.open(self.path / SESSION_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergelabError(
                f"Run {self.path} is being searched right now by another process (it holds "
                f"{SESSION_LOCK_FILE}). Watch it with `mergelab show {self.path}`, stop it first, or "
                f"join a shared-storage run as another worker with `mergelab resume {self.path} --worker`."
            ) from None
        return RunClaim(fd)

    # -- trials.jsonl -----------------------------------------------------------------------
    def append_trial(self, record: dict) -> None:
        line = (dumps(record) + "\n").encode("utf-8")
        with self.locked():
            fd = os.open(self.path / TRIALS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def append_trial_once(self, record: dict) -> bool:
        """Append `record` unless trials.jsonl already has a line with its number (checked and
        written under the lock, so of several processes recovering one trial, one writes it)."""
        line = (dumps(record) + "\n").encode("utf-8")
        with self.locked():
            if any(r.get("number") == record["number"] for r in self.trials()):
                return False
            fd = os.open(self.path / TRIALS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    def trials(self) -> list[dict]:
        """Every complete line of trials.jsonl, in file order (as parsed JSON)."""
        return TrialTail(self.path / TRIALS_FILE).poll()

    def trial_records(self) -> list[TrialRecord]:
        """Every trial record of trials.jsonl, in file order, each line read once into a
        TrialRecord; a line that is not a record (a manual edit, a foreign tool) is left out, as
        a corrupt line is."""
        return records_of(self.trials())

    def follow(self) -> TrialTail:
        """A tail that returns, at each poll(), the records appended since the last poll."""
        return TrialTail(self.path / TRIALS_FILE)

    # -- summary / best -------------------------------------------------------------------
    def summary(self) -> dict:
        try:
            return json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def run_summary(self) -> RunSummary:
        """summary.json read once into a RunSummary (a key of the wrong type takes its default:
        viewers scan every run, and one damaged file must not stop them)."""
        return RunSummary.from_json(self.summary(), strict=False)

    def write_summary(self, summary: dict) -> None:
        summary["updated"] = time.time()
        text = dumps(summary, indent=2) + "\n"
        try:
            _atomic_write(self.path / SUMMARY_FILE, text)
        except OSError as e:
            # a full disk has no room for the new file of an atomic write; the old file's blocks
            # can still take the new state (e.g. "stopped" after a disk-full crash) when it fits
            if e.errno != errno.ENOSPC or not _overwrite_in_place(self.path / SUMMARY_FILE, dumps(summary)):
                raise

    def update_summary(self, fn: Callable[[dict], None]) -> dict:
        """Read-modify-write of summary.json under the lock (several workers may share it)."""
        with self.locked():
            s = self.summary()
            fn(s)
            self.write_summary(s)
            return s

    def inside(self, *parts: str) -> Path:
        """self.path / parts, refused when any step below the run directory is a link: what
        mergelab writes into a run stays in it (a planted `best -> /elsewhere` is not followed)."""
        p = self.path
        for part in parts:
            p = p / part
            if p.is_symlink():
                raise MergelabError(
                    f"Run {self.path}: {p} is a link (to {os.readlink(p)}). mergelab writes into a run "
                    f"directory only, never through a link out of it; remove the link (`rm {p}`) and "
                    "run the command again."
                )
        return p

    def write_progress(self, progress: dict) -> None:
        """progress.json: the running trial's stage, for viewers in other processes (best effort)."""
        try:
            _atomic_write(self.inside(PROGRESS_FILE), dumps({**progress, "time": time.time()}) + "\n")
        except (OSError, MergelabError):
            pass  # a viewer's convenience; the search goes on without it

    def progress(self) -> dict | None:
        try:
            return json.loads((self.path / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def write_best(self, recipe_yaml: str, record: dict, fusion_yaml: str | None = None) -> None:
        self.inside(BEST_DIR).mkdir(exist_ok=True)
        _atomic_write(self.path / BEST_DIR / "recipe.yaml", recipe_yaml)
        _atomic_write(self.path / BEST_DIR / "trial.json", dumps(record, indent=2) + "\n")
        fusion_path = self.path / BEST_DIR / FUSION_RECIPE_FILE
        if fusion_yaml is not None:
            _atomic_write(fusion_path, fusion_yaml)
        elif fusion_path.exists():
            fusion_path.unlink()  # the new best is a plain merge

    def best_recipe_text(self) -> str | None:
        p = self.path / BEST_DIR / "recipe.yaml"
        return p.read_text(encoding="utf-8") if p.is_file() else None

    # -- log ---------------------------------------------------------------------------------
    def log(self, message: str, level: str = "INFO") -> str:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {message}"
        try:
            fd = os.open(self.path / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            pass  # the log is a convenience: a full disk must not hide the error being logged
        return line

    def log_lines(self, last: int | None = None) -> list[str]:
        p = self.path / LOG_FILE
        if not p.is_file():
            return []
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        return lines[-last:] if last else lines

    # -- workers / heartbeat -------------------------------------------------------------
    def heartbeat(self, worker: str, info: dict) -> None:
        self.inside(WORKERS_DIR).mkdir(exist_ok=True)
        data = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(), **info,
                "heartbeat": time.time()}
        _atomic_write(self.path / WORKERS_DIR / f"{worker}.json", dumps(data) + "\n")

    def remove_worker(self, worker: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / WORKERS_DIR / f"{worker}.json").unlink()

    def workers(self) -> list[dict]:
        """Heartbeat records with an "alive" flag (fresh heartbeat, and pid alive when local)."""
        d = self.path / WORKERS_DIR
        out = []
        if not d.is_dir():
            return out
        now = time.time()
        host = socket.gethostname()
        for p in sorted(d.glob("*.json")):
            try:
                w = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, FileNotFoundError):
                continue
            alive = now - float(w.get("heartbeat", 0)) < STALE_AFTER_S
            if alive and w.get("host") == host:
                alive = _pid_alive(int(w.get("pid", -1)))
            w["alive"] = alive
            out.append(w)
        return out

    def live_workers(self) -> list[str]:
        return [w["worker"] for w in self.workers() if w["alive"]]

    # -- control (UI -> loop) --------------------------------------------------------------
    def request(self, command: str) -> None:
        """Ask the running search to pause, resume or stop (between trials)."""
        if command not in CONTROL_COMMANDS:
            raise ValueError(f"unknown control command {command!r}; use one of {CONTROL_COMMANDS}")
        _atomic_write(self.path / CONTROL_FILE, dumps({"command": command, "at": time.time()}) + "\n")

    def control(self) -> str | None:
        try:
            c = json.loads((self.path / CONTROL_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        cmd = c.get("command")
        return cmd if cmd in CONTROL_COMMANDS else None

    def clear_control(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / CONTROL_FILE).unlink()

    # -- status ------------------------------------------------------------------------------
    def last_activity(self, workers: list[dict] | None = None) -> float | None:
        """Latest write or heartbeat; `workers` is self.workers() when the caller has read it."""
        times = []
        for name in (SUMMARY_FILE, TRIALS_FILE, LOG_FILE):
            with contextlib.suppress(FileNotFoundError):
                times.append((self.path / name).stat().st_mtime)
        for w in self.workers() if workers is None else workers:
            times.append(float(w.get("heartbeat", 0)))
        return max(times) if times else None

    def status(self) -> RunStatus:
        s = self.run_summary()
        status, detail = s.status, s.detail
        workers = self.workers()  # read once: the browser calls this for every run at every scan
        live = [w["worker"] for w in workers if w["alive"]]
        if status == "running" and not live:
            status, detail = "stopped", "interrupted (no live search process)"
        return RunStatus(
            name=self.name,
            path=self.path,
            status=status if status in STATUSES else "stopped",
            detail=detail,
            paused=s.paused and status == "running",
            optimizer=s.optimizer,
            trials_done=s.trials_done,
            budget_trials=s.budget_trials,
            budget_timeout=s.budget_timeout,
            best_value=s.best_value,
            best_trial=s.best_number,
            created=s.created,
            last_activity=self.last_activity(workers),
            elapsed_s=s.elapsed_s,
            live_workers=live,
        )

    # -- history (the card's; search/export.py) ------------------------------------------------
    def history(self) -> list[float | None]:
        """The best combined score after each counted trial, in trial-number order (null until
        the first finished trial; interrupted trials are left out, their re-tries count)."""
        return best_so_far(self.counted_records())

    def counted_records(self) -> list[TrialRecord]:
        """The counted trials (interrupted ones left out, their re-tries in), by trial number."""
        return sorted((r for r in self.trial_records() if r.counted), key=lambda r: r.number)


def best_so_far(recs: list[TrialRecord]) -> list[float | None]:
    """The best combined score after each of recs (null until the first completed one)."""
    out: list[float | None] = []
    top: float | None = None
    for r in recs:
        v = r.value if r.complete else None
        if v is not None and (top is None or v > top):
            top = v
        out.append(top)
    return out
