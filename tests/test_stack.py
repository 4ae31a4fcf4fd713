"""Layer stacking (mergekit's passthrough with several slices, and per-slice merges): output
tensors checked against hand-built expectations from the source files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_dir, make_llama, write_recipe
from mergelab.cli import main
from mergelab.engine import merge_to_dir
from mergelab.errors import MergelabError
from mergelab.recipe import load_recipe


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep")
    base = make_llama(root / "base", 0, layers=4)
    return {"base": base, "a": make_llama(root / "a", 1, layers=4, base=base),
            "b": make_llama(root / "b", 2, layers=4, base=base)}


def _layer(sd: dict, i: int) -> dict[str, torch.Tensor]:
    pre = f"model.layers.{i}."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def test_passthrough_stack_renumbers_layers(deep, tmp_path):
    a, b = str(deep["a"]), str(deep["b"])
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4]}]},
        {"sources": [{"model": a, "layer_range": [2, 3]}]},
    ]}
    merge_to_dir(recipe, tmp_path / "out", device="cpu")
    out, sa, sb = load_dir(tmp_path / "out"), load_dir(deep["a"]), load_dir(deep["b"])
    expected = [(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3), (sa, 2)]
    assert len({k for k in out if k.startswith("model.layers.")}) == 7 * len(_layer(sa, 0))
    for i, (src, j) in enumerate(expected):
        got, want = _layer(out, i), _layer(src, j)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (i, j)
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice
    assert torch.equal(out["model.norm.weight"], sa["model.norm.weight"])  # last slice is a's
    assert torch.equal(out["lm_head.weight"], sa["lm_head.weight"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7
    written = load_recipe(tmp_path / "out" / "mergelab_recipe.yaml")
    assert written.is_stack and [s.sources[0].layer_range for s in written.slices] == [(0, 3), (1, 4), (2, 3)]
    assert written.dtype == "float32"


def test_head_and_norm_from_last_slice(deep, tmp_path):
    a, b = str(deep["a"]), str(deep["b"])
    merge_to_dir({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [2, 4]}]}]}, tmp_path / "o", device="cpu")
    out, sa, sb = load_dir(tmp_path / "o"), load_dir(deep["a"]), load_dir(deep["b"])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"])


def test_scale_with_filter_damps_repeated_layer(deep, tmp_path):
    a = str(deep["a"])
    merge_to_dir({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": a, "layer_range": [1, 2]}],
         "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.25},
                                  {"value": 1.0}]}},
        {"sources": [{"model": a, "layer_range": [2, 4]}]}]}, tmp_path / "s", device="cpu")
    out, sa = load_dir(tmp_path / "s"), load_dir(deep["a"])
    rep, src = _layer(out, 2), _layer(sa, 1)
    assert torch.equal(rep["self_attn.o_proj.weight"], src["self_attn.o_proj.weight"] * 0.5)
    assert torch.equal(rep["mlp.down_proj.weight"], src["mlp.down_proj.weight"] * 0.25)
    assert torch.equal(rep["self_attn.q_proj.weight"], src["self_attn.q_proj.weight"])
    assert torch.equal(_layer(out, 1)["self_attn.o_proj.weight"], src["self_attn.o_proj.weight"])  # unscaled copy
    assert torch.equal(_layer(out, 4)["mlp.up_proj.weight"], _layer(sa, 3)["mlp.up_proj.weight"])


def test_per_slice_merge_any_operator(deep, tmp_path):
    base, a, b = str(deep["base"]), str(deep["a"]), str(deep["b"])
    merge_to_dir({"merge_method": "task_arithmetic", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]},
                     {"model": b, "layer_range": [2, 4]}], "parameters": {"weight": 0.5}},
        {"sources": [{"model": base, "layer_range": [3, 4]}, {"model": a, "layer_range": [3, 4]},
                     {"model": b, "layer_range": [3, 4]}], "parameters": {"weight": [1.0, 0.0]}}]},
        tmp_path / "m", device="cpu")
    out = load_dir(tmp_path / "m")
    s0, sa, sb = load_dir(deep["base"]), load_dir(deep["a"]), load_dir(deep["b"])
    for i, (j, k) in enumerate([(0, 2), (1, 3)]):  # base/a layer j, b layer k
        for name, w in _layer(out, i).items():
            t0 = _layer(s0, j)[name]
            want = t0 + 0.5 * (_layer(sa, j)[name] - t0) + 0.5 * (_layer(sb, k)[name] - t0)
            assert torch.allclose(w, want, atol=1e-6), (i, name)
    # a one-layer slice takes t = 1 (mergekit): weight [1, 0] resolves to 0 there, giving the base
    assert all(torch.equal(v, _layer(s0, 3)[n]) for n, v in _layer(out, 2).items())
    assert torch.allclose(out["model.embed_tokens.weight"], s0["model.embed_tokens.weight"]
                          + 0.5 * (sa["model.embed_tokens.weight"] - s0["model.embed_tokens.weight"])
                          + 0.5 * (sb["model.embed_tokens.weight"] - s0["model.embed_tokens.weight"]), atol=1e-6)


def test_single_partial_slice_keeps_only_its_layers(deep, tmp_path):
    a, b = str(deep["a"]), str(deep["b"])
    merge_to_dir({"merge_method": "linear", "slices": [{"sources": [
        {"model": a, "layer_range": [1, 3]}, {"model": b, "layer_range": [1, 3]}]}],
        "parameters": {"weight": 1.0}}, tmp_path / "p", device="cpu")
    out, sa, sb = load_dir(tmp_path / "p"), load_dir(deep["a"]), load_dir(deep["b"])
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_hidden_layers"] == 2
    for n, v in _layer(out, 0).items():
        assert torch.allclose(v, (_layer(sa, 1)[n] + _layer(sb, 1)[n]) / 2, atol=1e-7)
    # written back in the slices form: rerunning it keeps the range
    merge_to_dir(tmp_path / "p" / "mergelab_recipe.yaml", tmp_path / "again", device="cpu")
    again = load_dir(tmp_path / "again")
    assert again.keys() == out.keys() and all(torch.equal(again[k], out[k]) for k in out)


def test_tied_embeddings_stack(tied_family, tmp_path):
    a, b = str(tied_family["a"]), str(tied_family["b"])
    merge_to_dir({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [0, 2]}]}]}, tmp_path / "t", device="cpu")
    out = load_dir(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "lm_head.weight" not in out and cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 4


@pytest.mark.parametrize("slices, phrase", [
    ([{"sources": [{"model": "A", "layer_range": [0, 9]}]}], "layers a model does not have"),
    ([{"sources": [{"model": "A", "layer_range": [2, 2]}]}], "is empty or negative"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 1]}]}],
     "different lengths"),
])
def test_stack_errors(deep, tmp_path, slices, phrase):
    for s in slices:
        for src in s["sources"]:
            src["model"] = str(deep["a"] if src["model"] == "A" else deep["b"])
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "passthrough", "slices": slices})
    with pytest.raises(MergelabError, match=phrase):
        merge_to_dir(r, tmp_path / "never", device="cpu")
    assert not (tmp_path / "never").exists()


def test_stack_cli_exit_2(deep, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "ties", "base_model": str(deep["base"]), "slices": [
        {"sources": [{"model": str(deep["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(deep["b"]), "layer_range": [0, 2]}]}], "parameters": {"weight": 1, "density": 1}})
    assert run_cli("merge", r, tmp_path / "x", "--quiet") == 2
    assert "base_model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_union_tokenizer_refused_early():
    with pytest.raises(MergelabError, match="cross-tokenizer logit fusion"):
        load_recipe({"merge_method": "linear", "tokenizer_source": "union", "models": [{"model": "x/y"}]})
