"""Search with the real objective: TrialMerger merges each candidate in memory, the Evaluator scores
it; export of the best trial reproduces its score; warm start; pruning; export_best for the card.
Tiny Llamas made here (a character tokenizer, a few eval items) stand in for a real family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import make_llama
from mergelab.eval.evaluator import Evaluator
from mergelab.eval.models import HFLogitModel, load_model
from mergelab.eval.spec import EvalSpec
from search.export import export_best
from search.loop import prepare_run, run_search
from search.rundir import RunDir

ITEMS_MC = [
    {"prompt": "12+7=", "choices": ["19", "21", "5"], "answer": 0},
    {"prompt": "sort:dca>", "choices": ["acd", "dca", "cad"], "answer": 0},
    {"prompt": "rev:abc>", "choices": ["cba", "abc"], "answer": 0},
    {"prompt": "3+4=", "choices": ["7", "8", "9", "1"], "answer": 0},
]
TEXTS = ["1+2=3\n", "sort:bca>abc\n", "rev:xyz>zyx\n", "40+2=42\n", "sort:zyx>xyz\n", "rev:hello>olleh\n"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base with a character tokenizer, two fine-tunes, an eval spec (choice + perplexity)."""
    from mergelab.demo.train_family import build_tokenizer

    d = tmp_path_factory.mktemp("real")
    base = make_llama(d / "base", 0, vocab=48, hidden=16, layers=2)
    build_tokenizer().save_pretrained(base)
    a = make_llama(d / "ft_a", 1, vocab=48, hidden=16, layers=2, base=base, scale=0.2)
    b = make_llama(d / "ft_b", 2, vocab=48, hidden=16, layers=2, base=base, scale=0.2)
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS_MC))
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "eval.yaml").write_text(yaml.safe_dump({"batch_size": 2, "scorers": [
        {"name": "choice", "type": "multiple_choice", "data": "mc.jsonl"},
        {"name": "ppl", "type": "perplexity", "data": "ppl.jsonl", "weight": 0.5}]}))
    return {"dir": d, "base": base, "a": a, "b": b, "eval": d / "eval.yaml"}


def _config(world, tmp: Path, **over) -> Path:
    cfg = {"base_model": str(world["base"]), "models": [str(world["a"]), str(world["b"])],
           "method": "ties", "space": {"weight": [0, 1.5], "density": [0.2, 1.0]},
           "layer_groups": 2, "eval": str(world["eval"]), "optimizer": {"name": "cmaes", "popsize": 4},
           "budget": {"trials": 6}, "seed": 3}
    cfg.update(over)
    p = tmp / f"search-{len(list(tmp.glob('search-*.yml')))}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _score_dir(model_dir: Path, eval_path: Path):
    model, tok = load_model(model_dir, "cpu")
    return Evaluator(EvalSpec.load(eval_path), tok, "cpu").evaluate(HFLogitModel(model, tok))


def _score_recipe(recipe: dict, eval_path: Path):
    from mergelab.trial import load_recipe_model

    model, tok = load_recipe_model(recipe, "cpu")
    return Evaluator(EvalSpec.load(eval_path), tok, "cpu").evaluate(HFLogitModel(model, tok))


@pytest.mark.parametrize("opt", ["cmaes", "tpe", "random", "nsga2", "pycma"])
def test_six_trial_real_search_each_optimizer(world, tmp_path, opt):
    cfg = _config(world, tmp_path, optimizer={"name": opt, "popsize": 4})
    rd = prepare_run(cfg, tmp_path / "run")
    res = run_search(rd)  # the real objective: TrialMerger + Evaluator
    recs = rd.trials()
    assert res.status == "finished" and [r["number"] for r in recs] == list(range(6))
    assert all(r["state"] == "COMPLETE" for r in recs), [r["error"] for r in recs]
    for r in recs:
        assert set(r["scores"]) == {"choice", "ppl"}
        assert r["value"] == pytest.approx(r["scores"]["choice"] + 0.5 * r["scores"]["ppl"], abs=1e-12)
        assert {"choice/accuracy", "ppl/perplexity", "ppl/nll"} <= set(r["metrics"])
        assert r["timings"]["merge_s"] > 0 and r["timings"]["eval_s"] > 0
        assert len(r["recipe"]["models"][0]["parameters"]["weight"]) == 2  # per-layer gradient
    if opt == "nsga2":
        assert all(r["values"] == [r["scores"]["choice"], r["scores"]["ppl"]] for r in recs)
    # candidates differ, so the in-memory merger really rewrote the weights each trial
    assert len({r["value"] for r in recs}) > 1
    best = max(recs, key=lambda r: r["value"]) if opt != "nsga2" else None
    if best is not None:
        assert rd.summary()["best"]["number"] == best["number"]
    # the score a trial recorded is the score of its recipe merged afresh (no state leaks from
    # the previous candidate into the next one)
    last = recs[-1]
    assert _score_recipe(last["recipe"], world["eval"]).combined == pytest.approx(last["value"], abs=1e-9)


def test_export_of_best_trial_reproduces_its_score(world, tmp_path):
    from mergelab.cli import cli

    rd = prepare_run(_config(world, tmp_path, optimizer={"name": "random"}), tmp_path / "run")
    run_search(rd)
    best = rd.summary()["best"]
    out = tmp_path / "exported"
    r = CliRunner().invoke(cli, ["export", str(rd.path), str(out)])
    assert r.exit_code == 0, r.output
    assert f"trial {best['number']}" in r.output
    got = _score_dir(out, world["eval"])
    assert got.combined == pytest.approx(best["value"], rel=0, abs=1e-9)
    assert got.scores == pytest.approx(best["scores"], abs=1e-9)
    # `mergelab eval --json` on the export says the same
    js = tmp_path / "eval.json"
    r = CliRunner().invoke(cli, ["eval", str(out), "--eval", str(world["eval"]), "--device", "cpu", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["combined"] == pytest.approx(best["value"], abs=1e-9)


def test_export_best_writes_search_provenance_and_is_reused(world, tmp_path):
    rd = prepare_run(_config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 4}), tmp_path / "run")
    run_search(rd)
    path = export_best(rd)
    assert path == rd.path / "best" / "model"
    meta = json.loads((path / "mergelab_search.json").read_text())
    recs = rd.trials()
    best = max(recs, key=lambda r: r["value"])
    assert meta["optimizer"] == "random" and meta["n_trials"] == 4 and meta["run_name"] == "run"
    assert meta["best_trial"] == best["number"]
    assert meta["best_metrics"] == {**best["metrics"], "combined": best["value"]}
    hist, top = [], float("-inf")
    for r in recs:
        top = max(top, r["value"])
        hist.append(top)
    assert meta["history"] == hist
    assert [s["name"] for s in meta["eval_spec"]["scorers"]] == ["choice", "ppl"]
    assert meta["source_metrics"] == {}
    card = (path / "README.md").read_text()
    assert "search" in card.lower() and f"trial {best['number']}" in card
    # a second call reuses the export of the same best trial (nothing rewritten)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert export_best(rd) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert _score_dir(path, world["eval"]).combined == pytest.approx(best["value"], abs=1e-9)
    # an explicit folder gets its own export
    other = export_best(rd, tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere" and (other / "mergelab_search.json").is_file()


def test_warm_start_is_trial_zero_with_exactly_its_params(world, tmp_path):
    warm = tmp_path / "warm.yaml"
    warm.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(world["base"]), "models": [
            {"model": str(world["a"]), "parameters": {"weight": [0.25, 1.25], "density": 0.5}},
            {"model": str(world["b"]), "parameters": {"weight": 0.75, "density": [0.4, 0.9]}}]}))
    cfg = _config(world, tmp_path, warm_start=str(warm), budget={"trials": 3})
    rd = prepare_run(cfg, tmp_path / "run")
    run_search(rd)
    first = rd.trials()[0]
    assert first["number"] == 0
    assert first["params"] == {
        "m0.weight.g0": 0.25, "m0.weight.g1": 1.25, "m0.density.g0": 0.5, "m0.density.g1": 0.5,
        "m1.weight.g0": 0.75, "m1.weight.g1": 0.75, "m1.density.g0": 0.4, "m1.density.g1": 0.9}
    # the trial's recipe is the warm-start recipe, layer for layer, and so is its score
    assert first["recipe"]["models"][0]["parameters"] == {"weight": [0.25, 1.25], "density": [0.5, 0.5]}
    assert _score_recipe(yaml.safe_load(warm.read_text()), world["eval"]).combined == pytest.approx(first["value"], abs=1e-9)


def test_pruner_stops_a_hopeless_trial(world, tmp_path):
    # Trials 0-1 complete; trial 2, enqueued with weights far outside anything sensible, must be
    # pruned at the first eval batch by the median pruner, which compares its running combined
    # score (perplexity first here: a continuous value) with the finished trials' at that step.
    import optuna

    from search.storage import open_storage

    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"batch_size": 2, "scorers": [
        {"name": "ppl", "type": "perplexity", "data": str(world["dir"] / "ppl.jsonl"), "weight": 0.5},
        {"name": "choice", "type": "multiple_choice", "data": str(world["dir"] / "mc.jsonl")}]}))
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 3}, eval=str(spec),
                  method="task_arithmetic", space={"weight": [0, 12.0]},
                  pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    rd = prepare_run(cfg, tmp_path / "run")
    study = optuna.load_study(study_name=rd.study_name(), storage=open_storage(rd.storage_url(), False))
    sane = {"m0.weight.g0": 0.5, "m0.weight.g1": 0.5, "m1.weight.g0": 0.5, "m1.weight.g1": 0.5}
    wild = {k: 12.0 for k in sane}  # task vectors x 12 each: noise that swamps the base
    for p in (sane, sane, wild):
        study.enqueue_trial(p)
    run_search(rd)
    recs = rd.trials()
    assert [r["state"] for r in recs] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert recs[2]["value"] is None and "pruned at step 0" in recs[2]["error"]
    s = rd.summary()
    assert s["trials_pruned"] == 1 and s["trials_done"] == 3 and s["status"] == "finished"
    st = optuna.load_study(study_name=rd.study_name(), storage=open_storage(rd.storage_url(), False))
    t2 = st.trials[2]
    assert t2.state == optuna.trial.TrialState.PRUNED
    # the intermediate values are running combined scores: step 0 = the first perplexity batch
    assert list(t2.intermediate_values) == [0]
    assert t2.intermediate_values[0] < st.trials[0].intermediate_values[0]
    full = st.trials[0].intermediate_values
    ev = Evaluator(EvalSpec.load(spec), load_model(world["base"])[1], "cpu")
    assert len(ev.scorers[0].batches) == 3  # 6 texts, batch_size 2
    assert list(full) == list(range(sum(len(s.batches) for s in ev.scorers)))  # one step per batch
    assert full[2] == pytest.approx(recs[0]["scores"]["ppl"] * 0.5, abs=1e-12)  # ppl done: its weighted score
    assert full[len(full) - 1] == pytest.approx(recs[0]["value"], abs=1e-12)  # the last step is the score



def test_workers_two_processes_share_a_journal_file(world, tmp_path):
    """`mergelab search --workers 2 --storage journal:...`: two worker processes with the real
    objective, one study; the budget is met exactly and no trial runs twice."""
    from mergelab.cli import cli
    from search.storage import open_storage
    from test_search import check_shared

    journal = f"journal:{tmp_path / 'study.journal'}"
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 6})
    r = CliRunner().invoke(cli, ["search", str(cfg), "--run", str(tmp_path / "run"), "--storage", journal,
                                 "--workers", "2", "--no-tui"])
    assert r.exit_code == 0, r.output
    rd = RunDir.open(tmp_path / "run")
    assert f"best: trial {rd.summary()['best']['number']}" in r.output
    check_shared(rd, 6, open_storage(rd.storage_url(), False))
    assert all(r["timings"]["eval_s"] > 0 and set(r["scores"]) == {"choice", "ppl"} for r in rd.trials())


def test_six_trial_search_on_the_bundled_family(tmp_path):
    """The bundled family (mergelab/demo/family) with 4 val items per skill: a real 6-trial
    cmaes search with layer groups; the best trial's recorded score is its recipe's score."""
    repo = Path(__file__).resolve().parents[1]
    fam, data = repo / "mergelab/demo/family", repo / "mergelab/demo/data"
    spec = yaml.safe_load((data / "eval_val.yml").read_text())
    for s in spec["scorers"]:
        s["limit"], s["data"] = 4, str(data / s["data"])
    (tmp_path / "eval.yml").write_text(yaml.safe_dump(spec))
    cfg = {"base_model": str(fam / "base"), "models": [str(fam / s) for s in ("addition", "sort", "reverse")],
           "method": "ties", "space": {"weight": [0, 1], "density": [0.1, 1], "lambda": [0.5, 2.0]},
           "layer_groups": 2, "eval": str(tmp_path / "eval.yml"), "optimizer": "cmaes",
           "budget": {"trials": 6}, "seed": 0}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    rd = prepare_run(tmp_path / "s.yml", tmp_path / "run")
    assert run_search(rd).status == "finished"
    recs = rd.trials()
    assert [r["state"] for r in recs] == ["COMPLETE"] * 6
    assert all(set(r["scores"]) == {"addition", "sort", "reverse"} for r in recs)
    assert all(len(r["recipe"]["models"][0]["parameters"]["weight"]) == 4 for r in recs)  # 4 layers
    best = rd.summary()["best"]
    rec = next(r for r in recs if r["number"] == best["number"])
    assert _score_recipe(rec["recipe"], tmp_path / "eval.yml").combined == pytest.approx(best["value"], abs=1e-9)


ITEMS_MC_TEST = [  # held-out items: none of them is in the search's eval
    {"prompt": "5+5=", "choices": ["10", "11", "55"], "answer": 0},
    {"prompt": "sort:cab>", "choices": ["abc", "cab"], "answer": 0},
    {"prompt": "rev:dog>", "choices": ["god", "dog", "odg"], "answer": 0},
]


def _test_spec(world) -> Path:
    p = world["dir"] / "test.yaml"
    if not p.is_file():
        (world["dir"] / "mc_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS_MC_TEST))
        p.write_text(yaml.safe_dump({"batch_size": 2, "scorers": [
            {"name": "choice", "type": "multiple_choice", "data": "mc_test.jsonl"}]}))
    return p


def _score_source(ref: Path, eval_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world_base_of(ref))  # the fine-tunes carry no tokenizer
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    return Evaluator(EvalSpec.load(eval_path), tok, "cpu").evaluate(HFLogitModel(model, tok))


def world_base_of(ref: Path) -> Path:
    return ref.parent / "base"


def test_held_out_eval_scores_best_and_sources_once_and_reaches_the_card(world, tmp_path, monkeypatch):
    from mergelab.cli import cli
    from mergelab.eval.evaluator import Evaluator as Ev
    from search.heldout import HELDOUT_FILE, cached_held_out, held_out

    test = _test_spec(world)
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 3}, test_eval=str(test))
    r = CliRunner().invoke(cli, ["search", str(cfg), "--run", str(tmp_path / "run"), "--no-tui"])
    assert r.exit_code == 0, r.output
    rd = RunDir.open(tmp_path / "run")
    best = rd.summary()["best"]
    rec = next(x for x in rd.trials() if x["number"] == best["number"])
    # the search's own records never saw the held-out items: fitness is the validation spec
    assert set(rec["scores"]) == {"choice", "ppl"}
    h = cached_held_out(rd)
    assert h is not None and h["trial"] == best["number"]
    want = _score_recipe(rec["recipe"], test)
    assert h["metrics"] == {**want.metrics, "combined": want.combined}
    assert list(h["sources"]) == [str(world["base"]), str(world["a"]), str(world["b"])]
    for ref in (world["a"], world["b"]):
        got = _score_source(ref, test)
        assert h["sources"][str(ref)]["choice/accuracy"] == got.metrics["choice/accuracy"]
        assert h["sources"][str(ref)]["combined"] == pytest.approx(got.combined, abs=1e-12)
    assert "held-out" in r.output and f"trial {best['number']}" in r.output
    # `mergelab export --trial N` of another trial scores that trial first; its card says so
    other = next(x for x in rd.trials() if x["number"] != best["number"])
    r = CliRunner().invoke(cli, ["export", str(rd.path), str(tmp_path / "other"), "--trial", str(other["number"])])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "other" / "mergelab_search.json").read_text())
    want_other = _score_recipe(other["recipe"], test)
    assert meta["best_trial"] == other["number"]
    assert meta["test_metrics"] == {**want_other.metrics, "combined": want_other.combined}
    assert cached_held_out(rd, other["number"])["metrics"] == meta["test_metrics"]
    # cached: export and a second call score nothing again
    monkeypatch.setattr(Ev, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rescored")))
    assert held_out(rd) == h
    path = export_best(rd)
    meta = json.loads((path / "mergelab_search.json").read_text())
    assert meta["test_metrics"] == h["metrics"] and meta["source_metrics"] == h["sources"]
    assert meta["best_metrics"]["combined"] == best["value"]  # fitness stays reported as such
    assert [s["name"] for s in meta["test_eval_spec"]["scorers"]] == ["choice"]
    card = (path / "README.md").read_text()
    assert "### Held-out metrics" in card and "no trial of the search scored" in card
    assert f"| **this merge** (trial {best['number']}) |" in card
    shown = CliRunner().invoke(cli, ["show", str(rd.path)])
    assert "held-out" in shown.output
    # editing the held-out spec invalidates what was cached
    cache = json.loads((rd.path / HELDOUT_FILE).read_text())
    test_copy = yaml.safe_load(test.read_text())
    test.write_text(yaml.safe_dump({**test_copy, "batch_size": 1}))
    try:
        assert cached_held_out(rd) is None
    finally:
        test.write_text(yaml.safe_dump(test_copy))
    assert json.loads((rd.path / HELDOUT_FILE).read_text()) == cache


def test_test_eval_must_be_a_separate_existing_spec(world, tmp_path):
    from mergelab.errors import MergelabError

    with pytest.raises(MergelabError, match="`test_eval` is the same eval spec as `eval`"):
        prepare_run(_config(world, tmp_path, test_eval=str(world["eval"])), tmp_path / "r1")
    with pytest.raises(MergelabError, match="held-out eval spec file .*nope.yaml does not exist"):
        prepare_run(_config(world, tmp_path, test_eval=str(tmp_path / "nope.yaml")), tmp_path / "r2")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
