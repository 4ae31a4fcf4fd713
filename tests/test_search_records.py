"""TrialRecord: each trials.jsonl line read once into a typed record; the JSON format unchanged
(every line of the recorded fixture runs reads and writes back to the same mapping)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.records import RecordError, TrialRecord
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
