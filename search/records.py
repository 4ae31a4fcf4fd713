"""Typed views of a run directory's JSON files, read once: TrialRecord (one trials.jsonl line),
RunSummary (summary.json) and ResolvedRun (resolved.json).

Pure data: this module imports nothing from search/ or mergelab, so the run directory
(search/rundir.py) and every reader can use it without an import cycle. The JSON format is the
one search/rundir.py describes (TRIAL RECORD); from_json accepts any line an older mergelab
wrote (missing optional keys take their defaults, unknown keys are kept in `extra`), and
to_json gives back the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RECORD_ATTR = "mergelab_record"  # the Optuna trial user attribute holding the trial's record (JSON)
TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL")


class RecordError(ValueError):
    """A run file's JSON that is not the record it should be (says which key and why)."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(d: dict, key: str, ok, want: str, optional: bool = True) -> Any:
    v = d.get(key)
    if v is None and optional:
        return None
    if not ok(v):
        raise RecordError(f"trial record {d.get('number', '?')}: `{key}` is {v!r}, expected {want}")
    return v


_CORE = ("number", "state", "params", "recipe", "value", "values", "metrics", "scores", "error",
         "interrupted", "retry_of", "timings", "started", "finished", "device", "kernels", "worker")
_OPTIONAL = ("path", "fusion")  # written only when the trial has them


@dataclass(frozen=True)
class TrialRecord:
    """One finished, failed or interrupted trial (a trials.jsonl line)."""

    number: int
    state: str  # one of TRIAL_STATES
    params: dict[str, float] = field(default_factory=dict)
    recipe: dict | None = None
    value: float | None = None
    values: list[float | None] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False
    retry_of: int | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    device: str | None = None
    kernels: dict[str, int] | None = None
    worker: str | None = None
    path: list | None = None  # data flow: [[model, layer, scale], ...]
    fusion: dict | None = None  # a hybrid candidate's logit fusion
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def counted(self) -> bool:
        """Counts towards the budget (an interrupted trial is re-tried instead)."""
        return not self.interrupted

    @classmethod
    def from_json(cls, d: Any) -> "TrialRecord":
        """A record from a parsed trials.jsonl line; RecordError when a key has the wrong type."""
        if not isinstance(d, dict):
            raise RecordError(f"a trial record is a JSON object, not {type(d).__name__}")
        n = _check(d, "number", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer",
                   optional=False)
        state = _check(d, "state", lambda v: v in TRIAL_STATES, f"one of {TRIAL_STATES}", optional=False)
        is_dict = lambda v: isinstance(v, dict)  # noqa: E731
        return cls(
            number=n,
            state=state,
            params=dict(_check(d, "params", is_dict, "a mapping") or {}),
            recipe=_check(d, "recipe", is_dict, "a recipe mapping"),
            value=_check(d, "value", _num, "a number"),
            values=_check(d, "values", lambda v: isinstance(v, list) and all(x is None or _num(x) for x in v),
                          "a list of numbers"),
            metrics=dict(_check(d, "metrics", is_dict, "a mapping") or {}),
            scores=dict(_check(d, "scores", is_dict, "a mapping") or {}),
            error=_check(d, "error", lambda v: isinstance(v, str), "text"),
            interrupted=bool(_check(d, "interrupted", lambda v: isinstance(v, bool), "true or false")),
            retry_of=_check(d, "retry_of", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
            timings=dict(_check(d, "timings", is_dict, "a mapping") or {}),
            started=_check(d, "started", _num, "a time (epoch s)"),
            finished=_check(d, "finished", _num, "a time (epoch s)"),
            device=_check(d, "device", lambda v: isinstance(v, str), "a device name"),
            kernels=_check(d, "kernels", is_dict, "a mapping"),
            worker=_check(d, "worker", lambda v: isinstance(v, str), "a worker id"),
            path=_check(d, "path", lambda v: isinstance(v, list), "a list"),
            fusion=_check(d, "fusion", is_dict, "a mapping"),
            extra={k: v for k, v in d.items() if k not in _CORE and k not in _OPTIONAL},
        )

    def to_json(self) -> dict:
        """The line's mapping, with the keys the loop writes (path / fusion only when present)."""
        out = {k: getattr(self, k) for k in _CORE}
        for k in _OPTIONAL:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out.update(self.extra)
        return out


_SUMMARY_KEYS = ("name", "status", "detail", "paused", "optimizer", "directions", "objective_names", "budget",
                 "trials_done", "trials_complete", "trials_failed", "trials_pruned", "elapsed_s", "created",
                 "updated", "best", "pareto", "device", "seed", "storage")


def _best_ok(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("number"), int) and not isinstance(v.get("number"), bool)
            and (v.get("value") is None or _num(v.get("value"))))


@dataclass(frozen=True)
class RunSummary:
    """summary.json (search/rundir.py, SUMMARY), read once. `best` keeps the file's mapping
    ({number, value, values, metrics, scores, params[, fusion]}), checked to have an integer
    number and a numeric (or null) value."""

    name: str | None = None
    status: str = "stopped"
    detail: str = ""
    paused: bool = False
    optimizer: str | None = None
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    objective_names: list[str] = field(default_factory=lambda: ["combined"])
    budget_trials: int | None = None
    budget_timeout: float | None = None
    trials_done: int = 0
    trials_complete: int = 0
    trials_failed: int = 0
    trials_pruned: int = 0
    elapsed_s: float = 0.0
    created: float | None = None
    updated: float | None = None
    best: dict | None = None
    pareto: list[dict] = field(default_factory=list)
    device: str | None = None
    seed: int | None = None
    storage: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_number(self) -> int | None:
        return self.best["number"] if self.best else None

    @property
    def best_value(self) -> float | None:
        return self.best.get("value") if self.best else None

    @classmethod
    def from_json(cls, d: Any, strict: bool = True) -> "RunSummary":
        """The summary of a parsed summary.json. strict: RecordError names the first key with a
        wrong type; not strict (a viewer scanning many runs): such a key takes its default."""
        if not isinstance(d, dict):
            if strict:
                raise RecordError(f"summary.json holds a JSON object, not {type(d).__name__}")
            d = {}
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        is_str = lambda v: isinstance(v, str)  # noqa: E731
        str_list = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
        budget = d.get("budget") if isinstance(d.get("budget"), dict) else {}
        checks = {
            "name": (is_str, "text", d.get("name")),
            "status": (is_str, "text", d.get("status")),
            "detail": (is_str, "text", d.get("detail")),
            "paused": (lambda v: isinstance(v, bool), "true or false", d.get("paused")),
            "optimizer": (is_str, "an optimizer name", d.get("optimizer")),
            "directions": (str_list, "a list of directions", d.get("directions")),
            "objective_names": (str_list, "a list of names", d.get("objective_names")),
            "budget_trials": (is_int, "an integer (budget.trials)", budget.get("trials")),
            "budget_timeout": (_num, "a number of seconds (budget.timeout)", budget.get("timeout")),
            "trials_done": (is_int, "an integer", d.get("trials_done")),
            "trials_complete": (is_int, "an integer", d.get("trials_complete")),
            "trials_failed": (is_int, "an integer", d.get("trials_failed")),
            "trials_pruned": (is_int, "an integer", d.get("trials_pruned")),
            "elapsed_s": (_num, "a number of seconds", d.get("elapsed_s")),
            "created": (_num, "a time (epoch s)", d.get("created")),
            "updated": (_num, "a time (epoch s)", d.get("updated")),
            "best": (_best_ok, "a trial mapping with an integer number", d.get("best")),
            "pareto": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list", d.get("pareto")),
            "device": (is_str, "a device name", d.get("device")),
            "seed": (is_int, "an integer", d.get("seed")),
            "storage": (is_str, "a storage URL", d.get("storage")),
        }
        kw: dict[str, Any] = {}
        for key, (ok, want, v) in checks.items():
            if v is None:
                continue
            if not ok(v):
                if strict:
                    raise RecordError(f"summary.json: `{key}` is {v!r}, expected {want}")
                continue
            kw[key] = v
        if "elapsed_s" in kw:
            kw["elapsed_s"] = float(kw["elapsed_s"])
        return cls(**kw, extra={k: v for k, v in d.items() if k not in _SUMMARY_KEYS})


# -- resolved.json -------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _spec(v: Any) -> bool:  # an eval spec: its file's path, or the mapping itself
    return isinstance(v, (str, dict))


def _params_ok(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(p, dict) and isinstance(p.get("name", ""), str) for p in v)


def _budget_ok(v: Any) -> bool:
    return (isinstance(v, dict) and (v.get("trials") is None or _is_int(v["trials"]))
            and (v.get("timeout") is None or _num(v["timeout"])))


# key: (check, what it should be); every key here is optional and null means "not set"
_RESOLVED_CHECKS: dict[str, tuple[Any, str]] = {
    "base_model": (_is_str, "a model reference (text)"),
    "models": (_str_list, "a list of model references"),
    "method": (lambda v: _is_str(v) or _str_list(v), "a merge method name or a list of them"),
    "params": (_params_ok, "a list of parameter mappings, each with a text `name`"),
    "num_layers": (_is_int, "an integer"),
    "layer_groups": (_is_int, "an integer"),
    "filters": (_str_list, "a list of filter names"),
    "optimizer": (lambda v: isinstance(v, dict) and (v.get("name") is None or _is_str(v["name"])),
                  "an optimizer mapping with a text `name`"),
    "budget": (_budget_ok, "a mapping {trials: integer, timeout: seconds}"),
    "seed": (_is_int, "an integer"),
    "device": (_is_str, "a device name"),
    "storage": (_is_str, "a storage URL"),
    "study_name": (_is_str, "a study name (text)"),
    "eval": (_spec, "an eval spec (a file path or a mapping)"),
    "eval_base_dir": (_is_str, "a directory (text)"),
    "test_eval": (_spec, "an eval spec (a file path or a mapping)"),
    "warm_start": (_is_str, "a recipe file path"),
    "objective_names": (_str_list, "a list of names"),
    "directions": (_str_list, "a list of directions"),
    "versions": (lambda v: isinstance(v, dict), "a mapping of package versions"),
    "config_sha256": (_is_str, "a SHA-256 (hex text)"),
    "created": (_num, "a time (epoch s)"),
    "given": (lambda v: isinstance(v, dict), "the config as given (a mapping)"),
    "cwd": (_is_str, "a directory (text)"),
}


@dataclass(frozen=True)
class ResolvedRun:
    """resolved.json (search/rundir.py), read once: the run's config with absolute paths plus
    what the loop added at creation (layer count, searched parameters, storage, versions...).
    Keys this version does not type (space, model_space, recipe, pruner, fusion...) are kept in
    `extra`; `keys` is the file's key order, so to_json() gives back the same mapping."""

    base_model: str | None = None
    models: list[str] = field(default_factory=list)
    method: str | list[str] | None = None
    params: list[dict] = field(default_factory=list)
    num_layers: int | None = None
    layer_groups: int | None = None
    filters: list[str] | None = None
    optimizer: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    seed: int | None = None
    device: str | None = None
    storage: str | None = None
    study_name: str | None = None
    eval: str | dict | None = None
    eval_base_dir: str | None = None
    test_eval: str | dict | None = None
    warm_start: str | None = None
    objective_names: list[str] = field(default_factory=lambda: ["combined"])
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    versions: dict = field(default_factory=dict)
    config_sha256: str | None = None
    created: float | None = None
    given: dict | None = None
    cwd: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # the file's keys in order (to_json keeps them, and only them, plus changes)
    null_keys: frozenset[str] = frozenset()  # typed keys the file holds as null (written back as null)

    @property
    def optimizer_name(self) -> str | None:
        return self.optimizer.get("name")

    @property
    def methods(self) -> list[str]:
        """The merge method(s) searched over (search.labels reads a run through this)."""
        return [self.method] if isinstance(self.method, str) else list(self.method or [])

    @property
    def budget_trials(self) -> int | None:
        return self.budget.get("trials")

    @property
    def multi(self) -> bool:
        return len(self.directions) > 1

    @property
    def base_dir(self) -> str:
        """Where relative paths of the eval spec are read from (the config's folder)."""
        return self.eval_base_dir or "."

    @classmethod
    def from_json(cls, d: Any, source: str = "resolved.json") -> "ResolvedRun":
        """The record of a parsed resolved.json; RecordError names the first key with a wrong
        type (and `source`, the file). A missing key takes its default; a null one too."""
        if not isinstance(d, dict):
            raise RecordError(f"{source} holds a JSON object, not {type(d).__name__}")
        kw: dict[str, Any] = {}
        for key, (ok, want) in _RESOLVED_CHECKS.items():
            v = d.get(key)
            if v is None:
                continue
            if not ok(v):
                raise RecordError(f"{source}: `{key}` is {v!r:.120}, expected {want}")
            kw[key] = v
        return cls(**kw, extra={k: v for k, v in d.items() if k not in _RESOLVED_CHECKS}, keys=tuple(d),
                   null_keys=frozenset(k for k in _RESOLVED_CHECKS if k in d and d[k] is None))

    def to_json(self) -> dict:
        """The mapping resolved.json holds: the file's keys in its order (a key the file had as
        null stays null), then a typed key set since (dataclasses.replace) and new extra keys."""
        default = ResolvedRun()
        out: dict[str, Any] = {}
        for k in self.keys:
            if k in _RESOLVED_CHECKS:
                v = getattr(self, k)
                out[k] = None if k in self.null_keys and v == getattr(default, k) else v
            elif k in self.extra:
                out[k] = self.extra[k]
        for k in _RESOLVED_CHECKS:
            if k not in out and getattr(self, k) != getattr(default, k):
                out[k] = getattr(self, k)
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out
