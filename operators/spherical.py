"""Interpolation on the hypersphere beyond two-model slerp: nuslerp (row-wise or flattened
slerp with weights, optionally of task vectors), multislerp (barycentric, tangent space at the
weighted mean) and the Karcher mean. Each follows mergekit's implementation and defaults."""
from __future__ import annotations

from typing import Any

import torch

from .base import MergeInputs, OperatorSpec, ParamSpec, register
from .checks import add_check


def _split(inp: MergeInputs) -> tuple[torch.Tensor | None, list[torch.Tensor], list[dict[str, Any]]]:
    """(base or None, the other models, their parameters)."""
    idx = [i for i in range(len(inp.models)) if i != inp.base_index]
    base = inp.base if inp.base is not None else (inp.models[inp.base_index] if inp.base_index is not None else None)
    return base, [inp.models[i] for i in idx], [inp.model_params[i] for i in idx]


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
                    flatten: bool = False) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(inp: MergeInputs) -> torch.Tensor:
    base, (a, b), mps = _split(inp)
    w0, w1 = float(mps[0]["weight"]), float(mps[1]["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    dim = 0 if inp.params["nuslerp_row_wise"] else -1
    flat = bool(inp.params["nuslerp_flatten"])
    if base is not None:
        return base + nuslerp_tensors(t, a - base, b - base, dim=dim, flatten=flat)
    return nuslerp_tensors(t, a, b, dim=dim, flatten=flat)


def multislerp(inp: MergeInputs) -> torch.Tensor:
    base, models, mps = _split(inp)
    if len(models) == 1:
        return models[0].clone()
    eps = float(inp.params["eps"])
    x = torch.stack(models, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor([float(mp["weight"]) for mp in mps], dtype=x.dtype, device=x.device)
    if inp.params["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] == 2:
            res = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
            return res + base if base is not None else res
        from mergelab.errors import MergelabError

        raise MergelabError(
            f"multislerp at tensor {inp.name!r}: the weighted sum of the (unit) inputs is zero, so "
            "there is no mean direction (antipodal models with weights that cancel). Change the weights."
        )
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tres = (tangent * w.view(-1, 1)).sum(0)
    tnorm = torch.norm(tres) + eps
    res = mean * torch.cos(tnorm) + tres * (torch.sin(tnorm) / tnorm)
    res = (res * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return res + base if base is not None else res


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean of the directions, scaled by the weighted mean norm;
    mergekit's iteration, step for step (fixed-point updates, stop when the tangent is < tol)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(wide))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for ai, u in zip(a, us):
        mean += ai * u
    mn = torch.linalg.vector_norm(mean.to(wide))
    mean = us[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(wide))
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(wide))
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return scale * mean


def karcher(inp: MergeInputs) -> torch.Tensor:
    # mergekit's karcher ignores the base role: every input, the base included, is averaged
    xs = list(inp.models)
    if inp.base is not None and inp.base_index is None:
        xs.append(inp.base)
    return karcher_mean(xs, [1.0 / len(xs)] * len(xs), int(inp.params["max_iter"]), float(inp.params["tol"]))


def _two_others(model_params, params, base_index) -> str | None:
    others = len(model_params) - (base_index is not None)
    if others != 2:
        return f"nuslerp interpolates exactly two models besides the base, but {others} are listed."
    return None


_WEIGHT = ParamSpec(
    "weight", "model", None, "float", required=True, search_range=(0.0, 1.0),
    help="Relative weight of the model.",
)

register(
    OperatorSpec(
        name="nuslerp",
        fn=nuslerp,
        params=(
            _WEIGHT,
            ParamSpec("nuslerp_row_wise", "global", False, "bool",
                      help="Interpolate each column vector (dim 0) instead of each row; ignored when flattening."),
            ParamSpec("nuslerp_flatten", "global", True, "bool",
                      help="Slerp the flattened tensor as one vector (mergekit's default)."),
        ),
        summary=(
            "slerp at t = w₂/(w₁+w₂) of the two models (of their task vectors when a base is given), "
            "per row or flattened; lerp where the vectors are colinear"
        ),
        paper="mergekit's nuslerp (https://github.com/arcee-ai/mergekit)",
        base_optional=True,
        min_models=2,
        max_models=2,
    )
)
add_check("nuslerp", _two_others)

register(
    OperatorSpec(
        name="multislerp",
        fn=multislerp,
        params=(
            _WEIGHT,
            ParamSpec("normalize_weights", "global", True, "bool", help="Divide the weights by their sum."),
            ParamSpec("eps", "global", 1e-8, "float", low=0.0, low_open=True, help="Numerical floor."),
        ),
        summary=(
            "barycentric slerp: unit vectors (task vectors with a base) mapped to the tangent space "
            "at their weighted mean, averaged, mapped back, scaled by the weighted mean norm"
        ),
        paper="Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
        base_optional=True,
        min_models=1,
    )
)

register(
    OperatorSpec(
        name="karcher",
        fn=karcher,
        params=(
            ParamSpec("max_iter", "global", 10, "int", low=1, help="Fixed-point iterations at most."),
            ParamSpec("tol", "global", 1e-5, "float", low=0.0, low_open=True, help="Convergence tolerance."),
        ),
        summary=(
            "Karcher mean of the models' directions on the unit sphere (equal weights, base_model "
            "included as one more model), scaled by the mean norm"
        ),
        paper="Karcher mean merging (arXiv 2603.04972)",
        min_models=1,
        averages_unlisted_base=True,
    )
)
