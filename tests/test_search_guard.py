"""A run directory under faults and in hostile hands: concurrent resumes, damaged or edited files,
secrets, paths that lead outside the run, a full disk, searches that cannot succeed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mergelab.errors import MergelabError
from search.loop import prepare_run, run_search
from search.rundir import RunDir
from search.synthetic import sphere

from test_search import ROOT, _config, world  # noqa: F401  (world: the fixture)

# -- item 5: one search process per run ---------------------------------------------------------
_RESUMER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from mergelab.errors import MergelabError
    from search.loop import run_search
    from search.synthetic import slow_sphere
    run, me = sys.argv[1], sys.argv[2]
    open(os.path.join(run, "ready-" + me), "w").close()
    while not os.path.exists(os.path.join(run, "go")):
        time.sleep(0.005)
    try:
        run_search(run, slow_sphere)
    except MergelabError as e:
        print(e)
        sys.exit(2)
""")


def test_two_resumes_at_once_one_is_refused(world, tmp_path):
    cfg = _config(world, tmp_path, optimizer={"name": "pycma", "popsize": 3}, budget={"trials": 5})
    rd = prepare_run(cfg, tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-c", _RESUMER.format(root=str(ROOT)), str(rd.path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    t0 = time.time()
    while not all((rd.path / f"ready-{i}").exists() for i in range(2)):
        assert time.time() - t0 < 120 and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (rd.path / "go").touch()  # both start the search at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(o for p, o in zip(procs, outs) if p.returncode == 2)[0].decode()
    assert "is being searched right now by another process" in refused
    recs = rd.trials()
    assert [r["number"] for r in recs] == list(range(5))  # the budget, not one more
    assert len({json.dumps(r["params"], sort_keys=True) for r in recs}) == 5  # no point twice
    run_search(rd, sphere)  # the lock went with its process: the run opens again


def _run(world, tmp_path, name="run", **over):
    over.setdefault("optimizer", {"name": "random"})
    over.setdefault("budget", {"trials": 4})
    return prepare_run(_config(world, tmp_path, **over), tmp_path / name)


# -- item 1: nothing in a run directory is unpickled -------------------------------------------
def test_planted_pickle_is_never_loaded_on_resume(world, tmp_path):
    import pickle

    rd = _run(world, tmp_path, optimizer={"name": "pycma", "popsize": 3}, budget={"trials": 2})
    run_search(rd, sphere)
    assert not list(rd.path.rglob("*.pkl"))  # pycma's state is the trials' pycma_slot attributes
    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (rd.path / "pycma.pkl").write_bytes(pickle.dumps(Evil()))
    from search.recovery import set_budget_trials
    set_budget_trials(rd, 4)
    run_search(rd, sphere)
    assert not marker.exists() and rd.summary()["trials_done"] == 4


# -- item 12: refuse before creating; stop a search that cannot succeed -----------------------
def test_refused_device_leaves_no_run_directory(world, tmp_path):
    with pytest.raises(MergelabError, match="search config `device`.*tpu"):
        _run(world, tmp_path, device="tpu")
    assert not (tmp_path / "run").exists()
    _run(world, tmp_path)  # the --run name is free


def test_first_trials_failing_alike_stop_the_search(world, tmp_path):
    rd = _run(world, tmp_path, budget={"trials": 20})
    with pytest.raises(MergelabError, match=r"first 3 trials .* all failed with the same error: non-finite score nan"):
        run_search(rd, lambda recipe, ctx: float("nan"))
    s = rd.summary()
    assert s["status"] == "failed" and s["trials_done"] == 3 and "non-finite" in s["detail"]


def test_a_trial_exception_is_that_trial_failing_with_its_reason(world, tmp_path):
    class NonFiniteMergeError(MergelabError):  # what TrialMerger raises for an overflowing merge
        pass

    def objective(recipe, ctx):
        if ctx.number == 1:
            raise NonFiniteMergeError("tensor model.layers.0.mlp.up_proj.weight has inf values")
        return sphere(recipe, ctx)

    rd = _run(world, tmp_path)
    assert run_search(rd, objective).status == "finished"
    recs = rd.trials()
    assert [r["state"] for r in recs] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert recs[1]["error"] == "tensor model.layers.0.mlp.up_proj.weight has inf values"


# -- item 7: a full disk --------------------------------------------------------------------------
def test_disk_full_stops_the_search_keeps_trials_and_resumes(world, tmp_path, monkeypatch):
    import errno

    from search import rundir

    rd = _run(world, tmp_path, budget={"trials": 5})
    ref = _run(world, tmp_path, "ref", budget={"trials": 5})
    run_search(ref, sphere)
    real_append, real_write = RunDir.append_trial, rundir.atomic_write_bytes
    full = {"on": False}

    def append(self, rec):  # the disk fills up while trial 2's line is written
        if rec["number"] == 2:
            full["on"] = True
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "trials.jsonl"))
        return real_append(self, rec)

    def write(path, data):  # and no new file fits either (summary.json falls back to in place)
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(RunDir, "append_trial", append)
    monkeypatch.setattr(rundir, "atomic_write_bytes", write)
    with pytest.raises(MergelabError, match=r"No space left on device while writing .*trials.jsonl.*mergelab resume"):
        run_search(rd, sphere)
    s = json.loads((rd.path / "summary.json").read_text())
    assert s["status"] == "stopped" and "No space left" in s["detail"]
    assert [r["number"] for r in rd.trials()] == [0, 1]
    monkeypatch.undo()  # space freed
    assert run_search(rd, sphere).status == "finished"
    assert [r["number"] for r in rd.trials()] == [0, 1, 2, 3, 4]  # trial 2 restored from the study
    assert [r["params"] for r in rd.trials()] == [r["params"] for r in ref.trials()]
