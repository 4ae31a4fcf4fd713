"""The search space: which numbers a candidate is made of, and how a candidate becomes a recipe.

`build_merge_space(cfg)` (search.validate.build_space for any config) checks the config against the
operator registry and the base model's layer
count; `Space.recipe(values)` turns one candidate into an ordinary mergekit-format recipe dict.

Parameter names (as Optuna and trials.jsonl show them):
  `lambda`                       a searched global parameter
  `m{i}.weight`                  model i's parameter (one layer group, no filters)
  `m{i}.weight.g{k}`             ... in layer group k
  `m{i}.weight.{filter}.g{k}`    ... for tensors matching `filter` (`other`: matching none)
  `m{i}.weight.io`               ... for embeddings / lm_head / final norm (io_group: true)
  `method`                       index into the config's method list (floored)
  `source.g{k}`                  layer group k's source: 0 = the merge, j + 1 = model j (floored)
  `fusion.weighting`             index into the `fusion.weighting` list (floored; hybrid candidates)
  `fusion.tau`                   the fusion temperature (hybrid candidates)
Every parameter is a float range, so CMA-ES (which has no categorical dimension) searches the
choices too: a choice among n is the interval [0, n) cut into n equal parts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

from .config import FUSION_MEMBERS, FUSION_WEIGHTINGS, FusionSearchConfig, SearchConfig, _range

_CHOICE_EPS = 1e-9


@dataclass(frozen=True)
class ParamDef:
    """One searched number."""

    name: str
    low: float
    high: float
    kind: str  # "model" | "global" | "method" | "source" | "fusion"
    param: str | None = None  # operator parameter name (model / global)
    model: int | None = None  # model index (model)
    group: int | None = None  # layer group (model with groups, source)
    filter: str | None = None  # filter name, "other", or "io"
    integer: bool = False  # an int parameter of the operator: rounded

    def from_unit(self, u: float) -> float:
        return self.low + min(1.0, max(0.0, u)) * (self.high - self.low)

    def to_unit(self, v: float) -> float:
        return (v - self.low) / (self.high - self.low)


@dataclass
class FusionSpec:
    """The fusion part of hybrid candidates: fixed values, or None where `fusion.*` is searched."""

    weightings: list[str]
    tau: float | None  # fixed tau, or None when searched
    members: list[str]  # "merge", "sources", "base", in the config's order
    grid_step: float


@dataclass
class Space:
    """A validated search space over recipes."""

    base_model: str
    models: list[str]
    methods: list[str]
    num_layers: int
    layer_groups: int
    filters: list[str]
    io_names: list[str]  # non-layer tensor names (filters of the io group)
    io_group: bool
    layer_sources: bool
    params: list[ParamDef]
    # per method: {param: fixed value} for the whole merge, and per model overrides
    fixed_global: dict[str, Any] = field(default_factory=dict)
    fixed_model: dict[int, dict[str, Any]] = field(default_factory=dict)
    recipe_extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    fusion: FusionSpec | None = None

    # -- layout ---------------------------------------------------------------------------
    def group_of_layer(self, layer: int) -> int:
        return min(self.layer_groups - 1, layer * self.layer_groups // self.num_layers)

    def group_layers(self, group: int) -> list[int]:
        return [l for l in range(self.num_layers) if self.group_of_layer(l) == group]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def describe(self) -> list[dict]:
        return [asdict(p) for p in self.params]

    def size_text(self) -> str:
        return f"{len(self.params)} searched numbers"

    # -- optuna ---------------------------------------------------------------------------
    def distributions(self) -> dict:
        from optuna.distributions import FloatDistribution

        return {p.name: FloatDistribution(p.low, p.high) for p in self.params}

    def middle(self) -> dict[str, float]:
        return {p.name: (p.low + p.high) / 2 for p in self.params}

    def from_unit(self, x) -> dict[str, float]:
        return {p.name: p.from_unit(float(u)) for p, u in zip(self.params, x)}

    def to_unit(self, values: dict[str, float]) -> list[float]:
        return [p.to_unit(float(values[p.name])) for p in self.params]

    # -- candidate -> fusion ----------------------------------------------------------------
    def fusion_of(self, values: dict[str, float]) -> dict[str, Any] | None:
        """The candidate's fusion (None without `fusion:`): weighting, tau, grid_step and the
        members in order — "merge" for the candidate's merged model, else a model reference."""
        fs = self.fusion
        if fs is None:
            return None
        if len(fs.weightings) == 1:
            weighting = fs.weightings[0]
        else:
            weighting = fs.weightings[self._choice(values["fusion.weighting"], len(fs.weightings))]
        tau = fs.tau if fs.tau is not None else float(values["fusion.tau"])
        members: list[str] = []
        for m in fs.members:
            members += ["merge"] if m == "merge" else (list(self.models) if m == "sources" else [self.base_model])
        return {"weighting": weighting, "tau": tau, "grid_step": fs.grid_step, "members": members}

    # -- candidate -> recipe --------------------------------------------------------------
    def _choice(self, value: float, n: int) -> int:
        return max(0, min(n - 1, int(math.floor(value + _CHOICE_EPS))))

    def method_of(self, values: dict[str, float]) -> str:
        if len(self.methods) == 1:
            return self.methods[0]
        return self.methods[self._choice(values["method"], len(self.methods))]

    def _expand(self, per_group: list[float]) -> list[float]:
        """K group values -> L per-layer values (a mergekit gradient hitting each layer)."""
        return [per_group[self.group_of_layer(l)] for l in range(self.num_layers)]

    def _model_value(self, values: dict[str, float], i: int, pname: str, integer: bool, gradient: bool):
        def v(name: str) -> float:
            x = float(values[name])
            return float(round(x)) if integer else x

        K = self.layer_groups
        prefix = f"m{i}.{pname}"
        sets: list[tuple[str | None, Any]] = []
        for f in (self.filters or [None]):
            fname = f if f is not None else None
            key = prefix + (f".{f}" if f is not None else "")
            sets.append((fname, [v(key if K == 1 else f"{key}.g{k}") for k in range(K)]))
        if self.filters:
            other = prefix + ".other"
            sets.append(("__other__", [v(other if K == 1 else f"{other}.g{k}") for k in range(K)]))

        def as_value(groups: list[float]):
            if K == 1 and not gradient:
                return groups[0]
            return self._expand(groups)

        entries: list[dict] = []
        if self.io_group:
            io = v(prefix + ".io")
            entries.extend({"filter": n, "value": io} for n in self.io_names)
        if not self.filters:
            main = as_value(sets[0][1])
            if not entries:
                return main
            entries.append({"value": main})
            return entries
        for fname, groups in sets:
            if fname == "__other__":
                entries.append({"value": as_value(groups)})
            else:
                entries.append({"filter": fname, "value": as_value(groups)})
        return entries

    def recipe(self, values: dict[str, float]) -> dict[str, Any]:
        """The candidate's recipe as a plain dict (mergekit format, `mergelab merge` runs it)."""
        from operators import get_operator

        method = self.method_of(values)
        op = get_operator(method)
        gradient = self.layer_sources
        models = []
        for i, ref in enumerate(self.models):
            params: dict[str, Any] = {}
            for spec in op.params:
                if spec.scope != "model":
                    continue
                if (spec.name in self.fixed_model.get(i, {})):
                    params[spec.name] = copy.deepcopy(self.fixed_model[i][spec.name])
                elif f"m{i}.{spec.name}" in self._param_prefixes:
                    params[spec.name] = self._model_value(values, i, spec.name, spec.kind == "int", gradient)
            models.append({"model": ref, "parameters": params})
        gparams: dict[str, Any] = {}
        for spec in op.params:
            if spec.name in values and spec.scope == "global":
                x = float(values[spec.name])
                gparams[spec.name] = float(round(x)) if spec.kind == "int" else x
            elif spec.name in self.fixed_global:
                gparams[spec.name] = copy.deepcopy(self.fixed_global[spec.name])
        if self.layer_sources:
            self._apply_layer_sources(values, op, models, gparams)
        if op.averages_unlisted_base and op.param("weight") is not None \
                and all(m["model"] != self.base_model for m in models):
            # an unlisted base_model is averaged in (mergekit's rule for linear): list it with weight 0
            models.append({"model": self.base_model, "parameters": {"weight": 0.0}})
        recipe: dict[str, Any] = {"merge_method": method, "base_model": self.base_model, "models": models}
        if gparams:
            recipe["parameters"] = gparams
        recipe.setdefault("seed", self.seed)
        for k, v in self.recipe_extra.items():
            recipe[k] = copy.deepcopy(v)
        return recipe

    @property
    def _param_prefixes(self) -> set[str]:
        out = set()
        for p in self.params:
            if p.kind == "model":
                out.add(f"m{p.model}.{p.param}")
        return out

    def _apply_layer_sources(self, values, op, models, gparams) -> None:
        sources = [
            self._choice(values[f"source.g{k}"], len(self.models) + 1) for k in range(self.layer_groups)
        ]
        if all(s == 0 for s in sources):
            return
        layers = {l: sources[self.group_of_layer(l)] - 1 for l in range(self.num_layers)
                  if sources[self.group_of_layer(l)] > 0}

        def override(value, at_layer):
            """Set the per-layer value at the layers a single model fills."""
            if isinstance(value, list) and value and isinstance(value[0], dict):
                out = []
                for e in value:
                    e = dict(e)
                    if e.get("filter") in self.io_names and e.get("filter") is not None:
                        out.append(e)
                        continue
                    e["value"] = override(e["value"], at_layer)
                    out.append(e)
                return out
            grad = list(value) if isinstance(value, list) else [value] * self.num_layers
            for l, j in layers.items():
                grad[l] = at_layer(j)
            return grad

        for i, m in enumerate(models):
            p = m["parameters"]
            wspec = op.param("weight")
            p["weight"] = override(p.get("weight", wspec.default if wspec.default is not None else 1.0),
                                   lambda j, i=i: 1.0 if j == i else 0.0)
            if op.param("density") is not None:
                dspec = op.param("density")
                p["density"] = override(p.get("density", dspec.default if dspec.default is not None else 1.0),
                                        lambda j: 1.0)
        if op.param("lambda") is not None:
            lspec = op.param("lambda")
            gparams["lambda"] = override(gparams.get("lambda", lspec.default if lspec.default is not None else 1.0),
                                         lambda j: 1.0)

    # -- recipe -> candidate (warm start) ------------------------------------------------------
    def values_from_recipe(self, recipe) -> tuple[dict[str, float], list[str]]:
        """The candidate closest to a recipe (warm start); values outside a range are clipped,
        and the clipped names are returned so the caller can warn."""
        from mergelab.recipe import resolve_value
        from operators import get_operator

        op = get_operator(recipe.merge_method)
        by_ref = {m.model: m for m in recipe.models}
        out: dict[str, float] = {}
        clipped: list[str] = []
        for p in self.params:
            if p.kind == "method":
                v = float(self.methods.index(recipe.merge_method)) + 0.5 if recipe.merge_method in self.methods else 0.0
            elif p.kind == "fusion":  # a recipe holds no fusion: sim (or the first) at tau 1
                ws = self.fusion.weightings if self.fusion else []
                v = (float(ws.index("sim")) + 0.5 if "sim" in ws else 0.5) if p.name == "fusion.weighting" else 1.0
            elif p.kind == "source":
                v = 0.0
            else:
                layer = self.group_layers(p.group)[0] if p.group is not None else 0
                t = layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0
                if p.filter == "io":
                    tname, t = (self.io_names[0] if self.io_names else "lm_head.weight"), 0.0
                elif p.filter in (None, "other"):
                    tname = f"model.layers.{layer}.input_layernorm.weight"
                else:
                    tname = f"model.layers.{layer}.{p.filter}.weight"
                raw = None
                if p.kind == "model":
                    m = by_ref.get(self.models[p.model])
                    if m is not None and p.param in m.parameters:
                        raw = resolve_value(m.parameters[p.param], tname, t)
                if raw is None and p.param in recipe.parameters:
                    raw = resolve_value(recipe.parameters[p.param], tname, t)
                if raw is None:
                    spec = op.param(p.param)
                    raw = spec.default if spec is not None else None
                v = float(raw) if raw is not None and not isinstance(raw, bool) else (p.low + p.high) / 2
            if v < p.low or v > p.high:
                clipped.append(p.name)
                v = min(p.high, max(p.low, v))
            out[p.name] = v
        return out, clipped


def _io_tensor_names(base_path: Path) -> list[str]:
    from mergelab.plan import layer_of
    from mergelab.sources import ModelSource

    src = ModelSource(str(base_path), base_path)
    return sorted(n for n in src.tensors if layer_of(n) is None)


def _num_layers(base_path: Path, where: str) -> int:
    import json

    cfg_path = base_path / "config.json"
    if not cfg_path.is_file():
        raise MergelabError(
            f"search config `base_model`: {base_path} has no config.json. Point at a model "
            "directory in Hugging Face format (config.json + *.safetensors)."
        )
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    raise MergelabError(
        f"{where}: cannot find the number of layers (num_hidden_layers) in {cfg_path}; layer groups "
        "need it. Use a standard transformers config."
    )


def build_merge_space(cfg: SearchConfig, base_path: Path | None = None) -> Space:
    """Check the config's (coefficient) space against the registry and turn it into a Space;
    a `dataflow:` config's layer-path space is search/dataflow.py's (search.validate.build_space
    picks the one the config asks for).

    base_path: the base model's local directory (layer count, tensor names); required when
    layer groups, io_group or layer_sources need them.
    """
    from operators import get_operator, operator_names

    ops = []
    for name in cfg.methods:
        try:
            ops.append(get_operator(name))
        except KeyError:
            raise MergelabError(
                f"search config `method`: unknown operator `{name}`. Allowed: {', '.join(operator_names())}."
            ) from None
    names = [o.name for o in ops]
    if len(set(names)) != len(names):
        raise MergelabError(f"search config `method` lists an operator twice: {cfg.methods}.")
    for o in ops:
        n = len(cfg.models)
        if o.name != "slerp" and (n < o.min_models or (o.max_models is not None and n > o.max_models)):
            raise MergelabError(
                f"search config `method`: `{o.name}` needs at least {o.min_models}"
                + (f" and at most {o.max_models}" if o.max_models else "")
                + f" models; `models` lists {n}."
            )
    if cfg.layer_sources:
        bad = [o.name for o in ops if not o.layer_source]
        if bad:
            # the operators that declare it (OperatorSpec.layer_source)
            able = [n for n in operator_names() if get_operator(n).layer_source]
            raise MergelabError(
                f"search config `layer_sources: true` works with {', '.join(able)} "
                f"(a layer taken from one model = weight 1 for it, 0 for the others); `method` has "
                f"{', '.join(bad)}. Remove those methods or turn layer_sources off."
            )
    if cfg.filters is not None:
        if not cfg.filters or any(not isinstance(f, str) or not f for f in cfg.filters):
            raise MergelabError("search config `filters` must be a non-empty list of tensor-name substrings, e.g. [self_attn, mlp].")
        if len(set(cfg.filters)) != len(cfg.filters) or "other" in cfg.filters or "io" in cfg.filters:
            raise MergelabError(
                f"search config `filters`: {cfg.filters} has a duplicate or a reserved name (other, io)."
            )
    # every parameter known to at least one method
    specs: dict[str, Any] = {}
    for o in ops:
        for p in o.params:
            specs.setdefault(p.name, p)

    def resolve_entry(pname: str, value: Any, field_name: str):
        spec = specs.get(pname)
        if spec is None:
            allowed = sorted(specs)
            hint = ""
            if "method" not in cfg.model_fields_set:
                hint = (f" `method` is not given, so it is the default, {'/'.join(names)}; write e.g. "
                        "`method: ties` for an operator that takes it.")
            raise MergelabError(
                f"search config `{field_name}`: `{pname}` is not a parameter of "
                f"{'/'.join(names)}. Parameters they take: {', '.join(allowed) or 'none'}.{hint}"
            )
        if value is None or value == "auto":
            if spec.search_range is None:
                raise MergelabError(
                    f"search config `{field_name}`: `{pname}` has no default search range in the "
                    f"operator registry; give one, e.g. `{pname}: [low, high]`, or a fixed value."
                )
            return ("range", tuple(float(x) for x in spec.search_range), spec)
        r = _range(value, field_name)
        if r is None:
            for x in (value if isinstance(value, list) else [value]):
                why = spec.check(x) if not isinstance(x, dict) else None
                if why is not None:
                    raise MergelabError(f"search config `{field_name}`: {why}. Allowed: {spec.allowed()}.")
            return ("fixed", value, spec)
        if spec.kind == "bool":
            raise MergelabError(
                f"search config `{field_name}`: `{pname}` is true/false and cannot be searched over a "
                "range; give `true` or `false`."
            )
        for x in r:
            why = spec.check(int(x) if spec.kind == "int" else x)
            if why is not None:
                raise MergelabError(
                    f"search config `{field_name}`: the range {list(value)} leaves the allowed values "
                    f"of `{pname}` ({spec.allowed()}). Narrow the range."
                )
        return ("range", r, spec)

    global_entries = {p: resolve_entry(p, v, f"space.{p}") for p, v in cfg.space.items()}
    ref_index = {ref: i for i, ref in enumerate(cfg.models)}
    model_entries: dict[int, dict[str, Any]] = {}
    for ref, d in cfg.model_space.items():
        if ref not in ref_index:
            raise MergelabError(
                f"search config `model_space`: `{ref}` is not one of `models` ({', '.join(cfg.models)}). "
                "Use the model reference exactly as written in `models`."
            )
        if not isinstance(d, dict):
            raise MergelabError(f"search config `model_space.{ref}` must be a mapping of parameter: range.")
        model_entries[ref_index[ref]] = {}
        for p, v in d.items():
            e = resolve_entry(p, v, f"model_space.{ref}.{p}")
            if e[2].scope != "model":
                raise MergelabError(
                    f"search config `model_space.{ref}.{p}`: `{p}` is a global parameter (one value "
                    "for the whole merge); set it under `space`, not per model."
                )
            model_entries[ref_index[ref]][p] = e

    needs_layers = cfg.layer_groups > 1 or cfg.layer_sources or cfg.io_group
    L = 1
    io_names: list[str] = []
    if needs_layers:
        if base_path is None:
            raise MergelabError("search config: layer groups need the base model's directory (internal).")
        L = _num_layers(base_path, "search config `base_model`")
        if cfg.layer_groups > L:
            raise MergelabError(
                f"search config `layer_groups: {cfg.layer_groups}` is more than the base model's "
                f"{L} layers; use at most {L}."
            )
        if cfg.io_group:
            io_names = _io_tensor_names(base_path)
    K = cfg.layer_groups
    params: list[ParamDef] = []
    if len(cfg.methods) > 1:
        params.append(ParamDef("method", 0.0, float(len(cfg.methods)), "method"))
    fixed_global: dict[str, Any] = {}
    fixed_model: dict[int, dict[str, Any]] = {}
    sets = [None] if not cfg.filters else [*cfg.filters, "other"]

    def add_model_param(i: int, pname: str, kind: str, val: Any, spec: Any) -> None:
        # one searched number per (io group,) filter set and layer group; fixed values go aside
        if kind == "fixed":
            fixed_model.setdefault(i, {})[pname] = val
            return
        lo, hi = val
        base = f"m{i}.{pname}"
        if cfg.io_group:
            params.append(ParamDef(f"{base}.io", lo, hi, "model", pname, i, None, "io", spec.kind == "int"))
        for f in sets:
            key = base + (f".{f}" if f is not None else "")
            for k in range(K):
                params.append(ParamDef(key if K == 1 else f"{key}.g{k}", lo, hi, "model", pname, i,
                                       k if K > 1 else None, f, spec.kind == "int"))

    for pname, (kind, val, spec) in global_entries.items():
        if spec.scope != "global":
            continue
        if kind == "fixed":
            fixed_global[pname] = val
        else:
            params.append(ParamDef(pname, val[0], val[1], "global", param=pname, integer=spec.kind == "int"))
    for i in range(len(cfg.models)):
        # a per-model entry overrides the `space` one for that model
        for pname, (kind, val, spec) in global_entries.items():
            if spec.scope == "model":
                add_model_param(i, pname, *model_entries.get(i, {}).get(pname, (kind, val, spec)))
        for pname, (kind, val, spec) in model_entries.get(i, {}).items():
            if pname not in global_entries:
                add_model_param(i, pname, kind, val, spec)
    if cfg.layer_sources:
        for k in range(K):
            params.append(ParamDef(f"source.g{k}", 0.0, float(len(cfg.models) + 1), "source", group=k))
    fusion = _fusion_spec(cfg.fusion, params) if cfg.fusion is not None else None
    # required model parameters with no value anywhere
    for o in ops:
        for spec in o.params:
            if not spec.required or spec.scope != "model":
                continue
            for i, ref in enumerate(cfg.models):
                have = spec.name in global_entries or spec.name in model_entries.get(i, {}) or \
                    spec.name in cfg.recipe.get("parameters", {})
                if not have:
                    raise MergelabError(
                        f"search config `space`: operator `{o.name}` needs `{spec.name}` for every "
                        f"model (missing for {ref}). Add `{spec.name}: [low, high]` (or a fixed value) "
                        "under `space`."
                    )
    if not params:
        raise MergelabError(
            "search config `space` searches nothing: every parameter is fixed. Give at least one "
            "range, e.g. `weight: [0, 1.5]`."
        )
    bad_keys = set(cfg.recipe) & {"merge_method", "base_model", "models", "slices"}
    if bad_keys:
        raise MergelabError(
            f"search config `recipe` may only hold fixed recipe keys such as dtype or "
            f"tokenizer_source; {sorted(bad_keys)} come from the search itself."
        )
    return Space(
        base_model=cfg.base_model,
        models=list(cfg.models),
        methods=names,
        num_layers=L,
        layer_groups=K,
        filters=list(cfg.filters or []),
        io_names=io_names,
        io_group=cfg.io_group,
        layer_sources=cfg.layer_sources,
        params=params,
        fixed_global=fixed_global,
        fixed_model=fixed_model,
        recipe_extra=dict(cfg.recipe),
        seed=cfg.seed,
        fusion=fusion,
    )


def _fusion_spec(fc: FusionSearchConfig, params: list[ParamDef]) -> FusionSpec:
    """Check `fusion:` and add its searched numbers to `params`."""
    ws = fc.weightings
    bad = [w for w in ws if w not in FUSION_WEIGHTINGS]
    if not ws or bad:
        raise MergelabError(
            f"search config `fusion.weighting`: {', '.join(map(repr, bad)) or 'an empty list'} is not a "
            f"fusion weighting. Allowed values: {', '.join(FUSION_WEIGHTINGS)} (one, or a list to search)."
        )
    if len(set(ws)) != len(ws):
        raise MergelabError(f"search config `fusion.weighting` lists a weighting twice: {ws}.")
    if len(ws) > 1:
        params.append(ParamDef("fusion.weighting", 0.0, float(len(ws)), "fusion"))
    tau_range = _range(fc.tau, "fusion.tau")
    if tau_range is None:
        tau = fc.tau[0] if isinstance(fc.tau, list) and len(fc.tau) == 1 else fc.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise MergelabError(
                f"search config `fusion.tau`: {fc.tau!r} is not a temperature; give a number > 0 "
                "(e.g. 1.0) or a range [low, high] with low > 0 (e.g. [0.1, 5.0])."
            )
        fixed_tau: float | None = float(tau)
    else:
        if tau_range[0] <= 0:
            raise MergelabError(
                f"search config `fusion.tau`: the range {list(fc.tau)} must lie above 0 (the fusion "
                "temperature divides the log-perplexities); e.g. [0.1, 5.0]."
            )
        params.append(ParamDef("fusion.tau", tau_range[0], tau_range[1], "fusion"))
        fixed_tau = None
    bad = [m for m in fc.members if m not in FUSION_MEMBERS]
    if bad or not fc.members or len(set(fc.members)) != len(fc.members):
        raise MergelabError(
            f"search config `fusion.members`: {fc.members!r} must list each of "
            f"{', '.join(FUSION_MEMBERS)} at most once (unknown: {', '.join(bad) or 'none'}); `merge` "
            "is the candidate's merged model, `sources` the models in `models`, `base` the base model."
        )
    if "merge" not in fc.members:
        raise MergelabError(
            "search config `fusion.members` must include `merge`: a hybrid candidate fuses the "
            "searched merge with other models (without it the merge parameters would change nothing)."
        )
    return FusionSpec(list(ws), fixed_tau, list(fc.members), float(fc.grid_step))
