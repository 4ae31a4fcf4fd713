"""The `dataflow:` block of a search config (the data-flow search of evolutionary model merging):
kept apart from search/dataflow.py so that search/config.py can name it without import cycles."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DataflowConfig(BaseModel):
    """`dataflow:` — search the sequence of layers instead of merge coefficients.

    repeats: how many times the pool's layers are laid out (the paper: 3).
    max_layers: the path-length budget (default: twice the first model's layer count); when more
        slots are switched on, the ones with the largest logits are kept, in path order.
    scales: one scale per (from model, to model) pair, applied where the path jumps (the next
        layer is not the one that follows in its own model) to the entering layer's o_proj and
        down_proj (its residual contribution) — the paper's W matrix, simplified to model pairs.
    ps_recipe / ps_model: PS + DFS — a parameter-space merge recipe, merged once into ps_model
        (reused when it is there), whose layers join the pool first (the identity path is it).
    """

    model_config = ConfigDict(extra="forbid")
    repeats: int = Field(default=3, ge=1, le=16)
    max_layers: int | None = Field(default=None, ge=1)
    scales: bool = True
    scale_range: tuple[float, float] = (0.5, 1.5)
    ps_recipe: str | None = None
    ps_model: str | None = None
