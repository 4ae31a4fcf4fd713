"""End-to-end tests of the streaming engine and `mergelab merge` on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab.cli import main
from mergelab.errors import MergelabError

from conftest import load_dir, make_llama, write_recipe


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_linear_weights_1_0_returns_model_a(tiny_family, tmp_path):
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "linear",
        "models": [{"model": str(tiny_family["a"]), "parameters": {"weight": 1.0}},
                   {"model": str(tiny_family["b"]), "parameters": {"weight": 0.0}}],
    })
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 0
    out, a = load_dir(tmp_path / "out"), load_dir(tiny_family["a"])
    assert out.keys() == a.keys()
    for k in a:
        assert torch.equal(out[k], a[k]), k


def test_task_arithmetic_matches_hand_formula_and_loads(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_family["base"]),
        "models": [{"model": str(tiny_family["a"]), "parameters": {"weight": 0.7}},
                   {"model": str(tiny_family["b"]), "parameters": {"weight": [0.0, 1.0]}}],
        "parameters": {"lambda": 0.5},
        "dtype": "float32",
    })
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 0
    out = load_dir(tmp_path / "out")
    base, a, b = (load_dir(tiny_family[k]) for k in ("base", "a", "b"))
    # gradient [0, 1] over 2 layers: layer 0 gets 0, layer 1 gets 1, embeddings/head t=0 -> 0
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        wb = 1.0 if ".layers.1." in name else 0.0
        want = base[name] + 0.5 * (0.7 * (a[name] - base[name]) + wb * (b[name] - base[name]))
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"


def test_sharded_output_and_sharded_input(tiny_family, tmp_path):
    sharded = make_llama(tmp_path / "sharded_a", 1, base=tiny_family["base"], shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "ties", "base_model": str(tiny_family["base"]),
        "models": [{"model": str(sharded), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(tiny_family["b"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    })
    assert run_cli("merge", r, tmp_path / "one", "--quiet") == 0
    assert run_cli("merge", r, tmp_path / "many", "--quiet", "--shard-size", "30KB") == 0
    idx = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "many" / s).is_file() for s in shards)
    for s in shards:
        assert (tmp_path / "many" / s).stat().st_size <= 30_000 + 4096  # + header
    one, many = load_dir(tmp_path / "one"), load_dir(tmp_path / "many")
    assert set(idx["weight_map"]) == set(one)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    for k in one:
        assert torch.equal(one[k], many[k])
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()


def test_written_recipe_reproduces_same_tensors(tiny_family, tmp_path):
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "dare_ties", "base_model": str(tiny_family["base"]),
        "models": [{"model": str(tiny_family["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(tiny_family["b"]), "parameters": {"weight": 0.4, "density": 0.7}}],
    })
    assert run_cli("merge", r, tmp_path / "first", "--quiet", "--seed", "7") == 0
    again = tmp_path / "first" / "mergelab_recipe.yaml"
    assert run_cli("merge", again, tmp_path / "second", "--quiet") == 0
    one, two = load_dir(tmp_path / "first"), load_dir(tmp_path / "second")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert run_cli("merge", r, tmp_path / "other_seed", "--quiet", "--seed", "8") == 0
    three = load_dir(tmp_path / "other_seed")
    assert any(not torch.equal(one[k], three[k]) for k in one if "layers" in k)


def test_same_seed_bit_identical(tiny_family, tmp_path):
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "dare_linear", "base_model": str(tiny_family["base"]), "seed": 3,
        "models": [{"model": str(tiny_family["a"]), "parameters": {"weight": 1.0, "density": 0.3}},
                   {"model": str(tiny_family["b"]), "parameters": {"weight": 1.0, "density": 0.3}}],
    })
    for d in ("x", "y"):
        assert run_cli("merge", r, tmp_path / d, "--quiet") == 0
    x, y = load_dir(tmp_path / "x"), load_dir(tmp_path / "y")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_tied_embeddings(tied_family, tmp_path):
    from transformers import AutoModelForCausalLM

    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "linear",
        "models": [{"model": str(tied_family["a"]), "parameters": {"weight": 0.5}},
                   {"model": str(tied_family["b"]), "parameters": {"weight": 0.5}}],
    })
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 0
    out = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_vocab_size_difference_padded_to_base(tiny_family, tmp_path, caplog):
    big = make_llama(tmp_path / "bigvocab", 5, vocab=72)
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]), "tokenizer_source": "base",
        "models": [{"model": str(big), "parameters": {"weight": 1.0}}],
    })
    # a different random init has other shapes nowhere but the vocabulary rows
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 0
    out, bigw = load_dir(tmp_path / "out"), load_dir(big)
    assert out["model.embed_tokens.weight"].shape == (64, 32)
    torch.testing.assert_close(out["model.embed_tokens.weight"], bigw["model.embed_tokens.weight"][:64])


@pytest.mark.parametrize("case,needle", [
    ("unknown_method", "unknown merge_method `frobnicate`"),
    ("density0", "models[0].parameters.density"),
    ("density15", "models[0].parameters.density"),
    ("unknown_param", "unknown parameter `models[0].parameters.colour`"),
    ("missing_dir", "neither an existing directory nor a Hugging Face repo id"),
    ("slerp3", "needs exactly 2 models"),
])
def test_bad_recipes_fail_clearly_and_write_nothing(tiny_family, tmp_path, capsys, case, needle):
    base, a, b = (str(tiny_family[k]) for k in ("base", "a", "b"))
    recipes = {
        "unknown_method": {"merge_method": "frobnicate", "models": [{"model": a}]},
        "density0": {"merge_method": "ties", "base_model": base,
                     "models": [{"model": a, "parameters": {"weight": 1, "density": 0}}]},
        "density15": {"merge_method": "ties", "base_model": base,
                      "models": [{"model": a, "parameters": {"weight": 1, "density": 1.5}}]},
        "unknown_param": {"merge_method": "linear", "models": [{"model": a, "parameters": {"colour": 1}}]},
        "missing_dir": {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]},
        "slerp3": {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
                   "models": [{"model": base}, {"model": a}, {"model": b}]},
    }
    r = write_recipe(tmp_path / "r.yml", recipes[case])
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))


def test_shape_mismatch_and_missing_tensor(tiny_family, tmp_path, capsys):
    wide = make_llama(tmp_path / "wide", 1, hidden=48)
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(tiny_family["a"]), "parameters": {"weight": 1}}, {"model": str(wide), "parameters": {"weight": 1}}]})
    assert run_cli("merge", r, tmp_path / "out") == 2
    assert "do not share one architecture" in capsys.readouterr().err
    # same config, one tensor removed
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_family["b"] / "config.json").read_text())
    sd = load_file(tiny_family["b"] / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    r = write_recipe(tmp_path / "r2.yml", {"merge_method": "linear", "models": [
        {"model": str(tiny_family["a"]), "parameters": {"weight": 1}}, {"model": str(broken), "parameters": {"weight": 1}}]})
    assert run_cli("merge", r, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight in " + str(broken) in err
    assert "model.layers.0.mlp.down_proj.weight: (32, 10)" in err
    assert not (tmp_path / "out").exists()


def test_bin_only_model_refused(tiny_family, tmp_path, capsys):
    d = tmp_path / "binmodel"
    d.mkdir()
    (d / "config.json").write_text((tiny_family["a"] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not read")
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1}}]})
    assert run_cli("merge", r, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "only pickle checkpoints (pytorch_model.bin)" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_plan_and_writes_nothing(tiny_family, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(tiny_family["a"]), "parameters": {"weight": 1}}, {"model": str(tiny_family["b"]), "parameters": {"weight": 1}}]})
    assert run_cli("merge", r, tmp_path / "out", "--dry-run") == 0
    out = capsys.readouterr().out
    n = len(load_dir(tiny_family["a"]))
    assert f"tensors: {n}" in out and "estimated peak tensor memory" in out
    assert not (tmp_path / "out").exists()


def test_interrupted_merge_leaves_no_output(tiny_family, tmp_path, monkeypatch):
    from mergelab import engine

    calls = {"n": 0}
    real = engine.compute_job

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "compute_job", boom)
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(tiny_family["a"]), "parameters": {"weight": 1}}, {"model": str(tiny_family["b"]), "parameters": {"weight": 1}}]})
    with pytest.raises(KeyboardInterrupt):
        engine.merge_to_dir(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "r.yml"]


def test_mergekit_slices_form_accepted(tiny_family, tmp_path):
    a, b = str(tiny_family["a"]), str(tiny_family["b"])
    r1 = write_recipe(tmp_path / "r1.yml", {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": a,
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]}, "dtype": "float32"})
    assert run_cli("merge", r1, tmp_path / "s", "--quiet") == 0
    out, A, B = load_dir(tmp_path / "s"), load_dir(tiny_family["a"]), load_dir(tiny_family["b"])
    name0 = "model.layers.0.self_attn.q_proj.weight"  # t = 0 -> model a
    torch.testing.assert_close(out[name0], A[name0], rtol=0, atol=1e-6)
    name1 = "model.layers.1.self_attn.q_proj.weight"  # t = 1 -> model b
    torch.testing.assert_close(out[name1], B[name1], rtol=0, atol=1e-6)


def _overflow_recipe(fam, method="linear"):
    # a float16 output of weights 3e5 overflows: inf in every merged tensor
    models = [{"model": str(fam["a"]), "parameters": {"weight": 3e5}},
              {"model": str(fam["b"]), "parameters": {"weight": 3e5}}]
    return {"merge_method": method, "models": models, "parameters": {"normalize": False}, "dtype": "float16"}


def test_non_finite_merge_stops_and_names_the_tensor(tiny_family, tmp_path, capsys):
    from mergelab.engine import merge_to_dir
    from mergelab.errors import NonFiniteMergeError

    with pytest.raises(NonFiniteMergeError) as e:
        merge_to_dir(_overflow_recipe(tiny_family), tmp_path / "out")
    first = "lm_head.weight"  # the plan's first tensor
    assert e.value.tensor == first and e.value.count > 0
    assert f"`{first}`" in str(e.value) and "300000.0" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing left behind
    r = write_recipe(tmp_path / "r.yml", _overflow_recipe(tiny_family))
    assert run_cli("merge", r, tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert "inf/NaN" in err and first in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_finite_guard_defers_device_flags_and_reports_the_first_bad_tensor():
    from mergelab.errors import NonFiniteMergeError
    from mergelab.kernels.finite import FiniteGuard

    g = FiniteGuard("here", every=3)
    # the deferred (device) path, exercised with CPU tensors posing as another device's
    g._pending = [("a", {}, torch.tensor(0)), ("b", {"w": 1}, torch.tensor(2)), ("c", {}, torch.tensor(1))]
    with pytest.raises(NonFiniteMergeError) as e:
        g.flush()
    assert e.value.tensor == "b" and e.value.count == 2 and g._pending == []
    g.add("ok", torch.ones(3), {})
    g.add("ints", torch.tensor([1, 2]), {})  # not floating point: nothing to check
    with pytest.raises(NonFiniteMergeError, match="`nan`"):
        g.add("nan", torch.tensor([1.0, float("nan")]), {})


def test_verbose_merge_logs_the_kernel_of_each_tensor(tiny_family, tmp_path, caplog):
    from mergelab.engine import merge_to_dir

    r = {"merge_method": "dare_ties", "base_model": str(tiny_family["base"]), "seed": 1,
         "models": [{"model": str(tiny_family[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("a", "b")]}
    rep = merge_to_dir(r, tmp_path / "out")
    n = len(load_dir(tmp_path / "out"))
    assert rep.kernels == {"chunked": n}  # every tensor of the tiny family through the chunked kernel
    path = write_recipe(tmp_path / "r.yml", {"merge_method": "slerp", "base_model": str(tiny_family["base"]),
                                             "parameters": {"t": 0.3}, "models": [{"model": str(tiny_family["a"])},
                                                                                  {"model": str(tiny_family["base"])}]})
    import logging

    try:
        assert run_cli("merge", path, tmp_path / "out2", "--quiet", "--verbose") == 0
    finally:
        logging.getLogger("mergelab").setLevel(logging.NOTSET)
    err = caplog.text
    assert "model.layers.0.self_attn.q_proj.weight: kernel reference" in err  # slerp has no fast kernel
    assert err.count(": kernel ") == n
