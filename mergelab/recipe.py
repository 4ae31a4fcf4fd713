"""Merge recipes: the YAML format (a superset of mergekit's for the methods mergelab runs),
pydantic validation against the operator registry, and writing recipes back out."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import MergelabError, pydantic_problems

Scalar = Union[bool, float, int]
Gradient = list[float]


class FilterEntry(BaseModel):
    """`{filter: self_attn, value: 0.5}`: applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, Gradient]


ParamValue = Union[Scalar, Gradient, list[FilterEntry], FilterEntry]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


DtypeName = Literal["float32", "float16", "bfloat16"]
DTYPES = get_args(DtypeName)


class Recipe(BaseModel):
    """A weight-merge recipe. Field names and meaning follow mergekit's YAML."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    # mergelab's own key (mergekit ignores unknown keys): seeds the random operators.
    seed: int | None = None
    # mergelab's own key: the random operators' stream. counter (default): the same numbers on
    # the CPU and on CUDA; mergekit: torch's CPU generator, mergekit's exact DARE output.
    rng: Literal["counter", "mergekit"] | None = None
    name: str | None = None

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v):
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
        return aliases.get(v, v) if isinstance(v, str) else v  # a list etc. fails as a wrong type

    # -- derived -----------------------------------------------------------------------------
    @property
    def is_stack(self) -> bool:
        """A layer-stacking recipe (mergekit's `slices` with layer ranges laid end to end)."""
        return self.slices is not None

    @property
    def model_refs(self) -> list[str]:
        if self.is_stack:
            return list(dict.fromkeys(src.model for s in self.slices for src in s.sources))
        return [m.model for m in self.models]

    @property
    def base_index(self) -> int | None:
        """Where base_model sits in each merge's model list (for a stack recipe: in every
        slice's sources, the validator makes it the same position)."""
        if self.base_model is None:
            return None
        if self.is_stack:
            return next((i for i, src in enumerate(self.slices[0].sources) if src.model == self.base_model), None)
        for i, m in enumerate(self.models):
            if m.model == self.base_model:
                return i
        return None

    def all_refs(self) -> list[str]:
        refs = [] if self.base_model is None else [self.base_model]
        for r in self.model_refs:
            if r not in refs:
                refs.append(r)
        return refs

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True, mode="json")
        if not d.get("parameters"):
            d.pop("parameters", None)
        for m in d.get("models", []):
            if not m.get("parameters"):
                m.pop("parameters", None)
        layer_range = getattr(self, "_layer_range", None)
        if layer_range is not None and not self.is_stack:
            # written back in mergekit's slices form, so the layer range is not lost
            d["slices"] = [{"sources": [{"model": m["model"], "layer_range": list(layer_range),
                                         **({"parameters": m["parameters"]} if m.get("parameters") else {})}
                                        for m in d.pop("models")]}]
        elif self.is_stack:
            d.pop("models", None)
            for sl in d["slices"]:
                if not sl.get("parameters"):
                    sl.pop("parameters", None)
                for src in sl["sources"]:
                    src["layer_range"] = list(src["layer_range"])
                    if not src.get("parameters"):
                        src.pop("parameters", None)
        else:
            d.pop("slices", None)
        return d

    def pinned_dtypes(self, compute: str, out: str | None) -> "Recipe":
        """This recipe with the dtypes mergelab used written in: `dtype` is the compute dtype
        (mergekit computes in `dtype`, or in the models' own dtype when it is absent, while
        mergelab computes in float32), `out_dtype` the dtype of the written tensors, so the
        recipe gives the same tensors when rerun by mergelab or by mergekit."""
        update: dict[str, Any] = {"dtype": compute}
        if out is not None and (self.out_dtype is not None or out != compute):
            update["out_dtype"] = out
        return self.model_copy(update=update)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# -- YAML ----------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    pass


def _repr_list(dumper, data):
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _repr_list)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def read_yaml(path: str | Path, what: str = "recipe") -> Any:
    p = Path(path)
    if not p.is_file():
        raise MergelabError(
            f"The {what} file {p} does not exist (or is not a file). Check the path; "
            f"paths are relative to the current directory ({Path.cwd()})."
        )
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MergelabError(f"The {what} file {p} is not valid YAML: {e}. Fix the syntax and retry.") from None


# -- validation ----------------------------------------------------------------------------------
def _pydantic_message(e: ValidationError, where: str) -> str:
    return f"Invalid {where}: {pydantic_problems(e)}."


def _values_of(value: Any) -> list[Any]:
    """Every scalar inside a parameter value (gradients and filter entries unpacked)."""
    if isinstance(value, FilterEntry):
        return _values_of(value.value)
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:
            out.extend(_values_of(v))
        return out
    return [value]


def _slices_to_models(r: Recipe, where: str) -> Recipe:
    """mergekit's `slices:` form where a single slice takes the same layers from every source
    is the same merge as the `models:` form (the plan checks that the range is the whole model
    and otherwise stacks it)."""
    s = r.slices[0]
    params = dict(s.parameters)
    merged_global = {**r.parameters, **params}
    models = [ModelEntry(model=src.model, parameters=src.parameters) for src in s.sources]
    out = r.model_copy(update={"models": models, "slices": None, "parameters": merged_global})
    out._layer_range = tuple(s.sources[0].layer_range)  # type: ignore[attr-defined]
    return out


def _validate_stack(r: Recipe, where: str) -> Recipe:
    """Each slice is one merge (any operator) of equally long layer ranges; the slices' layers
    are laid end to end. Every slice is validated as a `models:` recipe of its own."""
    if not r.slices:
        raise MergelabError(f"{where}: `slices` is empty. List at least one slice with `sources`.")
    position = None
    for i, sl in enumerate(r.slices):
        at = f"{where} slices[{i}]"
        if not sl.sources:
            raise MergelabError(f"{at} has no `sources`. Give each slice at least one source.")
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            if a < 0 or b <= a:
                raise MergelabError(
                    f"{at}.sources[{j}] ({src.model}): layer_range {[a, b]} is empty or negative. "
                    "Use [first, end) with 0 <= first < end (end is exclusive, as in mergekit)."
                )
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
        if len(lengths) != 1:
            raise MergelabError(
                f"{at}: its sources take layer ranges of different lengths "
                f"({[list(src.layer_range) for src in sl.sources]}); every source of a slice must "
                "give the same number of layers (layer k of each is merged into one output layer)."
            )
        sub = Recipe(
            merge_method=r.merge_method, base_model=r.base_model,
            models=[ModelEntry(model=src.model, parameters=src.parameters) for src in sl.sources],
            parameters={**r.parameters, **sl.parameters}, seed=r.seed,
        )
        sub = validate_recipe(sub, at, in_slice=True)
        if sub.base_index is not None:
            if position is not None and position != sub.base_index:
                raise MergelabError(
                    f"{at} lists base_model {r.base_model} at position {sub.base_index} of its sources, "
                    f"an earlier slice at position {position}. List the base at the same position in "
                    "every slice."
                )
            position = sub.base_index
    return r


def validate_recipe(r: Recipe, where: str = "recipe", *, in_slice: bool = False) -> Recipe:
    """Check the recipe against the operator registry. Reads nothing from disk."""
    from operators import get_operator, operator_names

    if r.tokenizer_source == "union":
        raise MergelabError(
            f"{where}: `tokenizer_source: union` (a merged vocabulary) is not supported by weight "
            "merging in mergelab. For models with different tokenizers use cross-tokenizer logit "
            "fusion instead (`merge_method: logit_fusion`, run with `mergelab fuse` / `mergelab eval`), "
            "or use `tokenizer_source: base` to keep the base model's vocabulary."
        )
    if r.slices is not None:
        if r.models:
            raise MergelabError(
                f"{where} has both `models` and `slices`. Use one of them: `models` for a whole-model "
                "merge, `slices` (mergekit's form) for layer ranges."
            )
        uniform = len(r.slices) == 1 and len({tuple(s.layer_range) for s in r.slices[0].sources}) == 1
        stacking = r.merge_method in operator_names() and get_operator(r.merge_method).layer_stacking
        if not (uniform and not stacking):
            if r.merge_method not in operator_names():
                validate_recipe(r.model_copy(update={"slices": None}), where)  # the unknown-method message
            return _validate_stack(r, where)
        r = _slices_to_models(r, where)
    try:
        op = get_operator(r.merge_method)
    except KeyError:
        if r.merge_method == "logit_fusion":
            raise MergelabError(
                f"{where} uses merge_method `logit_fusion`, which runs at inference time and "
                "produces no weights. Use `mergelab fuse --recipe FILE` to generate with it or "
                "`mergelab eval FILE --eval SPEC` to score it."
            ) from None
        raise MergelabError(
            f"{where}: unknown merge_method `{r.merge_method}`. Allowed: "
            f"{', '.join(operator_names())}."
        ) from None
    if not r.models:
        raise MergelabError(f"{where}: `models` is empty. List at least one model to merge.")
    if op.averages_unlisted_base and r.base_model is not None and r.base_index is None and not in_slice:
        # mergekit averages an unlisted base_model in too (with the global weight)
        r = r.model_copy(update={"models": [*r.models, ModelEntry(model=r.base_model)]})
    if op.needs_base and r.base_model is None:
        raise MergelabError(
            f"{where}: merge_method `{op.name}` needs `base_model` (the model the task vectors are "
            "measured from). Add `base_model: <path or org/name>`."
        )
    if in_slice and op.needs_base and r.base_index is None:
        raise MergelabError(
            f"{where}: merge_method `{op.name}` takes the base from the slice's sources (mergekit's "
            f"slices form), but base_model {r.base_model} is not among them. Add it to the slice's "
            "`sources` with the same layer_range length."
        )
    skip_base = op.needs_base or (op.base_optional and r.base_model is not None)
    n_models = len([m for i, m in enumerate(r.models) if not (skip_base and m.model == r.base_model)])
    if n_models < op.min_models or (op.max_models is not None and n_models > op.max_models):
        extra = 1 if skip_base else 0
        lo, hi = op.min_models + extra, (op.max_models + extra if op.max_models is not None else None)
        want = f"exactly {lo}" if hi == lo else f"at least {lo}" + (f" and at most {hi}" if hi else "")
        scope = " in all, base_model included," if skip_base else ""
        fix = "the slice's `sources`" if in_slice else "the `models` list"
        raise MergelabError(
            f"{where}: merge_method `{op.name}` needs {want} models{scope} but the recipe has "
            f"{n_models + extra}. Fix {fix}."
        )
    known_model = {p.name for p in op.params if p.scope == "model"}
    known_global = {p.name for p in op.params}  # a model parameter in `parameters` applies to all

    def check(pname: str, value: Any, field: str, allowed: set[str]):
        spec = op.param(pname)
        if pname not in allowed or spec is None:
            raise MergelabError(
                f"{where}: unknown parameter `{field}` for merge_method `{op.name}`. Allowed here: "
                f"{', '.join(sorted(allowed)) or 'none'}."
            )
        check_value_form(value, field, where)
        for v in _values_of(value):
            why = spec.check(v)
            if why is not None:
                raise MergelabError(f"{where}: `{field}` is invalid: {why}. Allowed: {spec.allowed()}.")

    for pname, value in r.parameters.items():
        check(pname, value, f"parameters.{pname}", known_global)
    for i, m in enumerate(r.models):
        for pname, value in m.parameters.items():
            check(pname, value, f"models[{i}].parameters.{pname}", known_model)
    for spec in op.params:
        if not spec.required:
            continue
        if spec.name in r.parameters:
            continue
        for i, m in enumerate(r.models):
            if skip_base and i == r.base_index:
                continue
            if spec.scope == "global" or spec.name not in m.parameters:
                raise MergelabError(
                    f"{where}: merge_method `{op.name}` needs `{spec.name}` for models[{i}] "
                    f"({m.model}); set it in that model's `parameters` or in the global `parameters`."
                )
    return r


def load_recipe(src: str | Path | dict, where: str | None = None) -> Recipe:
    """Load and validate a recipe from a YAML path or a dict (mergekit format accepted)."""
    if isinstance(src, Recipe):
        return validate_recipe(src, where or "recipe")
    if isinstance(src, (str, Path)):
        where = where or f"recipe {src}"
        data = read_yaml(src)
    else:
        where = where or "recipe"
        data = src
    if not isinstance(data, dict):
        raise MergelabError(f"{where} must be a YAML mapping with at least `merge_method` and `models`.")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise MergelabError(_pydantic_message(e, where)) from None
    return validate_recipe(r, where)


def resolve_value(value: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: filters by substring (first match wins, like
    mergekit), gradients interpolated at t in [0, 1] exactly as mergekit does."""
    if isinstance(value, FilterEntry):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(e, FilterEntry) for e in value):
            for cond in value:
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return resolve_value(cond.value, tensor_name, t)
            return None
        if any(isinstance(e, bool) for e in value):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


def check_value_form(value: Any, field: str, where: str) -> None:
    """A parameter value must give every tensor a value: no empty list (gradient or filter list),
    and a filter list ends with a catch-all entry (no `filter`, or `*`), as mergekit's examples do;
    without one, tensors that match no filter would get no value and the merge would stop half-way."""
    if isinstance(value, FilterEntry):
        value = [value]
    if not isinstance(value, list):
        return
    if not value:
        raise MergelabError(
            f"{where}: `{field}` is an empty list. Give a number, a gradient of numbers "
            "(e.g. [0.2, 0.8]), or filter entries ending with a catch-all `- value: X`."
        )
    entries = [e for e in value if isinstance(e, FilterEntry)]
    if not entries:
        return
    for i, e in enumerate(entries):
        if isinstance(e.value, list):
            check_value_form(e.value, f"{field}[{i}].value", where)
    if entries[-1].filter not in (None, "*"):
        named = ", ".join(f"`{e.filter}`" for e in entries if e.filter not in (None, "*"))
        raise MergelabError(
            f"{where}: `{field}` has no catch-all entry, so tensors whose names contain none of "
            f"{named} get no value. Add a last entry without `filter` (e.g. `- value: 0.5`) "
            "for all other tensors."
        )
