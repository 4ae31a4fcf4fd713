"""What a dashboard knows about one run, read from its run directory (never from the search's memory).

`RunReader.read()` does the file I/O (in a worker thread); `RunState.apply()` folds the result in
(on the UI thread). Plot downsampling and the best recipe's heat-map grids are derived here too.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from search.labels import layers_text, param_labels, short_model_names
from search.records import RecordError, ResolvedRun, TrialRecord
from search.rundir import RunDir

from ..errors import MergelabError

LOG_TAIL_BYTES = 64 * 1024  # a viewer starts from the end of a long log
STATES = ("COMPLETE", "PRUNED", "FAIL")


# ------------------------------------------------------------------------------- live feed
class LiveFeed:
    """The search loop's `progress` callback when the search runs in this process.

    It only remembers the running trial (params, stage and how far along it is) for the dashboard
    to read; trial results still come from the run directory like for any other run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict | None = None

    def __call__(self, event: dict) -> None:
        with self._lock:
            kind = event.get("event")
            if kind == "trial_start":
                self._current = {"number": event["number"], "params": dict(event.get("params") or {}),
                                 "stage": None, "frac": None, "started": time.time()}
            elif kind == "stage" and self._current is not None and self._current["number"] == event.get("number"):
                self._current["stage"] = stage_name(event.get("stage"))
                frac = event.get("fraction", event.get("frac"))
                self._current["frac"] = float(frac) if isinstance(frac, (int, float)) else None
            elif kind == "trial_end":
                self._current = None

    def current(self) -> dict | None:
        with self._lock:
            return None if self._current is None else json.loads(json.dumps(self._current))


def stage_name(stage: Any) -> str | None:
    """A stage as the panel lists it: the loop reports a scorer as "eval NAME", the eval spec names
    it NAME; both must be one stage, not two."""
    if stage is None:
        return None
    s = str(stage).strip()
    return s[5:] if s.startswith("eval ") else s


# ------------------------------------------------------------------------------- reading
@dataclass
class Delta:
    """What changed on disk since the previous read."""

    new_trials: list[dict] = field(default_factory=list)
    reset: bool = False  # trials.jsonl was replaced: new_trials is the whole file
    summary: dict = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    workers: list[dict] = field(default_factory=list)
    control: str | None = None
    progress: dict = field(default_factory=dict)  # progress.json: the running trial's stage
    running: list[dict] = field(default_factory=list)  # [{number, worker, params, stage, frac, started, live}]


class _LogTail:
    """Follows log.txt from its last LOG_TAIL_BYTES; keeps a partial last line for the next read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset: int | None = None
        self._partial = ""

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                skip_first = False
                if self.offset is None or size < self.offset:
                    self.offset = max(0, size - LOG_TAIL_BYTES)
                    skip_first = self.offset > 0
                    self._partial = ""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self._partial + data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        if skip_first and lines:
            lines = lines[1:]  # began mid-line
        return [l for l in lines if l.strip()]


class RunReader:
    """Reads a run directory incrementally. Used from one thread at a time."""

    def __init__(self, run_dir: RunDir, feed: LiveFeed | None = None):
        self.rd = run_dir
        self.feed = feed
        self._tail = run_dir.follow()
        self._log = _LogTail(run_dir.path / "log.txt")
        self._study = None
        self._study_failed = False
        self._params_cache: dict[int, dict] = {}
        self._finished: set[int] = set()  # trial numbers with a record: not running any more

    def read(self) -> Delta:
        d = Delta()
        before = self._tail.offset
        d.new_trials = trial_lines(self._tail.poll())
        d.reset = self._tail.offset < before  # the tail starts over when the file shrank
        if d.reset:
            self._finished.clear()
        self._finished.update(int(r["number"]) for r in d.new_trials)
        d.summary = self.rd.summary()
        d.log_lines = self._log.poll()
        d.workers = self.rd.workers()
        d.control = self.rd.control()
        d.progress = read_progress(self.rd.path)
        d.running = self._running(d.workers, d.progress)
        return d

    def _running(self, workers: list[dict], progress: dict) -> list[dict]:
        out = []
        cur = self.feed.current() if self.feed is not None else None
        if cur is not None:
            out.append({**cur, "worker": "this process", "live": True})
        for w in workers:
            if not w.get("alive"):
                continue
            n = w.get("trial")
            prog = progress if progress_of(progress, w) else {}
            newer = prog and float(prog.get("time") or 0) > float(w.get("heartbeat") or 0)
            if newer and (n is None or int(prog["trial"]) > int(n)):
                n = prog["trial"]  # the heartbeat (every few seconds) lags the progress file
            if n is None or int(n) in self._finished or (cur is not None and cur["number"] == n):
                continue  # idle, or a trial whose record is in (the heartbeat has not caught up)
            n = int(n)
            if prog.get("trial") != n:
                prog = {}  # progress of the worker's previous trial: this one has not reported yet
            params = w.get("params") or self._params_of(n)
            out.append({"number": n, "worker": w.get("worker"), "params": params,
                        "stage": stage_name(prog.get("stage")), "frac": _frac(prog.get("frac")),
                        "started": prog.get("started") or w.get("trial_started"), "live": False})
        return out

    def _params_of(self, number: int) -> dict:
        """A running trial's params from the run's Optuna storage (another process runs it)."""
        if number in self._params_cache:
            return self._params_cache[number]
        study = self._open_study()
        if study is None:
            return {}
        try:
            from optuna.trial import TrialState

            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self._params_cache[t.number] = dict(t.params)
        except Exception:  # a storage hiccup must not stop the viewer; params show up next poll
            return {}
        return self._params_cache.get(number, {})

    def _open_study(self):
        if self._study is not None or self._study_failed:
            return self._study
        try:
            url = self.rd.storage_url()
            if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
                self._study_failed = True  # never create a database in a directory we only watch
                return None
            import optuna

            from search.storage import open_storage

            self._study = optuna.load_study(study_name=self.rd.study_name(), storage=open_storage(url, heartbeat=False))
        except Exception:
            self._study_failed = True
        return self._study


def trial_lines(lines: list) -> list[dict]:
    """The trials.jsonl lines that are trial records (search.records.TrialRecord checks each
    key's type once, here), as the mappings the views read; a line that is not one (a manual
    edit, a foreign tool) is left out, as a corrupt line is."""
    out = []
    for d in lines:
        try:
            TrialRecord.from_json(d)
        except RecordError:
            continue
        out.append(d)
    return out


PROGRESS_FILE = "progress.json"  # written by the search loop: the running trial's stage


def read_progress(run_path: Path) -> dict:
    """RUN/progress.json ({"trial", "stage", "frac", "time", ...}); {} when absent or unreadable."""
    try:
        d = json.loads((Path(run_path) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or not isinstance(d.get("trial"), int) or isinstance(d.get("trial"), bool):
        return {}
    return d


def progress_of(progress: dict, worker: dict) -> bool:
    """Whether progress.json speaks about this live worker's current work: its own (when the file
    names a worker) and not older than the worker's session."""
    if not progress:
        return False
    if progress.get("worker") not in (None, worker.get("worker")):
        return False
    t = progress.get("time")
    started = worker.get("started")
    return not (isinstance(t, (int, float)) and isinstance(started, (int, float)) and t < started)


def _frac(v: Any) -> float | None:
    return min(1.0, max(0.0, float(v))) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ------------------------------------------------------------------------------- state
def as_resolved(resolved: ResolvedRun | dict | None) -> ResolvedRun:
    """A run's resolved config as a ResolvedRun; a viewer shows what it can of a mapping that is
    not one (a damaged key: the defaults)."""
    if isinstance(resolved, ResolvedRun):
        return resolved
    try:
        return ResolvedRun.from_json(resolved or {})
    except RecordError:
        return ResolvedRun()


def eval_scorer_names(resolved: ResolvedRun | dict) -> list[str]:
    """Scorer names of the run's eval spec (the stages after merge), [] when unreadable."""
    spec = as_resolved(resolved).eval
    try:
        if isinstance(spec, str):
            import yaml

            spec = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
        return [str(s.get("name")) for s in (spec or {}).get("scorers", []) if isinstance(s, dict)]
    except Exception:  # the spec may live on another machine; stages then show as they arrive
        return []


@dataclass
class Changes:
    trials: bool = False
    summary: bool = False
    best: bool = False
    log: list[str] = field(default_factory=list)
    running: bool = False


class RunState:
    """Everything the dashboard shows, kept on the UI thread."""

    def __init__(self, run_dir: RunDir):
        self.rd = run_dir
        try:
            self.resolved = run_dir.resolved_run()
        except (FileNotFoundError, MergelabError):  # gone or damaged: the dashboard shows the rest
            self.resolved = ResolvedRun()
        self.trials: list[dict] = []  # file order
        self.by_number: dict[int, dict] = {}
        self._order: list[int] = []  # sorted trial numbers with a value
        self.summary: dict = {}
        self.workers: list[dict] = []
        self.control: str | None = None
        self.running: list[dict] = []
        self.metric_names: list[str] = []
        self.devices = False  # whether any trial records its device
        self.stages = ["merge", *eval_scorer_names(self.resolved)]
        self.version = 0  # bumped whenever trials change (views cache on it)
        # set by the dashboard: whether a search it launched (thread or process) is still starting
        self.launching: Callable[[], bool] = lambda: False
        self.labels = param_labels(self.resolved)  # searched parameter -> readable label

    # -- folding a delta in
    def apply(self, d: Delta) -> Changes:
        ch = Changes()
        if d.reset:
            self.trials.clear()
            self.by_number.clear()
            self._order.clear()
        for rec in d.new_trials:
            if not isinstance(rec, dict) or "number" not in rec:
                continue
            n = int(rec["number"])
            if n not in self.by_number:
                bisect.insort(self._order, n)
            self.by_number[n] = rec
            self.trials.append(rec)
            for m in rec.get("metrics") or {}:
                if m not in self.metric_names:
                    self.metric_names.append(m)
            self.devices = self.devices or bool(rec.get("device"))
        if d.new_trials or d.reset:
            ch.trials = True
            self.version += 1
        if d.summary and d.summary != self.summary:
            old_best = (self.summary.get("best") or {}).get("number")
            self.summary = d.summary
            ch.summary = True
            ch.best = (self.summary.get("best") or {}).get("number") != old_best
        if d.workers != self.workers or d.control != self.control:
            ch.summary = True
        self.workers, self.control = d.workers, d.control
        if d.running != self.running:
            self.running = d.running
            ch.running = True
        ch.log = d.log_lines
        return ch

    # -- derived values
    @property
    def name(self) -> str:
        return self.summary.get("name") or self.rd.name

    @property
    def best(self) -> dict | None:
        b = self.summary.get("best")
        if b and b.get("number") in self.by_number:
            return self.by_number[b["number"]]
        return b or None

    @property
    def multi(self) -> bool:
        return len(self.summary.get("directions") or self.resolved.directions) > 1

    @property
    def objective_names(self) -> list[str]:
        return list(self.summary.get("objective_names") or self.resolved.objective_names)

    def status(self) -> str:
        """What the run is doing now, as the header says it: "running" only with a live search
        process, "starting" while a search this UI launched has not yet said so, "new" for a run
        directory no search has started in."""
        s = self.summary.get("status", "stopped")
        if s == "running" and any(w.get("alive") for w in self.workers):
            return "running"
        if self.launching():
            return "starting"
        if s == "running":
            return "stopped"  # the process died without a chance to say so
        if s == "stopped" and self.summary.get("detail") == "created" and not self.summary.get("trials_done"):
            return "new"
        return s

    def detail(self) -> str:
        d = str(self.summary.get("detail") or "")
        if d == "resumed" and not self.summary.get("trials_done"):
            return "started"  # a run with a queued warm-start trial but none finished was not resumed
        return d

    def is_live(self) -> bool:
        return self.status() == "running"

    def paused(self) -> bool:
        return bool(self.summary.get("paused")) and self.is_live()

    def elapsed(self, now: float) -> float:
        """Search time: the summary's, plus the time since it was written while a search runs
        (not while it is paused: the loop adds no search time then)."""
        e = float(self.summary.get("elapsed_s") or 0.0)
        if self.is_live() and not self.paused() and self.summary.get("updated"):
            e += max(0.0, now - float(self.summary["updated"]))
        return e

    def eta(self, now: float) -> float | None:
        """Seconds left: the remaining trials at the mean pace so far, capped by a time budget."""
        if not self.is_live():
            return None
        budget = self.summary.get("budget") or {}
        done = int(self.summary.get("trials_done") or 0)
        elapsed = self.elapsed(now)
        left = []
        if budget.get("trials"):
            if done > 0:
                left.append(max(0.0, (int(budget["trials"]) - done) * elapsed / done))
        if budget.get("timeout"):
            left.append(max(0.0, float(budget["timeout"]) - elapsed))
        return min(left) if left else None

    def series(self) -> tuple[list[int], list[float]]:
        """(trial numbers, combined scores) of scored trials, by trial number."""
        xs, ys = [], []
        for n in self._order:
            v = self.by_number[n].get("value")
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(n)
                ys.append(float(v))
        return xs, ys

    def objective_series(self, k: int) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for n in self._order:
            vals = self.by_number[n].get("values")
            if vals and len(vals) > k and isinstance(vals[k], (int, float)):
                xs.append(n)
                ys.append(float(vals[k]))
        return xs, ys

    def pareto(self) -> list[dict]:
        return list(self.summary.get("pareto") or [])


# ------------------------------------------------------------------------------- plot helpers
def best_so_far(ys: list[float]) -> list[float]:
    out, best = [], -math.inf
    for y in ys:
        best = max(best, y)
        out.append(best)
    return out


def downsample(xs: list[float], ys: list[float], max_points: int) -> tuple[list[float], list[float]]:
    """At most max_points points keeping each bucket's lowest and highest value (the envelope a
    scatter plot shows), in x order. Short series are returned as they are."""
    n = len(xs)
    if n <= max_points:
        return list(xs), list(ys)
    buckets = max(1, max_points // 2)
    ox, oy = [], []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if hi <= lo:
            continue
        i_min = min(range(lo, hi), key=ys.__getitem__)
        i_max = max(range(lo, hi), key=ys.__getitem__)
        for i in sorted({i_min, i_max}):
            ox.append(xs[i])
            oy.append(ys[i])
    return ox, oy


def downsample_monotone(xs: list[float], ys: list[float], max_points: int) -> tuple[list[float], list[float]]:
    """A step line (best so far) thinned to its change points, then to max_points evenly."""
    if not xs:
        return [], []
    px, py = [xs[0]], [ys[0]]
    for x, y in zip(xs[1:], ys[1:]):
        if y != py[-1]:
            px.append(x)
            py.append(y)
    if px[-1] != xs[-1]:
        px.append(xs[-1])
        py.append(ys[-1])
    if len(px) > max_points:
        idx = sorted({round(i * (len(px) - 1) / (max_points - 1)) for i in range(max_points)})
        px, py = [px[i] for i in idx], [py[i] for i in idx]
    return px, py


# ------------------------------------------------------------------------------- heat map data
@dataclass
class HeatGrid:
    """One searched parameter of a recipe: rows (layer groups, per filter) x columns (models)."""

    param: str
    rows: list[str]
    cols: list[str]
    values: list[list[float | None]]
    low: float
    high: float


def _group_spans(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """First and last layer of each layer group (the search space's contiguous split)."""
    spans = []
    for k in range(groups):
        layers = [l for l in range(num_layers) if min(groups - 1, l * groups // num_layers) == k]
        if layers:
            spans.append((layers[0], layers[-1]))
    return spans


def _entries(value: Any, filters: set[str]) -> list[tuple[str, Any]]:
    """A recipe parameter value as (row family, scalar or per-layer list) pairs."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out: list[tuple[str, Any]] = []
        seen = set()
        for e in value:
            f = e.get("filter")
            # a filter that is not one of the config's `filters` names an io tensor (io_group)
            label = "other" if f is None else (str(f) if f in filters else "io")
            if label in seen:  # the io group repeats one value for each io tensor
                continue
            seen.add(label)
            out.append((label, e.get("value")))
        if [l for l, _ in out] == ["other"]:
            return [("all", out[0][1])]
        return out
    return [("all", value)]


def recipe_heatmaps(recipe: dict | None, resolved: ResolvedRun | dict) -> list[HeatGrid]:
    """The heat maps of a recipe's searched model parameters (weight, density...)."""
    if not recipe:
        return []
    resolved = as_resolved(resolved)
    models = [m for m in recipe.get("models") or [] if isinstance(m, dict)]
    cols = short_model_names([m.get("model", "?") for m in models])
    pdefs = resolved.params
    searched = []
    ranges: dict[str, tuple[float, float]] = {}
    for p in pdefs:
        if p.get("kind") == "model" and p.get("param"):
            if p["param"] not in searched:
                searched.append(p["param"])
            lo, hi = ranges.get(p["param"], (math.inf, -math.inf))
            ranges[p["param"]] = (min(lo, float(p["low"])), max(hi, float(p["high"])))
    if not searched:  # an unknown run: show every numeric model parameter
        for m in models:
            for k in (m.get("parameters") or {}):
                if k not in searched:
                    searched.append(k)
    filters = set(resolved.filters or [])
    L = resolved.num_layers
    K = int(resolved.layer_groups or 1)
    grids = []
    for pname in searched:
        per_model = [_entries((m.get("parameters") or {}).get(pname), filters) for m in models]
        families: list[str] = []
        for ents in per_model:
            for label, _ in ents:
                if label not in families:
                    families.append(label)
        # rows: families x layer groups (a scalar family is one row)
        rows: list[tuple[str, str, tuple[int, int] | None]] = []
        for fam in families:
            sample = next((v for ents in per_model for l, v in ents if l == fam), None)
            if isinstance(sample, list):
                n_layers = int(L) if L else len(sample)
                spans = _group_spans(n_layers, min(K, n_layers)) if K > 1 else [(0, n_layers - 1)]
                for a, b in spans:
                    span = layers_text((a, b))  # as the parameter labels say it: "layers 0–1"
                    rows.append((fam, span if fam == "all" else f"{fam} {span}", (a, b)))
            else:
                rows.append((fam, "all layers" if fam == "all" else fam, None))
        values: list[list[float | None]] = []
        for fam, _, span in rows:
            row = []
            for ents in per_model:
                v = next((v for l, v in ents if l == fam), None)
                if isinstance(v, list) and span is not None:
                    v = v[span[0]] if span[0] < len(v) else None
                row.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
            values.append(row)
        flat = [v for r in values for v in r if v is not None]
        if not flat:
            continue
        lo, hi = ranges.get(pname, (min(flat), max(flat)))
        lo, hi = min(lo, min(flat)), max(hi, max(flat))
        grids.append(HeatGrid(pname, [r[1] for r in rows], cols, values, lo, hi))
    return grids


def global_values(recipe: dict | None, resolved: ResolvedRun | dict) -> dict[str, Any]:
    """Searched global parameters (lambda...) of a recipe."""
    if not recipe:
        return {}
    names = [p["param"] for p in as_resolved(resolved).params if p.get("kind") == "global"]
    gp = recipe.get("parameters") or {}
    return {n: gp.get(n) for n in names if n in gp}


# ------------------------------------------------------------------------------- formatting
def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def log_stamp(t: float) -> str:
    """The time stamp of a log line, as search.rundir.RunDir.log writes it (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def fmt_num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "-"
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


Clock = Callable[[], float]
