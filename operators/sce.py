"""SCE (select, calculate, erase): task vectors kept where the models disagree most, weighted
by their mean square, merged where their signs agree (mergekit's `sce`)."""
from __future__ import annotations

import torch

from .base import MergeInputs, OperatorSpec, ParamSpec, register


def _select_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` share (of the non-zero entries) of the variance across models."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    # torch.topk as mergekit calls it: among equal variances the kept entries follow topk's order
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[idx] = 1
    return mask


def _weights(tvs: torch.Tensor) -> torch.Tensor:
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def sce(inp: MergeInputs) -> torch.Tensor:
    base = inp.base if inp.base is not None else inp.models[inp.base_index]
    others = [m for i, m in enumerate(inp.models) if i != inp.base_index]
    if not others:
        return base.clone()
    tvs = torch.stack([m - base for m in others], dim=0)
    topk = float(inp.params["select_topk"])
    if topk < 1:
        tvs = tvs * _select_mask(tvs, topk).unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == majority
    w = _weights(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    merged = (tvs * ew).sum(dim=0)
    return base + merged / torch.sum(ew, dim=0).clamp(min=1e-6)


register(
    OperatorSpec(
        name="sce",
        fn=sce,
        params=(
            ParamSpec(
                "select_topk", "global", 1.0, "float", low=0.0, high=1.0, search_range=(0.1, 1.0),
                help="Share of entries kept, ranked by the variance of the task vectors across models.",
            ),
            ParamSpec(
                "int8_mask", "global", False, "bool",
                help="mergekit's memory switch for the masks; the result is the same either way.",
            ),
        ),
        summary=(
            "τᵢ masked to the top select_topk of Var_i(τ); wᵢ = mean(τᵢ²)/Σ mean(τ²); "
            "θ = base + Σ wᵢτᵢ·[sign agrees] / max(Σ wᵢ·[sign agrees], 1e-6)"
        ),
        paper="FuseChat: Knowledge Fusion of Chat Models (arXiv 2408.07990)",
        needs_base=True,
        min_models=1,
    )
)
