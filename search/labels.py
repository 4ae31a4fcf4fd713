"""Human-readable names for searched parameters: `m0.weight.g0` -> `addition · weight · layers 0–1`.

The search space names its numbers compactly (search/space.py); a user reads them in the dashboard,
the compare view, Optuna's study attributes and the model card. `param_labels` turns a run's parameter
list (resolved.json's "params", or a search.space.Space) into one label per parameter, built from the
model's short name, the operator parameter, the tensor filter and the layer range. Every function here
only reads the description it is given: a missing field leaves the compact name as it is.
"""
from __future__ import annotations

import re
from dataclasses import asdict, is_dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Mapping

SEP = " · "
IO_TEXT = "embeddings & head"  # the io group: tensors outside the transformer layers
OTHER_TEXT = "other tensors"  # the filter set of tensors that match none of `filters`

# the compact names of search/space.py, for runs whose resolved.json predates its "params" list
_MODEL_NAME = re.compile(r"^m(?P<model>\d+)\.(?P<param>[A-Za-z_][\w]*)(?:\.(?!g\d+$)(?P<filter>\w+))?(?:\.g(?P<group>\d+))?$")
_SOURCE_NAME = re.compile(r"^source\.g(?P<group>\d+)$")


def short_model_names(refs: Iterable[str]) -> list[str]:
    """Short, distinct names for model references: the last path part (`.../family/addition` ->
    `addition`, `org/name` -> `name`), lengthened from the right where two would read the same."""
    refs = [str(r) for r in refs]
    parts = [[p for p in PurePosixPath(r.rstrip("/")).parts if p not in ("/", ".")] or [r] for r in refs]
    depth = [1] * len(refs)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    # the same reference listed twice still needs two names
    out = []
    for i, n in enumerate(names):
        out.append(n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}")
    return out


def layer_span(group: int, num_layers: int, layer_groups: int) -> tuple[int, int] | None:
    """First and last layer of layer group `group` (search/space.py's split), None when empty."""
    layers = [l for l in range(num_layers) if min(layer_groups - 1, l * layer_groups // num_layers) == group]
    return (layers[0], layers[-1]) if layers else None


def layers_text(span: tuple[int, int] | None) -> str:
    if span is None:
        return "no layers"
    a, b = span
    return f"layer {a}" if a == b else f"layers {a}–{b}"


def _as_dict(p: Any) -> dict:
    if is_dataclass(p) and not isinstance(p, type):
        return asdict(p)
    return dict(p) if isinstance(p, Mapping) else {"name": str(p)}


def _parse(name: str) -> dict:
    """A parameter description recovered from its compact name (runs without a "params" list)."""
    m = _MODEL_NAME.match(name)
    if m:
        return {"name": name, "kind": "model", "model": int(m["model"]), "param": m["param"],
                "group": int(m["group"]) if m["group"] is not None else None, "filter": m["filter"]}
    m = _SOURCE_NAME.match(name)
    if m:
        return {"name": name, "kind": "source", "group": int(m["group"])}
    if name == "method":
        return {"name": name, "kind": "method"}
    if name.startswith("fusion."):
        return {"name": name, "kind": "fusion"}
    return {"name": name, "kind": "global", "param": name}


def param_label(p: Any, *, models: list[str], num_layers: int | None = None, layer_groups: int = 1,
                methods: list[str] | None = None) -> str:
    """One parameter's label. `p` is a search.space.ParamDef, its dict (resolved.json) or a compact
    name; `models` are the short model names (short_model_names) in the config's order."""
    d = _as_dict(p) if not isinstance(p, str) else _parse(p)
    name = str(d.get("name", "?"))
    kind = d.get("kind")
    group = d.get("group")
    span = None
    if group is not None and num_layers and layer_groups:
        span = layers_text(layer_span(int(group), int(num_layers), int(layer_groups)))
    elif group is not None:
        span = f"layer group {group}"
    if kind == "model":
        i = d.get("model")
        model = models[i] if isinstance(i, int) and 0 <= i < len(models) else f"model {i}"
        parts = [model, str(d.get("param") or name)]
        filt = d.get("filter")
        if filt == "io":
            parts.append(IO_TEXT)
        elif filt == "other":
            parts.append(OTHER_TEXT)
        elif filt:
            parts.append(str(filt))
        if span and filt != "io":
            parts.append(span)
        return SEP.join(parts)
    if kind == "source":
        return SEP.join(["layer source", span or "all layers"])
    if kind == "method":
        return "method" + (f" ({' / '.join(methods)})" if methods else "")
    if kind == "fusion":
        return SEP.join(["fusion", name.split(".", 1)[-1]])
    return str(d.get("param") or name)


def param_labels(run: Any) -> dict[str, str]:
    """{compact name: label} for every searched parameter of a run, from its resolved config (a
    records.ResolvedRun, or the dict in resolved.json) or a search.space.Space. Labels are unique: two parameters that would
    read the same keep their compact name in brackets."""
    if isinstance(run, Mapping):
        params = [_as_dict(p) for p in run.get("params") or []]
        models = [str(m) for m in run.get("models") or []]
        num_layers = run.get("num_layers")
        groups = int(run.get("layer_groups") or 1)
        method = run.get("method")
        methods = [method] if isinstance(method, str) else list(method or [])
    else:  # a Space or a ResolvedRun (the same attribute names)
        params = [_as_dict(p) for p in getattr(run, "params", [])]
        models = list(getattr(run, "models", []))
        num_layers = getattr(run, "num_layers", None)
        groups = int(getattr(run, "layer_groups", 1) or 1)
        methods = list(getattr(run, "methods", []))
    short = short_model_names(models)
    out = {p["name"]: param_label(p, models=short, num_layers=num_layers, layer_groups=groups, methods=methods)
           for p in params if "name" in p}
    seen: dict[str, int] = {}
    for label in out.values():
        seen[label] = seen.get(label, 0) + 1
    return {n: (f"{lab} [{n}]" if seen[lab] > 1 else lab) for n, lab in out.items()}


def _run_key(run: Any, key: str) -> Any:
    """A key of a run's resolved config: the dict in resolved.json or a records.ResolvedRun."""
    return run.get(key) if isinstance(run, Mapping) else getattr(run, key, None)


def label_of(name: str, labels: Mapping[str, str], resolved: Any = None) -> str:
    """The label of one parameter name: from `labels`, else recovered from the name itself with the
    run's models (a parameter the run's list does not hold, e.g. an older run). `resolved` is the
    run's resolved config (a records.ResolvedRun or the dict in resolved.json)."""
    if name in labels:
        return labels[name]
    if resolved is None:
        return name
    models = short_model_names(_run_key(resolved, "models") or [])
    return param_label(name, models=models, num_layers=_run_key(resolved, "num_layers"),
                       layer_groups=int(_run_key(resolved, "layer_groups") or 1))
