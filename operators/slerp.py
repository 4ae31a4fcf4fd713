"""`slerp`: spherical interpolation between the base (t = 0) and one other model.

Works in torch on the tensors' device, in chunks that bound the float32 scratch like mergekit.
"""
from __future__ import annotations

from typing import Any

import torch

from .sparsify import one_thread
from .base import MergeInputs, OperatorSpec, ParamSpec, register
from .checks import add_check, raise_if_invalid

DOT_THRESHOLD = 0.9995  # |cos| above this: (anti)parallel, interpolate linearly (mergekit)
_EPS = 1e-8  # norms at or below this count as 1
_CHUNK = 1024 * 1024  # elements per chunk, as in mergekit


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of two same-shaped tensors viewed as flat vectors.

    cosθ is the dot product of the normalized vectors (clamped to [-1, 1]); the result is
    sin((1−t)θ)/sinθ · v0 + sin(tθ)/sinθ · v1 on the unnormalized tensors, or the linear
    interpolation (1−t)·v0 + t·v1 when |cosθ| > 0.9995. Same operations as mergekit's slerp.
    """
    a = v0.reshape(1, -1).to(torch.float32)
    b = v1.reshape(1, -1).to(torch.float32)
    tt = torch.tensor([[t]], dtype=torch.float32, device=a.device)
    n = a.shape[1]
    if n == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    # reductions on one CPU thread: the same sums whatever the thread count
    with one_thread():
        chunks = range(0, n, _CHUNK)
        norm_a = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(a[:, s : s + _CHUNK], dim=1, keepdim=True) for s in chunks]),
            dim=0,
        )
        norm_b = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(b[:, s : s + _CHUNK], dim=1, keepdim=True) for s in chunks]),
            dim=0,
        )
        norm_a = torch.where(norm_a > _EPS, norm_a, 1)
        norm_b = torch.where(norm_b > _EPS, norm_b, 1)
        dot = torch.stack(
            [
                ((a[:, s : s + _CHUNK] / norm_a) * (b[:, s : s + _CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                for s in chunks
            ]
        ).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in chunks:
        result[:, s : s + _CHUNK] = coef_a * a[:, s : s + _CHUNK] + coef_b * b[:, s : s + _CHUNK]
    return result.reshape(v0.shape)


def _endpoints(inp: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    others = [i for i in range(len(inp.models)) if i != inp.base_index]
    base = inp.base if inp.base is not None else inp.models[inp.base_index]
    return base, inp.models[others[0]]


def slerp(inp: MergeInputs) -> torch.Tensor:
    raise_if_invalid("slerp", inp.name, inp.model_params, inp.params, inp.base_index)
    v0, v1 = _endpoints(inp)
    return slerp_tensors(float(inp.params["t"]), v0, v1)


def _check(model_params: list[dict[str, Any]], params: dict[str, Any], base_index) -> str | None:
    others = len(model_params) - (base_index is not None)
    if others != 1:
        return (
            f"slerp interpolates between the base and exactly one other model, but {others} "
            f"models other than the base are listed; list the base and one model."
        )
    return None


register(
    OperatorSpec(
        name="slerp",
        fn=slerp,
        params=(
            ParamSpec(
                "t", "global", None, "float", low=0.0, high=1.0, required=True,
                search_range=(0.0, 1.0),
                help="Interpolation position: 0 gives the base, 1 the other model.",
            ),
        ),
        summary=(
            "θ = sin((1−t)Ω)/sinΩ·θ_base + sin(tΩ)/sinΩ·θ₁, cosΩ = cosine of the flattened "
            "tensors; linear interpolation when |cosΩ| > 0.9995"
        ),
        paper="Animating Rotation with Quaternion Curves (Shoemake, SIGGRAPH 1985)",
        needs_base=True,
        min_models=1,
        max_models=1,
    )
)
add_check("slerp", _check)
