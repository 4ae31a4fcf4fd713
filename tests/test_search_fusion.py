"""Hybrid candidates in the search (config `fusion:`): validation, the candidate's fusion, a real
3-trial search whose scores are those of the merge fused with the sources, the best/ and exported
fusion recipes that `mergelab eval` scores to the trial's value. Tiny Llamas made here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import make_llama
from mergelab.errors import MergelabError
from search.config import parse_search_config
from search.loop import prepare_run, run_search
from search.validate import build_space

ITEMS_MC = [
    {"prompt": "12+7=", "choices": ["19", "21", "5"], "answer": 0},
    {"prompt": "sort:dca>", "choices": ["acd", "dca", "cad"], "answer": 0},
    {"prompt": "rev:abc>", "choices": ["cba", "abc"], "answer": 0},
]
TEXTS = ["1+2=3\n", "sort:bca>abc\n", "rev:xyz>zyx\n", "40+2=42\n"]
FUSION = {"weighting": ["sim", "opt", "uniform", "top1"], "tau": [0.1, 5.0], "members": ["merge", "sources"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and two fine-tunes sharing a character tokenizer, an eval spec (choice + perplexity)."""
    from mergelab.demo.train_family import build_tokenizer

    d = tmp_path_factory.mktemp("fusion_search")
    base = make_llama(d / "base", 0, vocab=48, hidden=16, layers=2)
    a = make_llama(d / "ft_a", 1, vocab=48, hidden=16, layers=2, base=base, scale=0.3)
    b = make_llama(d / "ft_b", 2, vocab=48, hidden=16, layers=2, base=base, scale=0.3)
    for m in (base, a, b):  # fusion members load their own tokenizers (and must agree)
        build_tokenizer().save_pretrained(m)
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS_MC))
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "eval.yaml").write_text(yaml.safe_dump({"batch_size": 2, "scorers": [
        {"name": "choice", "type": "multiple_choice", "data": "mc.jsonl"},
        {"name": "ppl", "type": "perplexity", "data": "ppl.jsonl", "weight": 0.5}]}))
    return {"dir": d, "base": base, "a": a, "b": b, "eval": d / "eval.yaml"}


def _cfg(world, **over) -> dict:
    cfg = {"base_model": str(world["base"]), "models": [str(world["a"]), str(world["b"])],
           "method": "task_arithmetic", "space": {"weight": [0, 1.0]}, "eval": str(world["eval"]),
           "optimizer": {"name": "random"}, "budget": {"trials": 3}, "seed": 5, "fusion": FUSION}
    cfg.update(over)
    return cfg


# -- config ----------------------------------------------------------------------------------------
def test_fusion_is_off_by_default_and_adds_its_searched_numbers(world):
    plain = build_space(parse_search_config(_cfg(world, fusion=None)))
    assert plain.fusion is None and plain.fusion_of({"m0.weight": 0.5, "m1.weight": 0.5}) is None
    space = build_space(parse_search_config(_cfg(world)))
    fus = [p for p in space.params if p.kind == "fusion"]
    assert [(p.name, p.low, p.high) for p in fus] == [("fusion.weighting", 0.0, 4.0), ("fusion.tau", 0.1, 5.0)]
    # weighting: [0, 4) cut in four equal parts, floored; tau: the value itself
    values = {"m0.weight": 0.3, "m1.weight": 0.7, "fusion.weighting": 2.999, "fusion.tau": 0.25}
    assert space.fusion_of(values) == {"weighting": "uniform", "tau": 0.25, "grid_step": 0.05,
                                       "members": ["merge", str(world["a"]), str(world["b"])]}
    assert space.fusion_of({**values, "fusion.weighting": 4.0})["weighting"] == "top1"
    # the recipe itself stays a plain merge recipe
    assert space.recipe(values)["merge_method"] == "task_arithmetic"
    fixed = build_space(parse_search_config(_cfg(world, fusion={"weighting": "opt", "tau": 2, "members": ["merge", "base"]})))
    assert [p for p in fixed.params if p.kind == "fusion"] == []
    assert fixed.fusion_of({"m0.weight": 1, "m1.weight": 1}) == {
        "weighting": "opt", "tau": 2.0, "grid_step": 0.05, "members": ["merge", str(world["base"])]}
    assert build_space(parse_search_config(_cfg(world, fusion=True))).fusion_of(
        {"m0.weight": 1, "m1.weight": 1})["weighting"] == "sim"


@pytest.mark.parametrize("fusion, words", [
    ({"weighting": ["sim", "best"]}, ["`fusion.weighting`", "'best'", "Allowed values: sim, opt, uniform, top1"]),
    ({"weighting": []}, ["`fusion.weighting`", "Allowed values: sim, opt, uniform, top1"]),
    ({"tau": [0, 5]}, ["`fusion.tau`", "above 0"]),
    ({"tau": [-1.0, 2.0]}, ["`fusion.tau`", "above 0"]),
    ({"tau": -2}, ["`fusion.tau`", "> 0"]),
    ({"tau": [3, 1]}, ["`fusion.tau: [3.0, 1.0]`", "reversed", "[1, 3]"]),
    ({"members": ["merge", "others"]}, ["`fusion.members`", "unknown: others"]),
    ({"members": ["sources"]}, ["`fusion.members` must include `merge`"]),
])
def test_fusion_config_errors_name_the_field_and_the_allowed_values(world, fusion, words):
    with pytest.raises(MergelabError) as e:
        build_space(parse_search_config(_cfg(world, fusion=fusion)))
    for w in words:
        assert w in str(e.value)


def test_unknown_fusion_key_is_refused_by_the_parser(world):
    with pytest.raises(MergelabError, match="unknown field `fusion.temperature`"):
        parse_search_config(_cfg(world, fusion={"temperature": 1.0}))


# -- a real search -----------------------------------------------------------------------------------
def _score_fusion(recipe: dict, fusion: dict, eval_path: Path):
    """The trial's candidate scored independently: its recipe merged afresh, fused with the sources."""
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.spec import EvalSpec
    from mergelab.fusion import FusedLogitModel, load_models
    from mergelab.trial import load_recipe_model

    merged, tok = load_recipe_model(recipe, "cpu")
    others, toks = load_models([m for m in fusion["members"] if m != "merge"], "cpu")
    fused = FusedLogitModel([merged, *others], fusion["weighting"], fusion["tau"], fusion["grid_step"],
                            tokenizers=[tok, *toks])
    return Evaluator(EvalSpec.load(eval_path), tok, "cpu").evaluate(fused)


def _score_plain(recipe: dict, eval_path: Path):
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.models import HFLogitModel
    from mergelab.eval.spec import EvalSpec
    from mergelab.trial import load_recipe_model

    merged, tok = load_recipe_model(recipe, "cpu")
    return Evaluator(EvalSpec.load(eval_path), tok, "cpu").evaluate(HFLogitModel(merged, tok))


def test_three_trial_hybrid_search_records_marks_and_exports_the_fusion(world, tmp_path):
    from mergelab.cli import cli

    cfg_path = tmp_path / "search.yml"
    cfg_path.write_text(yaml.safe_dump(_cfg(world)))
    rd = prepare_run(cfg_path, tmp_path / "run")
    res = run_search(rd)
    recs = rd.trials()
    assert res.status == "finished" and [r["state"] for r in recs] == ["COMPLETE"] * 3, [r["error"] for r in recs]
    weightings = FUSION["weighting"]
    for r in recs:
        f, p = r["fusion"], r["params"]
        # the recorded fusion is the one its params decode to
        assert f["weighting"] == weightings[min(3, math.floor(p["fusion.weighting"] + 1e-9))]
        assert f["tau"] == p["fusion.tau"] and 0.1 <= f["tau"] <= 5.0
        assert f["members"] == ["merge", str(world["a"]), str(world["b"])]
        assert r["recipe"]["merge_method"] == "task_arithmetic"
    # the score is the fused candidate's (recomputed independently), not the merge's alone
    last = recs[-1]
    assert _score_fusion(last["recipe"], last["fusion"], world["eval"]).combined == pytest.approx(last["value"], abs=1e-9)
    assert _score_plain(last["recipe"], world["eval"]).combined != pytest.approx(last["value"], abs=1e-6)
    # best/: the summary, trial.json and a fusion recipe that `mergelab eval` scores to the best value
    best = rd.summary()["best"]
    best_rec = next(r for r in recs if r["number"] == best["number"])
    assert best["fusion"] == best_rec["fusion"]
    assert json.loads((rd.path / "best" / "trial.json").read_text())["fusion"] == best_rec["fusion"]
    fr = yaml.safe_load((rd.path / "best" / "fusion_recipe.yaml").read_text())
    assert fr == {"merge_method": "logit_fusion",
                  "models": [{"model": "./recipe.yaml"}, {"model": str(world["a"])}, {"model": str(world["b"])}],
                  "parameters": {k: best_rec["fusion"][k] for k in ("weighting", "tau", "grid_step")}}
    runner = CliRunner()
    js = tmp_path / "best.json"
    r = runner.invoke(cli, ["eval", str(rd.path / "best" / "fusion_recipe.yaml"), "--eval", str(world["eval"]),
                            "--device", "cpu", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["combined"] == pytest.approx(best["value"], abs=1e-9)
    # export: the merge as weights, plus the fusion recipe naming this folder as "."
    out = tmp_path / "exported"
    r = runner.invoke(cli, ["export", str(rd.path), str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    exported = yaml.safe_load((out / "fusion_recipe.yaml").read_text())
    assert exported["models"][0] == {"model": "."} and exported["models"][1:] == fr["models"][1:]
    js2 = tmp_path / "export.json"
    r = runner.invoke(cli, ["eval", str(out / "fusion_recipe.yaml"), "--eval", str(world["eval"]),
                            "--device", "cpu", "--json", str(js2)])
    assert r.exit_code == 0, r.output
    assert json.loads(js2.read_text())["combined"] == pytest.approx(best["value"], abs=1e-6)
    # the card's provenance says the metrics are a fusion's
    from search.export import search_metadata

    meta = search_metadata(rd)
    assert meta["fusion"] == best_rec["fusion"]


def test_plain_search_writes_no_fusion_marks(world, tmp_path):
    cfg_path = tmp_path / "search.yml"
    cfg_path.write_text(yaml.safe_dump(_cfg(world, fusion=None, budget={"trials": 1})))
    rd = prepare_run(cfg_path, tmp_path / "run")
    run_search(rd)
    rec = rd.trials()[0]
    assert "fusion" not in rec and "fusion" not in rd.summary()["best"]
    assert not (rd.path / "best" / "fusion_recipe.yaml").exists()
