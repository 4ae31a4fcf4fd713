"""Transformers causal LMs as LogitModels: left-padding-safe logits and cached greedy decoding.

Also loads a model directory (safetensors only, no remote code) for `mergelab eval`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from ..engine import resolve_device  # noqa: F401  (re-exported: eval, fusion and the CLI import it from here)
from ..errors import MergelabError


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts every real token to the right; positions must still start at 0 at the
    # first real token, or a padded row would see different rotary angles than the same row alone.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HFLogitModel:
    """A transformers causal LM seen through the LogitModel protocol."""

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        config_vocab = int(model.config.get_text_config().vocab_size)
        # Rows past the tokenizer's length are padding of the embedding matrix (e.g. Qwen pads to
        # a multiple of 128); they are never real tokens, so they must not take probability mass.
        self.vocab_size = min(config_vocab, len(tokenizer)) if tokenizer is not None else config_vocab
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); older
        # releases only know the old one. Ask the signature rather than pin a version.
        params_of_forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params_of_forward else "past_key_values"
        self._keep_last = "logits_to_keep" in params_of_forward

    def logits(self, input_ids, attention_mask, prompt_lengths=None, keep_last: int | None = None):
        """keep_last: only the last k positions' logits ([B, k, V]); the head skips the rest."""
        with torch.inference_mode():
            input_ids = input_ids.to(self.device)
            attention_mask = attention_mask.to(self.device)
            extra = {"logits_to_keep": keep_last} if keep_last is not None and self._keep_last else {}
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=_positions(attention_mask),
                use_cache=False,
                **extra,
            )
            logits = out.logits if keep_last is None else out.logits[:, -keep_last:]
            return logits[..., : self.vocab_size].float()

    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> list[list[int]]:
        batch = input_ids.shape[0]
        new: list[list[int]] = [[] for _ in range(batch)]
        if max_new_tokens <= 0 or batch == 0:
            return new
        done = [False] * batch
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            mask = attention_mask.to(self.device).long()
            positions = _positions(mask)
            # Only the last position's logits are needed; asking for all of them would allocate
            # [B, T, V] for nothing on the prompt pass.
            extra = {"logits_to_keep": 1} if self._keep_last else {}
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra
            )
            past = _cache_of(out)
            last_pos = positions[:, -1:]
            for _ in range(max_new_tokens):
                next_tok = out.logits[:, -1, : self.vocab_size].argmax(-1)
                for row, tok in enumerate(next_tok.tolist()):
                    if done[row]:
                        continue
                    new[row].append(tok)
                    if (eos_token_id is not None and tok == eos_token_id) or (
                        stop is not None and stop(new[row])
                    ) or len(new[row]) >= max_new_tokens:
                        done[row] = True
                if all(done):
                    break
                # Finished rows keep decoding (their tokens are discarded) so the batch stays
                # rectangular; that costs a little compute but never changes the other rows.
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                last_pos = last_pos + 1
                out = self.model(
                    input_ids=next_tok[:, None],
                    attention_mask=mask,
                    position_ids=last_pos,
                    use_cache=True,
                    **{self._cache_arg: past},
                )
                past = _cache_of(out)
        return new


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype=None):
    """Load a Hugging Face model directory as (model, tokenizer), safetensors only, no remote code.

    dtype None means float32 on the CPU (half precision is slow there) and the checkpoint's own
    dtype on a GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise MergelabError(
            f"Model directory {path} does not exist (or is not a directory). Give the path of a "
            "Hugging Face model directory with config.json and *.safetensors files, or a recipe YAML."
        )
    if not (path / "config.json").is_file():
        raise MergelabError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. Point to the "
            "directory that holds config.json, the tokenizer files and the *.safetensors weights."
        )
    if not any(path.glob("*.safetensors")):
        raise MergelabError(
            f"{path} has no *.safetensors weights. mergelab loads safetensors only (pickle-based "
            ".bin files can run code when loaded); convert the checkpoint to safetensors first."
        )
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=False, use_safetensors=True, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as e:
        raise MergelabError(
            f"Could not load the model in {path} with transformers: {e}. Check that the directory "
            "holds a complete causal-LM checkpoint (config.json, tokenizer files, safetensors)."
        ) from e
    model.to(device)
    model.eval()
    return model, tokenizer
