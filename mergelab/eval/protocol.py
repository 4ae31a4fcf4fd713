"""What a scorer needs from a model: logits for a padded batch, and greedy generation.

A plain transformers model (HFLogitModel in mergelab.eval.models), a weight merge held in
memory, and an inference-time logit fusion (mergelab.fusion) all implement this, so one eval
spec scores all of them the same way.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitModel(Protocol):
    device: torch.device
    vocab_size: int  # number of real tokens (logits beyond it, e.g. padding rows, are ignored)

    def logits(
        self,
        input_ids: torch.Tensor,  # [B, T] long, LEFT-padded
        attention_mask: torch.Tensor,  # [B, T] 1 for real tokens
        prompt_lengths: torch.Tensor | None = None,  # [B] number of prompt tokens (not counting padding)
    ) -> torch.Tensor:  # [B, T, vocab_size] float32; logits[:, t] predicts token t + 1
        ...

    def generate_greedy(
        self,
        input_ids: torch.Tensor,  # [B, T] LEFT-padded prompts
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,  # called with a row's new tokens; True ends that row
    ) -> list[list[int]]:  # new token ids per row (without the prompt)
        ...
