"""The data-flow search: a hand-computed path on a tiny family (layer sequence, scales, recipe,
outputs), the candidate built from cached layers equal to the disk merge of its recipe, the
identity trial 0, PS + DFS, and resume after SIGKILL repeating the uninterrupted sequence."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_dir, make_llama
from mergelab.engine import merge_to_dir
from mergelab.errors import MergelabError
from mergelab.trial import TrialMerger
from search.config import parse_search_config
from search.dataflow import PathStep, stack_recipe
from search.loop import prepare_run, run_search
from search.validate import build_space
from search.synthetic import sphere

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dffam")
    base = make_llama(root / "base", 0, layers=3, dtype=torch.float16)
    out = {"base": base}
    for i, n in enumerate(("a", "b")):
        out[n] = make_llama(root / n, i + 1, layers=3, base=base, dtype=torch.float16)
    (root / "em.jsonl").write_text('{"prompt": "ab", "answer": "c"}\n')
    (root / "eval.yaml").write_text("scorers:\n  - {name: s, type: exact_match, data: em.jsonl}\n")
    out["eval"] = root / "eval.yaml"
    return out


def _cfg(fam, **dataflow) -> dict:
    return {"base_model": str(fam["base"]), "models": [str(fam["a"]), str(fam["b"])], "eval": str(fam["eval"]),
            "dataflow": {"repeats": 2, **dataflow}, "optimizer": {"name": "cmaes", "popsize": 4},
            "budget": {"trials": 6}, "seed": 3}


def _space(fam, **dataflow):
    return build_space(parse_search_config(_cfg(fam, **dataflow)))


def _values(space, on: dict[str, float], scales: dict[str, float] | None = None) -> dict[str, float]:
    v = {p.name: (-1.0 if p.kind == "slot" else 1.0) for p in space.params}
    v.update(on)
    v.update(scales or {})
    return v


def test_layout_and_identity_path(fam):
    sp = _space(fam)
    assert len([p for p in sp.params if p.kind == "slot"]) == 2 * 2 * 3  # repeats x models x layers
    assert len([p for p in sp.params if p.kind == "scale"]) == 4  # model pairs
    mid = sp.identity_values()
    assert mid == {p.name: (p.low + p.high) / 2 for p in sp.params}  # CMA-ES starts on the identity
    assert sp.path_of(mid) == [PathStep(0, 0, 1.0), PathStep(0, 1, 1.0), PathStep(0, 2, 1.0)]
    assert sp.recipe(mid) == {"merge_method": "passthrough",
                              "slices": [{"sources": [{"model": str(fam["a"]), "layer_range": [0, 3]}]}]}


def test_hand_computed_path_recipe_and_outputs(fam, tmp_path):
    sp = _space(fam)
    a, b = str(fam["a"]), str(fam["b"])
    # on: a0 a1 (repeat 0), b2 (repeat 0), a1 (repeat 1), b0 b1 (repeat 1); a jump a->b scaled 0.8,
    # b->a 0.6, a->b again 0.8; a1 -> ... -> a1 is a jump within a (scale m0.m0 not reached here)
    v = _values(sp, {"slot.r0.m0.l0": 0.3, "slot.r0.m0.l1": 0.2, "slot.r0.m1.l2": 0.4,
                     "slot.r1.m0.l1": 0.1, "slot.r1.m1.l0": 0.9, "slot.r1.m1.l1": 0.5},
                {"scale.m0.m1": 0.8, "scale.m1.m0": 0.6})
    path = sp.path_of(v)
    assert [(s.model, s.layer, s.scale) for s in path] == [
        (0, 0, 1.0), (0, 1, 1.0), (1, 2, 0.8), (0, 1, 0.6), (1, 0, 0.8), (1, 1, 1.0)]
    recipe = sp.recipe(v)
    scale = lambda s: {"scale": [{"filter": "o_proj", "value": s}, {"filter": "down_proj", "value": s},  # noqa: E731
                                 {"value": 1.0}]}
    assert recipe["slices"] == [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [2, 3]}], "parameters": scale(0.8)},
        {"sources": [{"model": a, "layer_range": [1, 2]}], "parameters": scale(0.6)},
        {"sources": [{"model": b, "layer_range": [0, 1]}], "parameters": scale(0.8)},
        {"sources": [{"model": b, "layer_range": [1, 2]}]},
    ]
    assert sp.path_record(v)[2] == [b, 2, 0.8]
    # the candidate, built from cached layers: each layer's tensors are the expected source's
    tm = TrialMerger(str(fam["base"]), [a, b], device="cpu")
    model = tm.apply(recipe)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    srcs = {0: load_dir(fam["a"]), 1: load_dir(fam["b"])}
    for i, step in enumerate(path):
        for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
            want = srcs[step.model][f"model.layers.{step.layer}.{name}"].float()
            if step.scale != 1.0 and ("o_proj" in name or "down_proj" in name):
                want = (want * step.scale).half().float()  # computed in float32, stored as float16
            assert torch.equal(sd[f"model.layers.{i}.{name}"], want), (i, name)
    assert torch.equal(sd["model.embed_tokens.weight"], srcs[0]["model.embed_tokens.weight"].float())  # first slice
    assert torch.equal(sd["lm_head.weight"], srcs[1]["lm_head.weight"].float())  # last slice
    # shared, not copied: an unscaled layer is the cached source tensor itself
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == \
        tm._stack_builder()._source(a, "model.layers.0.self_attn.q_proj.weight").data_ptr()
    # the recipe merged to disk gives the candidate's logits exactly
    merge_to_dir(recipe, tmp_path / "disk", device="cpu")
    from transformers import AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", dtype=torch.float32).eval()
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, disk(x).logits)
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["num_hidden_layers"] == 6


def test_path_budget_keeps_the_largest_logits(fam):
    sp = _space(fam, max_layers=2)
    v = _values(sp, {"slot.r0.m0.l0": 0.1, "slot.r0.m1.l1": 0.7, "slot.r1.m0.l2": 0.5})
    assert [(s.model, s.layer) for s in sp.path_of(v)] == [(1, 1), (0, 2)]  # top two, path order
    none_on = _values(sp, {"slot.r1.m1.l2": -0.2})
    assert [(s.model, s.layer) for s in sp.path_of(none_on)] == [(1, 2)]  # never an empty model


def test_stack_recipe_merges_consecutive_runs():
    r = stack_recipe([PathStep(0, 0, 1.0), PathStep(0, 1, 1.0), PathStep(0, 1, 1.0), PathStep(1, 3, 1.0)], ["x", "y"])
    assert [s["sources"][0]["layer_range"] for s in r["slices"]] == [[0, 2], [1, 2], [3, 4]]


def test_dataflow_config_errors(fam, tmp_path):
    with pytest.raises(MergelabError, match="go together"):
        _space(fam, ps_recipe=str(tmp_path / "r.yml"))
    cfg = _cfg(fam)
    cfg["warm_start"] = str(tmp_path / "r.yml")
    with pytest.raises(MergelabError, match="warm_start"):
        build_space(parse_search_config(cfg))


def _write(tmp: Path, cfg: dict, name: str) -> Path:
    p = tmp / f"{name}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_search_trial0_identity_and_path_record(fam, tmp_path):
    rd = prepare_run(_write(tmp_path, {**_cfg(fam), "budget": {"trials": 3}}, "s"), tmp_path / "run")
    run_search(rd, sphere, install_signals=False)
    recs = rd.trials()
    assert recs[0]["path"] == [[str(fam["a"]), i, 1.0] for i in range(3)]
    assert recs[0]["recipe"]["slices"] == [{"sources": [{"model": str(fam["a"]), "layer_range": [0, 3]}]}]
    assert all(r["recipe"]["merge_method"] == "passthrough" and r["path"] for r in recs)


def test_ps_plus_dfs_merges_the_ps_recipe_once_and_starts_from_it(fam, tmp_path):
    ps = tmp_path / "ps.yml"
    ps.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(fam["a"]), "parameters": {"weight": 0.5}}, {"model": str(fam["b"]), "parameters": {"weight": 0.5}}]}))
    cfg = {**_cfg(fam, ps_recipe=str(ps), ps_model=str(tmp_path / "psm")), "budget": {"trials": 2}}
    rd = prepare_run(_write(tmp_path, cfg, "both"), tmp_path / "run")
    run_search(rd, sphere, install_signals=False)
    assert (tmp_path / "psm" / "config.json").is_file()
    first = rd.trials()[0]
    assert first["path"] == [[str(tmp_path / "psm"), i, 1.0] for i in range(3)]
    # the PS model's layer 1 is the merge of a's and b's
    out, sa, sb = load_dir(tmp_path / "psm"), load_dir(fam["a"]), load_dir(fam["b"])
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(out[k], ((sa[k].float() * 0.5 + sb[k].float() * 0.5) / 1.0).half())
    # a ps_model made from another recipe is refused before any trial
    ps.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(fam["a"]), "parameters": {"weight": 0.9}}, {"model": str(fam["b"]), "parameters": {"weight": 0.1}}]}))
    rd2 = prepare_run(_write(tmp_path, cfg, "both2"), tmp_path / "run2")
    with pytest.raises(MergelabError, match="was not merged from"):
        run_search(rd2, sphere, install_signals=False)


_RUNNER = """
import os, sys, time
sys.path.insert(0, {root!r})
from search.loop import run_search
from search.synthetic import sphere
run = sys.argv[1]
def objective(recipe, ctx):
    if ctx.number == 3:
        open(os.path.join(run, "inside"), "w").close()
        time.sleep(60)
    return sphere(recipe, ctx)
run_search(run, objective)
"""


def test_sigkill_and_resume_repeats_the_sequence(fam, tmp_path):
    import time

    cfg = _write(tmp_path, {**_cfg(fam), "budget": {"trials": 6}}, "k")
    rd = prepare_run(cfg, tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER.format(root=str(ROOT)), str(rd.path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = prepare_run(cfg, tmp_path / "ref")
    run_search(ref, sphere, install_signals=False)
    t0 = time.time()
    while not (rd.path / "inside").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_search(rd, sphere, install_signals=False)
    seq = lambda r: [(t["params"], t["path"]) for t in r.trials() if t["state"] == "COMPLETE"]  # noqa: E731
    assert seq(rd) == seq(ref) and len(seq(ref)) == 6
