"""TrialRecord, RunSummary, ResolvedRun: each trials.jsonl line, summary.json and resolved.json read
once into a typed record; the JSON format unchanged (every recorded fixture run reads and writes
back to the same mapping)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from search.records import RecordError, ResolvedRun, TrialRecord
from search.rundir import RunDir

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = [FIXTURES / "runs" / "finished-cmaes", FIXTURES / "runs" / "stopped-tpe",
        FIXTURES / "tui" / "ties-search", FIXTURES / "tui" / "nsga2-search"]


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_recorded_runs_read_into_records_and_back_unchanged(run):
    lines = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines() if x.strip()]
    recs = RunDir(run).trial_records()
    assert len(recs) == len(lines) > 0
    for rec, line in zip(recs, lines):
        assert rec.to_json() == {**{k: None for k in ("kernels",) if k not in line}, **line}
        assert rec.number == line["number"] and rec.state == line["state"]
        assert rec.value == line.get("value") and rec.params == line["params"]


def test_from_json_keeps_unknown_keys_and_fills_optional_ones():
    rec = TrialRecord.from_json({"number": 3, "state": "FAIL", "error": "boom", "future_key": [1, 2]})
    assert rec.extra == {"future_key": [1, 2]} and rec.error == "boom"
    assert rec.params == {} and rec.recipe is None and rec.value is None and not rec.interrupted
    assert rec.counted and not rec.complete
    out = rec.to_json()
    assert out["future_key"] == [1, 2] and "fusion" not in out and "path" not in out
    assert TrialRecord.from_json(out) == rec


@pytest.mark.parametrize("line, key", [
    ({"state": "COMPLETE"}, "number"),
    ({"number": "7", "state": "COMPLETE"}, "number"),
    ({"number": True, "state": "COMPLETE"}, "number"),
    ({"number": 1, "state": "DONE"}, "state"),
    ({"number": 1, "state": "COMPLETE", "value": "0.5"}, "value"),
    ({"number": 1, "state": "COMPLETE", "params": [0.1]}, "params"),
    ({"number": 1, "state": "COMPLETE", "values": [0.1, "x"]}, "values"),
    ({"number": 1, "state": "FAIL", "interrupted": "yes"}, "interrupted"),
    ({"number": 1, "state": "FAIL", "retry_of": 0.5}, "retry_of"),
])
def test_from_json_names_the_key_with_the_wrong_type(line, key):
    with pytest.raises(RecordError, match=f"`{key}`"):
        TrialRecord.from_json(line)


def test_from_json_refuses_a_line_that_is_not_an_object():
    with pytest.raises(RecordError, match="JSON object, not list"):
        TrialRecord.from_json([1, 2])


def test_readers_leave_out_lines_that_are_not_records(tmp_path):
    from mergelab.tui.state import trial_lines

    good = {"number": 0, "state": "COMPLETE", "params": {"a": 0.5}, "value": 0.25}
    (tmp_path / "trials.jsonl").write_text("\n".join(json.dumps(x) for x in [
        good, {"number": "x", "state": "COMPLETE"}, [1], {"number": 1, "state": "PRUNED"}]) + "\n")
    rd = RunDir(tmp_path)
    assert [r.number for r in rd.trial_records()] == [0, 1]
    assert [r["number"] for r in trial_lines(rd.trials())] == [0, 1]
    assert rd.history() == [0.25, 0.25]


def test_append_trial_once_writes_a_number_once(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "trials.jsonl").touch()
    rec = {"number": 4, "state": "FAIL", "interrupted": True}
    assert rd.append_trial_once(rec) is True
    assert rd.append_trial_once({**rec, "error": "again"}) is False
    assert rd.trials() == [rec]


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_recorded_summaries_read_into_run_summaries(run):
    from search.records import RunSummary

    d = json.loads((run / "summary.json").read_text())
    s = RunSummary.from_json(d)  # strict: every key of a recorded run has its type
    assert s == RunDir(run).run_summary()
    assert (s.status, s.trials_done, s.elapsed_s) == (d["status"], d["trials_done"], d["elapsed_s"])
    assert (s.budget_trials, s.budget_timeout) == (d["budget"]["trials"], d["budget"]["timeout"])
    assert s.best == d["best"] and s.best_number == (d["best"] or {}).get("number")
    assert s.extra == {}


def test_a_summary_key_of_the_wrong_type_is_named_or_defaulted(tmp_path):
    from search.records import RunSummary

    d = {"status": "finished", "trials_done": "7", "best": {"number": 2, "value": 0.5}, "budget": {"trials": 9},
         "new_key": 1}
    with pytest.raises(RecordError, match="`trials_done` is '7'"):
        RunSummary.from_json(d)
    s = RunSummary.from_json(d, strict=False)
    assert (s.status, s.trials_done, s.best_number, s.best_value, s.budget_trials) == ("finished", 0, 2, 0.5, 9)
    assert s.extra == {"new_key": 1}
    with pytest.raises(RecordError, match="`best`"):
        RunSummary.from_json({"best": {"value": 1.0}})
    # what a runs browser shows for a run whose summary.json is damaged that way
    (tmp_path / "summary.json").write_text(json.dumps(d))
    st = RunDir(tmp_path).status()
    assert (st.status, st.trials_done, st.best_trial, st.budget_trials) == ("finished", 0, 2, 9)


# -- resolved.json --------------------------------------------------------------------------------
@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_recorded_resolved_json_reads_into_a_resolved_run_and_back_unchanged(run, tmp_path):
    import shutil

    text = (run / "resolved.json").read_text()
    d = json.loads(text)
    r = ResolvedRun.from_json(d)  # every key of a recorded run has its type
    assert r == RunDir(run).resolved_run()
    assert r.to_json() == d and list(r.to_json()) == list(d)  # same keys, same order
    assert (r.base_model, r.models, r.num_layers, r.seed, r.device) == (
        d["base_model"], d["models"], d["num_layers"], d["seed"], d["device"])
    assert (r.optimizer_name, r.budget_trials, r.eval, r.base_dir) == (
        d["optimizer"]["name"], d["budget"]["trials"], d["eval"], d["eval_base_dir"])
    assert r.params == d["params"] and r.objective_names == d["objective_names"] and r.multi == (len(d["directions"]) > 1)
    assert r.storage is None and r.study_name is None and r.test_eval is None  # runs from before those keys
    assert set(r.extra) == {"space", "model_space", "io_group", "layer_sources", "pruner", "recipe"}
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    RunDir(copy).write_resolved(RunDir(copy).resolved_run())
    assert (copy / "resolved.json").read_text() == text  # written back byte for byte
    assert RunDir(copy).study_name() == "mergelab"  # a run from before studies were named after runs


def test_resolved_run_keeps_unknown_keys_and_fills_missing_ones():
    d = {"base_model": "/m/base", "models": ["/m/a"], "future_key": {"x": 1}, "device": None,
         "objective_names": None}
    r = ResolvedRun.from_json(d)
    assert r.extra == {"future_key": {"x": 1}} and r.device is None
    assert (r.objective_names, r.directions, r.params, r.budget, r.base_dir, r.methods) == (
        ["combined"], ["maximize"], [], {}, ".", [])
    assert r.to_json() == d  # null stays null, absent stays absent
    from dataclasses import replace

    r2 = replace(r, budget={"trials": 9})  # what a resume with --trials writes back
    assert r2.to_json() == {**d, "budget": {"trials": 9}} and r2.budget_trials == 9
    assert ResolvedRun.from_json({"method": ["ties", "dare_ties"]}).methods == ["ties", "dare_ties"]


@pytest.mark.parametrize("key,value", [
    ("base_model", 3), ("models", "/m/a"), ("models", ["/m/a", 2]), ("params", [{"name": 1}]),
    ("params", {"a": 1}), ("num_layers", "4"), ("num_layers", True), ("layer_groups", 2.0), ("seed", "0"),
    ("device", ["cpu"]), ("storage", 1), ("study_name", 5), ("eval", 7), ("test_eval", ["x"]),
    ("eval_base_dir", 1), ("optimizer", "cmaes"), ("optimizer", {"name": 3}), ("budget", {"trials": "5"}),
    ("budget", {"timeout": "1h"}), ("objective_names", "combined"), ("directions", [1]), ("created", "now"),
    ("config_sha256", 1), ("given", []), ("versions", "1.0"), ("method", 5), ("filters", "mlp"),
    ("warm_start", {"a": 1}),
])
def test_a_resolved_key_of_the_wrong_type_is_named(key, value):
    with pytest.raises(RecordError, match=rf"runs/x/resolved.json: `{key}` is .*expected "):
        ResolvedRun.from_json({"base_model": "/m/base", key: value}, "runs/x/resolved.json")


def test_resolved_json_that_is_not_an_object_is_refused():
    with pytest.raises(RecordError, match="resolved.json holds a JSON object, not list"):
        ResolvedRun.from_json([1, 2])


@pytest.mark.parametrize("damage", ["num_layers", "json", "list"])
def test_a_damaged_resolved_json_is_one_paragraph_naming_the_file_and_key(tmp_path, damage, capsys):
    import shutil

    from mergelab.cli import main

    run = tmp_path / "run"
    shutil.copytree(RUNS[0], run)
    d = json.loads((run / "resolved.json").read_text())
    d["num_layers"] = "4"
    (run / "resolved.json").write_text({"num_layers": json.dumps(d), "json": "{\"base_model\": ", "list": "[]"}[damage])
    want = {"num_layers": r"resolved.json: `num_layers` is '4', expected an integer",
            "json": r"resolved.json is not readable JSON", "list": r"resolved.json holds a JSON object, not list"}[damage]
    with pytest.raises(MergelabError, match=rf"^Run {run}: {want}.*restore it from a copy of the run"):
        RunDir(run).resolved_run()
    capsys.readouterr()
    assert main(["resume", str(run), "--no-tui"]) == 2  # refused before anything runs, no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and re.search(want, err)
    assert json.loads((run / "summary.json").read_text()) == json.loads((RUNS[0] / "summary.json").read_text())


def test_a_viewer_of_a_run_with_a_damaged_resolved_json_shows_the_rest(tmp_path):
    import shutil

    from mergelab.tui.state import RunState, recipe_heatmaps

    run = tmp_path / "run"
    shutil.copytree(RUNS[2], run)  # ties-search: 4 layers in 2 groups
    good = RunState(RunDir(run))
    assert good.resolved == RunDir(run).resolved_run() and good.labels["m0.weight.g0"] == "ft_math · weight · layers 0–1"
    d = json.loads((run / "resolved.json").read_text())
    recipe = json.loads((run / "best" / "trial.json").read_text())["recipe"]
    assert recipe_heatmaps(recipe, d) == recipe_heatmaps(recipe, good.resolved) != []  # a dict reads the same
    d["params"] = "m0.weight.g0"
    (run / "resolved.json").write_text(json.dumps(d))
    st = RunState(RunDir(run))
    assert st.resolved == ResolvedRun() and st.labels == {} and st.objective_names == ["combined"]
