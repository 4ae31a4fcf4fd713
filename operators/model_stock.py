"""`model_stock`: interpolate between the base and the mean of the fine-tunes by a ratio set
from the angle between their task vectors (Model Stock, mergekit's semantics)."""
from __future__ import annotations

from typing import Any

import torch

from .sparsify import one_thread
from .base import MergeInputs, OperatorSpec, ParamSpec, register
from .checks import add_check, raise_if_invalid


def model_stock(inp: MergeInputs) -> torch.Tensor:
    """cosθ = mean pairwise cosine of the task vectors (θᵢ − base), t = N·cosθ / (1 + (N−1)·cosθ),
    θ = t·mean(θᵢ) + (1 − t)·base; t = 0 where the denominator is ~0. With filter_wise the
    angle is taken per row instead of over the whole tensor. Same operations as mergekit."""
    raise_if_invalid("model_stock", inp.name, inp.model_params, inp.params, inp.base_index)
    base = inp.base if inp.base is not None else inp.models[inp.base_index]
    others = [i for i in range(len(inp.models)) if i != inp.base_index]
    out_shape = base.shape
    filter_wise = bool(inp.params["filter_wise"])

    def rows(x: torch.Tensor) -> torch.Tensor:
        if filter_wise:
            return x.unsqueeze(0) if x.dim() == 1 else x
        return x.reshape(-1)

    w_0 = rows(base)
    ws = [rows(inp.models[i]) for i in others]
    if inp.deltas is not None:
        offsets = [rows(inp.deltas[i]) for i in others]
    else:
        offsets = [w - w_0 for w in ws]
    cos_thetas = []
    with one_thread():  # the same sums whatever the thread count
        for idx, offset_a in enumerate(offsets):
            for offset_b in offsets[idx + 1 :]:
                norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
                cos_thetas.append(
                    ((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1)
                )
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    # Opposed task vectors make the denominator vanish: keep the base rather than blow up.
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def _check(model_params: list[dict[str, Any]], params: dict[str, Any], base_index) -> str | None:
    others = len(model_params) - (base_index is not None)
    if others < 2:
        return (
            f"model_stock needs at least two models besides the base (it measures the angle "
            f"between their task vectors), but {others} are listed; add another fine-tune."
        )
    return None


register(
    OperatorSpec(
        name="model_stock",
        fn=model_stock,
        params=(
            ParamSpec(
                "filter_wise", "global", False, "bool",
                help="Measure the angle per row (output filter) instead of over the whole tensor.",
            ),
        ),
        summary=(
            "cosθ = mean pairwise cosine of τᵢ = θᵢ − base, t = N·cosθ/(1+(N−1)·cosθ); "
            "θ = t·mean(θᵢ) + (1−t)·base"
        ),
        paper="Model Stock: All we need is just a few fine-tuned models (arXiv 2403.19522)",
        needs_base=True,
        min_models=2,
        uses_deltas=True,
    )
)
add_check("model_stock", _check)
