"""Shared fixtures: tiny transformers models saved as safetensors (made on the fly, offline)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def make_llama(path: Path, seed: int = 0, *, layers: int = 2, hidden: int = 32, vocab: int = 64,
               tie: bool = False, dtype=torch.float32, base: Path | None = None, scale: float = 0.05,
               shard_size: str | None = None) -> Path:
    """A tiny Llama. With `base`, a 'fine-tune': the base's weights plus seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if base is not None:
        from safetensors.torch import load_file

        sd = {}
        for f in sorted(base.glob("*.safetensors")):
            sd.update(load_file(f))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in sd:
                    p.copy_(sd[name].float() + scale * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", 0)
    a = make_llama(root / "ft_a", 1, base=base)
    b = make_llama(root / "ft_b", 2, base=base)
    c = make_llama(root / "ft_c", 3, base=base)
    return {"base": base, "a": a, "b": b, "c": c}


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    base = make_llama(root / "base", 0, tie=True)
    a = make_llama(root / "ft_a", 1, base=base, tie=True)
    b = make_llama(root / "ft_b", 2, base=base, tie=True)
    return {"base": base, "a": a, "b": b}


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_tiny_model(path: Path, seed: int) -> None:
    """A 4-layer Llama-named checkpoint of random tensors (no transformers): enough for
    search-space and run-directory tests that never run the model."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g),
         "lm_head.weight": torch.randn(10, 4, generator=g), "model.norm.weight": torch.ones(4)}
    for l in range(4):
        t[f"model.layers.{l}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
        t[f"model.layers.{l}.mlp.up_proj.weight"] = torch.randn(4, 4, generator=g)
        t[f"model.layers.{l}.input_layernorm.weight"] = torch.ones(4)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 4,
                                                  "vocab_size": 10, "architectures": ["LlamaForCausalLM"]}))


async def settled(pilot, timeout: float = 10.0):
    """Wait until two screenshots taken a moment apart are identical: a snapshot must not catch a
    refresh half-way (column widths, the plot, the log are laid out over a few refreshes)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        shot = pilot.app.export_screenshot()
        if shot == last:
            return
        last = shot
        await pilot.pause(0.15)
    raise AssertionError("the screen kept changing")
