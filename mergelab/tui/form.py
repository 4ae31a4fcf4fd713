"""The new-search form's logic, apart from its widgets: form values -> search config YAML, checked
with the command line's own validators (search.config, search.space, search.validate) field by field.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergelabError

# form fields a validator message can name (its first `backticked` word says which)
FIELDS = ("name", "base_model", "models", "method", "space", "layer_groups", "filters", "io_group",
          "layer_sources", "eval", "test_eval", "optimizer", "budget", "seed", "device")
GENERAL = "general"  # a message that names no field
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class ParamChoice:
    """One operator parameter in the form: searched or not, and its range (or fixed value) text."""

    name: str
    searched: bool
    text: str


@dataclass
class FormValues:
    """What the form holds, as typed."""

    name: str = ""
    base_model: str = ""
    models: str = ""  # comma-separated paths / hub ids
    methods: list[str] = field(default_factory=lambda: ["tsv"])  # the search config's default
    params: dict[str, ParamChoice] = field(default_factory=dict)
    layer_groups: str = "1"
    filters: str = ""
    io_group: bool = False
    layer_sources: bool = False
    eval: str = ""
    test_eval: str = ""  # optional held-out spec (search config `test_eval`)
    optimizer: str = "cmaes"
    trials: str = "20"
    timeout: str = ""
    seed: str = "0"
    device: str = "cpu"


@dataclass
class FormCheck:
    """The result of checking the form: messages by field, the config and what it searches."""

    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    yaml_text: str = ""
    size_text: str = ""
    scorers_text: str = ""
    complete: bool = False  # every check ran (nothing left for the search's start to find)
    missing: set[str] = field(default_factory=set)  # required fields left empty (not yet an error to shout)

    @property
    def ok(self) -> bool:
        return not self.errors


# ------------------------------------------------------------------------------- registry
def operator_params(methods: list[str]):
    """The parameters the chosen operators take, in registry order, each once (first wins)."""
    from operators import get_operator

    out: dict[str, Any] = {}
    for m in methods:
        try:
            op = get_operator(m)
        except KeyError:
            continue
        for p in op.params:
            out.setdefault(p.name, p)
    return list(out.values())


def default_choice(spec) -> ParamChoice:
    """Pre-filled from the registry: the declared search range, searched when the operator needs
    the parameter or it shapes the merge per model (weight, density)."""
    if spec.search_range is not None:
        lo, hi = spec.search_range
        searched = spec.required or spec.name in ("weight", "density")
        return ParamChoice(spec.name, searched, f"{lo:g}, {hi:g}")
    text = "" if spec.default is None else yaml.safe_dump(spec.default).split("\n")[0]
    return ParamChoice(spec.name, False, text)


def sync_params(values: FormValues) -> list:
    """Keep one ParamChoice per parameter of the chosen operators (kept when already there)."""
    specs = operator_params(values.methods)
    values.params = {s.name: values.params.get(s.name) or default_choice(s) for s in specs}
    return specs


# ------------------------------------------------------------------------------- values -> config
def _scalar(text: str) -> Any:
    """A typed value the way the YAML file would read it ("20" -> 20, "abc" stays text)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(v, (dict, list)) else v


def parse_param_text(text: str) -> Any:
    """"0, 1.5" or "[0, 1.5]" -> [0, 1.5] (a range); "0.5" -> 0.5, "true" -> True (fixed);
    "" -> None (the registry's range)."""
    t = text.strip()
    if not t:
        return None
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        v = yaml.safe_load(f"[{t}]")
    except yaml.YAMLError:
        return text.strip()
    if len(v) == 1:
        return v[0]
    return v


def split_list(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]


def _abs(ref: str) -> str:
    """Local paths become absolute (the config then runs from any directory); hub ids stay."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def build_config(values: FormValues) -> dict[str, Any]:
    """The search config mapping the form describes (what goes into the YAML file)."""
    cfg: dict[str, Any] = {"base_model": _abs(values.base_model.strip()),
                           "models": [_abs(m) for m in split_list(values.models)]}
    methods = list(values.methods)
    cfg["method"] = methods[0] if len(methods) == 1 else methods
    space: dict[str, Any] = {}
    for name, ch in values.params.items():
        if ch.searched:
            space[name] = parse_param_text(ch.text)
    cfg["space"] = space
    cfg["layer_groups"] = _scalar(values.layer_groups) if values.layer_groups.strip() else 1
    if split_list(values.filters):
        cfg["filters"] = split_list(values.filters)
    if values.io_group:
        cfg["io_group"] = True
    if values.layer_sources:
        cfg["layer_sources"] = True
    cfg["eval"] = _abs(values.eval.strip())
    if values.test_eval.strip():
        cfg["test_eval"] = _abs(values.test_eval.strip())
    cfg["optimizer"] = values.optimizer
    budget: dict[str, Any] = {}
    if values.trials.strip():
        budget["trials"] = _scalar(values.trials)
    if values.timeout.strip():
        budget["timeout"] = _scalar(values.timeout)
    cfg["budget"] = budget or {"trials": None}
    cfg["seed"] = _scalar(values.seed) if values.seed.strip() else 0
    cfg["device"] = values.device.strip() or "cpu"
    return cfg


def config_yaml(cfg: dict[str, Any], name: str = "") -> str:
    head = f"# search config written by the mergelab terminal UI{f' for run {name}' if name else ''}.\n" \
           "# It runs unchanged with `mergelab search THIS_FILE`.\n"
    return head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------- checking
def field_of(message: str) -> str:
    """Which form field a validator's message is about: the first `backticked` config key in it."""
    for tok in re.findall(r"`([^`]+)`", message):
        key = re.split(r"[:\s\[]", tok, maxsplit=1)[0]
        root = key.split(".")[0]
        if root == "space" and "." in key:
            return key
        if root == "model_space":
            return "space"
        if root in FIELDS:
            return root
    return GENERAL


def space_size_text(space) -> str:
    """How big the search space is: numbers searched per parameter, and the choices' cardinality."""
    per: dict[str, int] = {}
    choices: list[str] = []
    n_sources = 0
    for p in space.params:
        if p.kind in ("model", "global"):
            per[p.param] = per.get(p.param, 0) + 1
        elif p.kind == "method":
            choices.append(f"method: 1 of {len(space.methods)}")
        elif p.kind == "source":
            n_sources += 1
    if n_sources:
        choices.append(f"layer source: {n_sources} group{'s' if n_sources > 1 else ''} x "
                       f"{len(space.models) + 1} choices")
    parts = [f"{name} {n}" for name, n in per.items()]
    text = f"{len(space.params)} searched numbers ({', '.join(parts)})" if parts else \
        f"{len(space.params)} searched numbers"
    if choices:
        text += "; choices: " + ", ".join(choices)
    return text


def _scorers_text(spec) -> str:
    out = []
    for s in spec.scorers:
        what = getattr(s, "type", "?")
        data = getattr(s, "data", None) or getattr(s, "task", None) or getattr(s, "task_yaml", None)
        out.append(f"{s.name} ({what}{', ' + Path(str(data)).name if data else ''}, weight {s.weight:g})")
    return f"{len(out)} scorer{'s' if len(out) != 1 else ''}: " + "; ".join(out)


def _add(errors: dict[str, str], message: str, where: str | None = None) -> None:
    key = where or field_of(message)
    errors.setdefault(key, message)


def check_name(name: str, runs_dir: str | Path) -> str | None:
    if not name:
        return "Give the run a name: it becomes the run directory under the runs directory."
    if not _NAME_RE.match(name):
        return (f"The run name `{name}` may hold letters, digits, '.', '_' and '-' only (it becomes a "
                "directory name).")
    p = Path(runs_dir) / name
    if p.exists() and any(p.iterdir()):
        return (f"Run directory {p} already exists and is not empty. Pick another name (or resume "
                "that run from the browser with r).")
    return None


def _model_ref_errors(cfg: dict[str, Any], errors: dict[str, str], notes: dict[str, str]) -> bool:
    """Check each model reference without downloading; True when all are local directories."""
    from mergelab.sources import resolve_local_path

    all_local = True
    refs = [("base_model", "base_model", cfg.get("base_model"))] + \
        [("models", f"models[{i}]", r) for i, r in enumerate(cfg.get("models") or [])]
    for form_field, field_name, ref in refs:
        if not isinstance(ref, str) or not ref:
            continue
        try:
            p = resolve_local_path(ref, download=False)
        except MergelabError as e:
            _add(errors, f"search config `{field_name}`: {e}", form_field)
            all_local = False
            continue
        if not p.exists():
            all_local = False
            first = Path(ref.partition("@")[0]).parts[0]
            if Path(first).expanduser().is_dir():  # `models/bsae`: a local folder's typo, not a Hub id
                _add(errors, f"search config `{field_name}`: there is no directory {ref} (relative to "
                             f"{Path.cwd()}), though {first}/ exists here. Check the name; a Hub id "
                             "(org/name) must not start with a local folder's name.", form_field)
                continue
            notes[form_field] = f"{ref}: a Hub id, fetched and checked when the search starts"
    return all_local


def check_form(values: FormValues, runs_dir: str | Path = "runs") -> FormCheck:
    """Every check the command line makes before a search, with its own messages, by field.

    Messages come from search.config / search.space / search.validate / mergelab.eval unchanged; each
    is filed under the field it names (see field_of)."""
    from search.config import parse_search_config
    from search.validate import build_space, missing_spec_file, validate_config

    res = FormCheck()
    name_err = check_name(values.name.strip(), runs_dir)
    if name_err:
        res.errors["name"] = name_err
    if not values.methods:
        res.errors["method"] = "Choose at least one operator (space toggles one in the list)."
    cfg_dict = build_config(values)
    res.config = cfg_dict
    res.yaml_text = config_yaml(cfg_dict, values.name.strip())
    for f, text in (("base_model", values.base_model), ("models", values.models), ("eval", values.eval)):
        if not text.strip():
            res.missing.add(f)
    if not values.base_model.strip():
        res.errors["base_model"] = "search config: missing field `base_model`: give the base model's directory or Hub id."
    if not split_list(values.models):
        res.errors["models"] = "search config `models`: give at least one model to merge (directories or Hub ids, separated by commas)."
    if not values.eval.strip():
        res.errors["eval"] = "search config: missing field `eval`: give the path of an eval spec YAML."
    # the models are checked as soon as they are typed, before the rest of the form is filled
    all_local = _model_ref_errors(cfg_dict, res.errors, res.notes)
    if any(f in res.errors for f in ("base_model", "models", "eval", "method")):
        return res
    try:
        cfg = parse_search_config(copy.deepcopy(cfg_dict), "search config")
    except MergelabError as e:
        _add(res.errors, str(e))
        return res
    # each parameter on its own, so every bad range shows beside its row at once
    for pname, value in cfg.space.items():
        one = cfg.model_copy(update={"space": {pname: value}, "model_space": {}, "layer_groups": 1,
                                     "filters": None, "io_group": False, "layer_sources": False})
        try:
            build_space(one, None)
        except MergelabError as e:
            if f"`space.{pname}" in str(e):
                res.errors[f"space.{pname}"] = str(e)
    # the eval spec and its scorers (shown under the field)
    ev = cfg.eval
    for f, ref in (("eval", ev), ("test_eval", cfg.test_eval)):
        problem = missing_spec_file(f, ref)
        if problem:
            _add(res.errors, problem)
    if isinstance(ev, str) and Path(ev).is_file():
        try:
            from mergelab.eval.spec import EvalSpec

            res.scorers_text = _scorers_text(EvalSpec.load(ev))
        except MergelabError as e:
            _add(res.errors, f"search config `eval`: {e}", "eval")
    if all_local and not res.errors:
        try:
            _, space = validate_config(cfg, base_dir=Path.cwd())
            res.size_text = space_size_text(space)
            res.complete = True
        except MergelabError as e:
            _add(res.errors, str(e))
    elif not res.errors:
        # a Hub model is not fetched while typing: check what needs no weights
        try:
            if cfg.layer_groups == 1 and not cfg.io_group and not cfg.layer_sources:
                res.size_text = space_size_text(build_space(cfg, None))
            else:
                build_space(cfg.model_copy(update={"layer_groups": 1, "io_group": False, "layer_sources": False}), None)
                res.size_text = "known once the base model is fetched (layer groups need its layer count)"
        except MergelabError as e:
            _add(res.errors, str(e))
    return res
