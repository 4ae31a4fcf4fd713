"""The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA) as one algorithm.

Each method is a switch setting of `generalized_task_arithmetic`: sparsification, sign
consensus, default normalize and rescale, exactly as in mergekit's generalized_task_arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import torch

from . import sparsify as _sp
from .base import KernelSpec, MergeInputs, OperatorSpec, ParamSpec, register
from .checks import add_check, raise_if_invalid
from .draws import CounterStream

Sparsification = Literal["none", "magnitude", "bernoulli", "breadcrumbs", "della"]


@dataclass(frozen=True)
class TaskVectorMethod:
    """One member of the family: mergekit's (consensus, sparsification, defaults) switches."""

    name: str
    sparsification: Sparsification
    consensus: bool  # TIES sign election by weighted sum
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter


def _task_vector_into(out: torch.Tensor, inp: MergeInputs, base: torch.Tensor, i: int) -> torch.Tensor:
    """τᵢ = θᵢ − base written into `out` (a row of the stacked buffer)."""
    if inp.deltas is not None and inp.deltas[i] is not None:
        return out.copy_(inp.deltas[i])
    return torch.sub(inp.models[i], base, out=out)


def _sparsify_(
    method: TaskVectorMethod,
    delta: torch.Tensor,
    mp: dict[str, Any],
    params: dict[str, Any],
    draws,
    sorted_abs: torch.Tensor | None,
) -> torch.Tensor:
    kind = method.sparsification
    density = float(mp["density"])
    if params["rescale"]:
        rescale = "inverse_density" if params.get("rescale_inverse_density", False) else "l1"
    else:
        rescale = "none"
    if kind == "magnitude":
        return _sp.magnitude_(delta, density, rescale, sorted_abs)
    if kind == "breadcrumbs":
        return _sp.breadcrumbs_(delta, density, float(mp["gamma"]), rescale, sorted_abs)
    if kind == "bernoulli":
        return _sp.bernoulli_(delta, density, draws, rescale)
    if kind == "della":
        return _sp.della_(delta, density, float(mp["epsilon"]), draws, rescale)
    return delta


def generalized_task_arithmetic(method: TaskVectorMethod, inp: MergeInputs) -> torch.Tensor:
    """θ = base + λ · mix(wᵢ · sparsify(θᵢ − base)) over the models other than the base.

    mix: with consensus, the majority sign per entry is that of Σ wᵢτᵢ (≥ 0 counts as +), each
    model counts where its sign agrees (zeros never do), and the divisor is Σ wᵢ over the
    agreeing models (0 → 1); without, all count and the divisor is Σ wᵢ (|·| < 1e-8 → 1).
    The divisor applies only when `normalize`. Operations and their order follow mergekit's
    merge_group so the result is the same bit for bit on the CPU.
    """
    raise_if_invalid(method.name, inp.name, inp.model_params, inp.params, inp.base_index)
    base = inp.base if inp.base is not None else inp.models[inp.base_index]
    others = [i for i in range(len(inp.models)) if i != inp.base_index]
    if not others:
        return base.clone()
    params = inp.params
    draws = inp.stream() if method.sparsification in ("bernoulli", "della") else None

    # One stacked buffer, as mergekit does, so the sums over models reduce in the same order;
    # each task vector is computed and sparsified in its row, in place, to bound memory.
    deltas = base.new_empty((len(others), *base.shape))
    for row, i in enumerate(others):
        sorted_abs = inp.sorted_abs[i] if inp.sorted_abs is not None else None
        if isinstance(draws, CounterStream):  # row r draws stretch r of the stream, whatever came before
            draws.position = row * base.numel()
        _sparsify_(
            method, _task_vector_into(deltas[row], inp, base, i), inp.model_params[i], params,
            draws, sorted_abs,
        )
    weights = task_weights(inp.model_params, others, deltas)
    return combine_(method, deltas, weights, base, params)


def task_weights(model_params: list[dict[str, Any]], rows: list[int], like: torch.Tensor) -> torch.Tensor:
    """The weights of the task-vector rows, shaped to broadcast over a stacked (rows, ...) buffer."""
    return torch.tensor(
        [float(model_params[i]["weight"]) for i in rows], dtype=like.dtype, device=like.device
    ).view(len(rows), *([1] * (like.dim() - 1)))


def plain_divisor(weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ over the stacked rows (|·| < 1e-8 → 1): the divisor of a mix without sign consensus."""
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def combine_(
    method: TaskVectorMethod,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    base: torch.Tensor,
    params: dict[str, Any],
    out: torch.Tensor | None = None,
    work: Callable[[str, int, torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """base + λ · mix(weights · deltas) for the stacked, already sparsified task vectors.

    Every step is element by element (sums run over the stacked rows only), so the chunked
    engine calls it on slices and gets the full tensor's values bit for bit. `deltas` is
    overwritten; `out` (shaped like base) and `work` (flat scratch buffers by role, reused
    across calls: work(role, numel, dtype)) avoid fresh allocations.
    """

    def scratch(key: str, shape, dtype) -> torch.Tensor:
        if work is None:
            return torch.empty(shape, dtype=dtype, device=deltas.device)
        n = 1
        for d in shape:
            n *= d
        return work(key, n, dtype).view(shape)

    rows_shape, one_shape = deltas.shape, base.shape
    deltas.mul_(weights)
    mixed = out if out is not None else torch.empty_like(base)
    if method.consensus:
        # Float agreement factor: 1 where sign(w·τᵢ) equals the majority sign (that of Σ wᵢτᵢ,
        # ≥ 0 counting as +), 0 elsewhere (zeros never agree). Products and sums are those of a
        # boolean mask, bit for bit, but float kernels are much faster than boolean ones.
        total = torch.sum(deltas, dim=0, out=scratch("total", one_shape, deltas.dtype))
        # 0/1 in float32: comparisons into bool tensors are ~5x slower on the CPU
        positive = torch.ge(total, 0, out=scratch("positive", one_shape, deltas.dtype))
        majority = torch.mul(positive, 2.0, out=total).sub_(1.0)  # +1 / -1 (masked_fill is slow)
        agree = torch.sign(deltas, out=scratch("agree", rows_shape, deltas.dtype))
        agree.mul_(majority).clamp_(min=0)
        deltas.mul_(agree)
        torch.sum(deltas, dim=0, out=mixed)
        divisor = torch.sum(agree.mul_(weights), dim=0, out=scratch("divisor", one_shape, deltas.dtype))
        divisor.add_(torch.eq(divisor, 0, out=positive))  # 0 -> 1, others + 0 unchanged
    else:
        torch.sum(deltas, dim=0, out=mixed)
        divisor = plain_divisor(weights)

    if params["normalize"]:
        mixed /= divisor
    lam = float(params["lambda"])
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)  # = base + mixed, bit for bit, without a new tensor


def _della_check(model_params: list[dict[str, Any]], params: dict[str, Any], base_index) -> str | None:
    for i, mp in enumerate(model_params):
        if i == base_index:
            continue
        density, epsilon = float(mp["density"]), float(mp["epsilon"])
        if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return (
                f"models[{i}] has density {density:g} and epsilon {epsilon:g}, but DELLA needs "
                f"density - epsilon > 0 and density + epsilon < 1 (keep probabilities inside "
                f"(0, 1)); lower epsilon below {min(density, 1 - density):g} or set density to 1."
            )
    return None


# ---- parameter declarations (names, defaults and scopes are mergekit's) --------------------

def _weight(help_extra: str = "") -> ParamSpec:
    return ParamSpec(
        "weight", "model", None, "float", required=True, search_range=(0.0, 1.0),
        help="Coefficient wᵢ of this model's task vector (any finite number; negative subtracts "
        "the task)." + help_extra,
    )


def _density(used: bool) -> ParamSpec:
    if not used:
        return ParamSpec(
            "density", "model", 1.0, "float", low=0.0, high=1.0, low_open=True,
            help="Accepted for mergekit compatibility; this method does not sparsify, so it has no effect.",
        )
    return ParamSpec(
        "density", "model", 1.0, "float", low=0.0, high=1.0, low_open=True,
        search_range=(0.1, 1.0),
        help="Fraction of the task vector's entries kept per tensor (1 keeps all).",
    )


_LAMBDA = ParamSpec(
    "lambda", "global", 1.0, "float", search_range=(0.5, 2.0),
    help="Scale λ of the merged task vector before it is added to the base.",
)
_INT8_MASK = ParamSpec(
    "int8_mask", "global", False, "bool",
    help="mergekit's memory option for the sign mask; accepted for compatibility, the result "
    "is the same either way.",
)


def _normalize(default: bool, consensus: bool) -> ParamSpec:
    over = "the weights of the models whose sign agrees, per entry" if consensus else "Σ wᵢ"
    return ParamSpec(
        "normalize", "global", default, "bool",
        help=f"Divide the weighted sum of task vectors by {over}.",
    )


def _rescale(default: bool, kind: Sparsification) -> ParamSpec:
    if kind == "none":
        return ParamSpec(
            "rescale", "global", default, "bool",
            help="Accepted for mergekit compatibility; without sparsification it has no effect.",
        )
    return ParamSpec(
        "rescale", "global", default, "bool",
        help="Scale the kept entries so each sparsified task vector keeps its L1 norm "
        "(mergekit; skipped when a norm is below 1e-7).",
    )


_INVERSE_DENSITY = ParamSpec(
    "rescale_inverse_density", "global", False, "bool",
    help="With rescale, multiply the kept entries by 1/density as the DARE paper does, instead "
    "of mergekit's L1-norm matching (the two agree only in expectation). Not a mergekit option.",
)
_GAMMA = ParamSpec(
    "gamma", "model", 0.01, "float", low=0.0, high=1.0, search_range=(0.0, 0.1),
    help="Fraction of the largest-magnitude entries dropped as outliers before the smallest "
    "are dropped down to `density`.",
)
_EPSILON = ParamSpec(
    "epsilon", "model", 0.15, "float", low=0.0, high=0.5, high_open=True,
    search_range=(0.0, 0.1),
    help="Spread of DELLA's keep probabilities: density ± epsilon from smallest to largest "
    "magnitude in each row; density - epsilon must stay > 0 and density + epsilon < 1.",
)

_TA_PAPER = "Editing Models with Task Arithmetic (arXiv 2212.04089)"
_TIES_PAPER = "TIES-Merging: Resolving Interference When Merging Models (arXiv 2306.01708)"
_DARE_PAPER = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch (arXiv 2311.03099)"
)
_BREADCRUMBS_PAPER = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (arXiv 2312.06795)"
)
_DELLA_PAPER = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling "
    "(arXiv 2406.11617)"
)

_SPARSIFY_TEXT = {
    "none": "",
    "magnitude": "keep the top-density fraction of each τᵢ by magnitude, ",
    "bernoulli": "drop each entry of τᵢ with probability 1 − density, rescale survivors, ",
    "breadcrumbs": "drop the largest gamma and the smallest entries of τᵢ down to density, ",
    "della": "drop entries of τᵢ with a probability that falls with their magnitude rank, rescale, ",
}

METHODS: tuple[tuple[TaskVectorMethod, str], ...] = (
    (TaskVectorMethod("task_arithmetic", "none", False, False, False), _TA_PAPER),
    (TaskVectorMethod("ties", "magnitude", True, True, False), _TIES_PAPER),
    (TaskVectorMethod("dare_ties", "bernoulli", True, False, True), _DARE_PAPER),
    (TaskVectorMethod("dare_linear", "bernoulli", False, False, True), _DARE_PAPER),
    (TaskVectorMethod("breadcrumbs", "breadcrumbs", False, False, False), _BREADCRUMBS_PAPER),
    (TaskVectorMethod("breadcrumbs_ties", "breadcrumbs", True, False, False), _BREADCRUMBS_PAPER),
    (TaskVectorMethod("della", "della", True, True, True), _DELLA_PAPER),
    (TaskVectorMethod("della_linear", "della", False, False, True), _DELLA_PAPER),
)


def _summary(m: TaskVectorMethod) -> str:
    if m.consensus and m.normalize:
        mix = "elect each entry's sign by Σ wᵢτᵢ, mix = mean of the agreeing wᵢτᵢ (disjoint mean)"
    elif m.consensus:
        mix = "elect each entry's sign by Σ wᵢτᵢ, mix = sum of the agreeing wᵢτᵢ"
    else:
        mix = "mix = Σ wᵢτᵢ"
    return f"τᵢ = θᵢ − base; {_SPARSIFY_TEXT[m.sparsification]}{mix}; θ = base + λ·mix"


def _dare16_applies(model_params: list[dict[str, Any]], params: dict[str, Any], rng: str | None) -> bool:
    """mergekit's stream with L1 rescale, every density below 1 (the base's entry has none)."""
    return rng == "mergekit" and bool(params["rescale"]) and not params.get("rescale_inverse_density", False) \
        and all(float(mp.get("density", 0.0)) < 1 for mp in model_params if "density" in mp)


def _kernels(m: TaskVectorMethod) -> tuple[KernelSpec, ...]:
    """The compiled/chunked kernels serve the methods without DELLA/breadcrumbs ranking."""
    if m.sparsification not in ("none", "magnitude", "bernoulli"):
        return ()
    dare16 = ()
    if m.sparsification == "bernoulli":
        # mergekit's draws kept as 1-byte keys, over the 16-bit sources as stored
        dare16 = (KernelSpec("dare16", "mergelab.kernels.memory:dare16", "memory", applies=_dare16_applies),)
    return dare16 + (
        KernelSpec("chunked", "mergelab.kernels.memory:chunked", "memory"),
        KernelSpec("chunked", "mergelab.kernels.disk:chunked", "disk"),
    )


def _spec(m: TaskVectorMethod, paper: str) -> OperatorSpec:
    params = [
        _weight(),
        _density(m.sparsification != "none"),
        _LAMBDA,
        _normalize(m.normalize, m.consensus),
        _rescale(m.rescale, m.sparsification),
        _INT8_MASK,
    ]
    if m.sparsification == "breadcrumbs":
        params.append(_GAMMA)
    if m.sparsification == "della":
        params.append(_EPSILON)
    if m.sparsification == "bernoulli":
        params.append(_INVERSE_DENSITY)
    return OperatorSpec(
        name=m.name,
        fn=partial(generalized_task_arithmetic, m),
        params=tuple(params),
        summary=_summary(m),
        paper=paper,
        needs_base=True,
        min_models=1,
        uses_random=m.sparsification in ("bernoulli", "della"),
        uses_deltas=True,
        uses_sorted_abs=m.sparsification in ("magnitude", "breadcrumbs"),
        kernels=_kernels(m),
        task_vector=m,
        layer_source=m.sparsification in ("none", "magnitude", "bernoulli"),
    )


for _m, _paper in METHODS:
    register(_spec(_m, _paper))
    if _m.sparsification == "della":
        add_check(_m.name, _della_check)
