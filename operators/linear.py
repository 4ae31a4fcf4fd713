"""`linear`: the weighted average of the models (model soup), mergekit's default semantics.

Every entry of the recipe's `models` takes part, the base too when it is listed there.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import KernelSpec, MergeInputs, OperatorSpec, ParamSpec, register
from .checks import add_check, raise_if_invalid


def linear(inp: MergeInputs) -> torch.Tensor:
    """Σ wᵢθᵢ, divided by Σ wᵢ when `normalize` (mergekit's linear_merge, same operations)."""
    raise_if_invalid("linear", inp.name, inp.model_params, inp.params, inp.base_index)
    first = inp.models[0]
    weights = linear_weights(inp.model_params, first.device)
    result = torch.empty_like(first, dtype=torch.float32)
    return weighted_sum_(result, inp.models, weights, inp.params["normalize"])


def linear_weights(model_params: list[dict[str, Any]], device=None) -> torch.Tensor:
    return torch.tensor([float(mp["weight"]) for mp in model_params], dtype=torch.float32, device=device)


def weighted_sum_(result: torch.Tensor, tensors, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """result = Σ wᵢ·tensors[i] (/ Σ wᵢ), in place. Element by element, so the chunked engine
    calls it on slices and gets the full tensor's values bit for bit."""
    scalar_shape = (1,) * result.dim()
    result.zero_()
    for tensor, weight in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor, weight.reshape(scalar_shape))
    if normalize:
        result.div_(weights.sum(dim=0).reshape(scalar_shape))
    return result


def _check(model_params: list[dict[str, Any]], params: dict[str, Any], base_index) -> str | None:
    if params["normalize"] and sum(float(mp["weight"]) for mp in model_params) == 0:
        return (
            "the weights sum to 0 and normalize is true, so the average would divide by zero; "
            "change a weight or set normalize: false."
        )
    return None


register(
    OperatorSpec(
        name="linear",
        fn=linear,
        params=(
            ParamSpec(
                "weight", "model", None, "float", required=True, search_range=(0.0, 1.0),
                help="Coefficient of this model in the weighted sum (any finite number).",
            ),
            ParamSpec(
                "normalize", "global", True, "bool",
                help="Divide by the sum of the weights, making the result a weighted average.",
            ),
        ),
        summary="θ = Σ wᵢθᵢ / Σ wᵢ (the division only with normalize; the base counts when listed in models)",
        paper=(
            "Model soups: averaging weights of multiple fine-tuned models improves accuracy "
            "without increasing inference time (arXiv 2203.05482)"
        ),
        needs_base=False,
        min_models=1,
        weighted_sum=True,
        averages_unlisted_base=True,
        layer_source=True,
        kernels=(
            # the compiled weighted sum of the 16-bit sources as stored, into the model's parameter
            KernelSpec("linear16", "mergelab.kernels.memory:linear16", "memory"),
            KernelSpec("chunked", "mergelab.kernels.memory:chunked", "memory"),
            KernelSpec("chunked", "mergelab.kernels.disk:chunked", "disk"),
        ),
    )
)
add_check("linear", _check)
