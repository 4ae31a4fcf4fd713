"""Passthrough: one model's tensor, optionally scaled; with `slices` it stacks layer ranges
(mergekit's frankenmerge), the plan choosing which source layer feeds each output layer."""
from __future__ import annotations

import torch

from .base import MergeInputs, OperatorSpec, ParamSpec, register


def passthrough(inp: MergeInputs) -> torch.Tensor:
    scale = inp.model_params[0]["scale"]
    x = inp.models[0]
    return x.clone() if scale is None else x * float(scale)


register(
    OperatorSpec(
        name="passthrough",
        fn=passthrough,
        params=(
            ParamSpec(
                "scale", "model", None, "float",
                help="Multiplies the tensor (e.g. damp a repeated layer's o_proj/down_proj with a filter).",
            ),
        ),
        summary="θ = scale·θ₁ (the tensor as it is without scale); with slices: layer stacking",
        paper="mergekit's passthrough (https://github.com/arcee-ai/mergekit)",
        min_models=1,
        max_models=1,
        layer_stacking=True,
    )
)
