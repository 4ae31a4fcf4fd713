"""The contract between merge operators and the rest of mergelab.

An operator is a pure function of the tensors of one parameter; it never sees files, devices
or layer numbers. Parameters are declared once here and read by the recipe validator, the
search space and the README's operator table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

Scope = Literal["model", "global"]
Kind = Literal["float", "bool", "int"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter an operator reads.

    scope "model": one value per source model (mergekit's tensor parameters such as weight,
    density); a value given in the recipe's global `parameters` applies to every model.
    scope "global": one value for the whole merge (lambda, normalize, t...).
    """

    name: str
    scope: Scope
    default: Any = None
    kind: Kind = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low (else >= low)
    high_open: bool = False  # True: value must be < high (else <= high)
    required: bool = False
    search_range: tuple[float, float] | None = None  # default range offered to the search
    help: str = ""

    def allowed(self) -> str:
        """Human text of the allowed values, used in validation messages."""
        if self.kind == "bool":
            return "true or false"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if (self.low_open or self.low is None) else "["
        right = ")" if (self.high_open or self.high is None) else "]"
        what = "an integer" if self.kind == "int" else "a finite number"
        return f"{what} in {left}{lo}, {hi}{right}"

    def check(self, value: Any) -> str | None:
        """None when value is valid, else the reason."""
        import math

        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected {self.allowed()}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self.allowed()}, got {value!r}"
        if not math.isfinite(float(value)):
            return f"expected {self.allowed()}, got {value!r}"
        if self.kind == "int" and float(value) != int(value):
            return f"expected {self.allowed()}, got {value!r}"
        v = float(value)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return f"expected {self.allowed()}, got {value!r}"
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return f"expected {self.allowed()}, got {value!r}"
        return None


@dataclass
class MergeInputs:
    """Everything an operator needs for one tensor.

    All tensors are float32 (or the compute dtype) on the compute device and have the same
    shape. `models` follows the recipe's `models` list in order; when the base model is also
    listed there, `base_index` says where (task-vector operators skip that entry, linear keeps
    it, slerp uses it as t = 0).
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    model_params: list[dict[str, Any]]  # resolved per model, defaults filled in
    params: dict[str, Any]  # resolved global parameters, defaults filled in
    seed: int = 0
    base_index: int | None = None
    # Precomputed by the in-memory trial merger; when None the operator computes them itself,
    # with exactly the same arithmetic, so both paths give bit-identical results.
    deltas: list[torch.Tensor | None] | None = None  # models[i] - base (None at base_index)
    sorted_abs: list[torch.Tensor | None] | None = None  # sort(|delta|.flatten(), descending, stable)
    rng: str | None = None  # the recipe's `rng`: None / "counter" (default) or "mergekit"

    def stream(self):
        """This tensor's random stream, keyed by (recipe seed, tensor name): the same numbers
        whatever the tensor order or thread count (see `operators.draws`)."""
        from .draws import make_stream

        return make_stream(self.rng, tensor_seed(self.seed, self.name))


def tensor_seed(seed: int, name: str) -> int:
    import hashlib

    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class KernelSpec:
    """One fast way to run an operator, declared by the operator (its reference is `fn`, which
    runs on any device). `impl` names the function ("module:function", imported on first use;
    the kernels live in mergelab.kernels) that merges one tensor, or declines (returns None) when
    the tensor's layout does not suit it. `where`: "disk" (the streaming engine reading the
    files) or "memory" (the trial merger's cache). `applies(model_params, params, rng)`: whether
    the operator's parameters suit it (None: any)."""

    name: str
    impl: str
    where: Literal["disk", "memory"]
    devices: tuple[str, ...] = ("cpu",)
    compute_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    applies: Callable[[list[dict[str, Any]], dict[str, Any], "str | None"], bool] | None = None


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    params: tuple[ParamSpec, ...]
    summary: str  # what it computes, one line (README table)
    paper: str  # reference, "Title (arXiv id)" or a URL
    needs_base: bool = False
    # mergekit's optional base (nuslerp, multislerp): when the recipe names a base_model it is
    # the origin of the interpolation and does not count towards min_models / max_models
    base_optional: bool = False
    min_models: int = 1
    max_models: int | None = None
    uses_random: bool = False  # draws from MergeInputs.stream()
    uses_deltas: bool = False  # benefits from precomputed task vectors
    uses_sorted_abs: bool = False  # benefits from precomputed magnitude order
    aliases: tuple[str, ...] = field(default_factory=tuple)
    kernels: tuple[KernelSpec, ...] = ()  # fast kernels, tried in order before the reference `fn`
    # What the chunked and compiled kernels (mergelab.kernels) compute for this operator, read by
    # them instead of its name: a weighted sum of the models (linear), or the task-vector method
    # (operators.task_vectors.TaskVectorMethod: its sparsification and mix). An operator that sets
    # neither declares no such kernel.
    weighted_sum: bool = False
    task_vector: Any = None
    # mergekit adds a base_model the recipe does not list among `models` to the average (with
    # the global weight) for this operator (linear, karcher)
    averages_unlisted_base: bool = False
    # its merge equals model j exactly when model j has weight 1, every other model weight 0,
    # density 1 and lambda 1: the layer-source search (search.space) overrides layers that way
    layer_source: bool = False
    # mergekit's passthrough: the merge is one model's tensor (times the optional per-model
    # `scale`), and a recipe's slices always stack layer ranges (mergelab.stack, whose candidate
    # builder serves only these operators), even one uniform slice group
    layer_stacking: bool = False
    # its trial-merger kernel keeps, per tensor, one float32 tensor of the tensor's size for each
    # source it reads (TSV: the base and each fine-tune's decorrelated part), in any cache tier
    keeps_derived: bool = False

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


REGISTRY: dict[str, OperatorSpec] = {}


def register(spec: OperatorSpec) -> OperatorSpec:
    for key in (spec.name, *spec.aliases):
        if key in REGISTRY:
            raise ValueError(f"operator {key!r} registered twice")
        REGISTRY[key] = spec
    return spec


def get_operator(name: str) -> OperatorSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def operator_names() -> list[str]:
    return sorted({s.name for s in REGISTRY.values()})
