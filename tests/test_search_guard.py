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


def test_cmaes_state_in_the_study_is_checked_before_optuna_unpickles_it(world, tmp_path):
    """Optuna's CmaEsSampler keeps its optimizer as a pickle in the study (study.db, in the run
    directory): a planted one must be refused before Optuna's pickle.loads runs it."""
    import pickle

    import optuna

    from search.recovery import set_budget_trials

    rd = _run(world, tmp_path, optimizer={"name": "cmaes", "popsize": 3}, budget={"trials": 4})
    run_search(rd, sphere)
    url = f"sqlite:///{rd.path / 'study.db'}"
    study = optuna.load_study(study_name=rd.study_name(), storage=url)
    stored = [t for t in study.get_trials() if any(k.endswith("optimizer:0") for k in t.system_attrs)]
    assert stored  # generation 2's trials carry generation 1's state: a real state passes the check
    set_budget_trials(rd, 6)
    run_search(rd, sphere)
    assert rd.summary()["trials_done"] == 6

    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    last = [t for t in study.get_trials() if any(k.endswith("optimizer:0") for k in t.system_attrs)][-1]
    key = next(k for k in last.system_attrs if k.endswith("optimizer:0"))  # the state Optuna loads next
    import sqlite3

    with sqlite3.connect(rd.path / "study.db") as db:  # what someone editing a shared run's file does
        n = db.execute("UPDATE trial_system_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
                       (json.dumps(pickle.dumps(Evil()).hex()), last._trial_id, key)).rowcount
        db.execute("DELETE FROM trial_system_attributes WHERE trial_id = ? AND key LIKE ? AND key != ?",
                   (last._trial_id, key[:-1] + "%", key))  # the state's other chunks
    assert n == 1
    set_budget_trials(rd, 8)
    with pytest.raises(MergelabError, match=rf"CMA-ES optimizer state \(trial {last.number}, .*refers to `posix.system`"):
        run_search(rd, sphere)
    assert not marker.exists()
    assert rd.summary()["trials_done"] == 6  # nothing lost, nothing run


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


# -- item 6: a damaged or edited run ---------------------------------------------------------------
def test_truncated_trials_line_is_repaired_from_the_study(world, tmp_path):
    rd = _run(world, tmp_path, budget={"trials": 4})
    run_search(rd, sphere, max_trials_this_session=3)
    p = rd.path / "trials.jsonl"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 40])  # the last line cut short (a crash or a full disk)
    run_search(rd, sphere)
    recs = rd.trials()
    assert [r["number"] for r in recs] == [0, 1, 2, 3] and all(r["state"] == "COMPLETE" for r in recs)
    s = rd.summary()
    assert s["trials_done"] == 4 and s["status"] == "finished"  # 4/4, not 5/4
    assert list(rd.path.glob("trials.jsonl.damaged-*"))  # the original kept beside it
    assert "trials.jsonl was damaged" in (rd.path / "log.txt").read_text()


def test_deleted_study_db_is_refused_and_not_recreated(world, tmp_path):
    rd = _run(world, tmp_path)
    run_search(rd, sphere, max_trials_this_session=2)
    (rd.path / "study.db").unlink()
    with pytest.raises(MergelabError, match="has no study.db .* lists 2 trial"):
        run_search(rd, sphere)
    assert not (rd.path / "study.db").exists()


def test_foreign_resolved_json_is_refused(world, tmp_path):
    a = _run(world, tmp_path, "a")
    b = _run(world, tmp_path, "b", seed=8)
    run_search(a, sphere, max_trials_this_session=1)
    (a.path / "resolved.json").write_text((b.path / "resolved.json").read_text())
    (a.path / "config.yaml").write_text((b.path / "config.yaml").read_text())
    with pytest.raises(MergelabError, match="its storage holds no study named 'b'.*belongs to another run"):
        run_search(a, sphere)
    res = b.resolved()
    res["study_name"] = "a"  # the same study name: the identity stamps still tell them apart
    a.write_resolved(res)
    with pytest.raises(MergelabError, match="resolved.json does not belong to this run's study"):
        run_search(a, sphere)
    assert [r["number"] for r in a.trials()] == [0]


def test_edited_config_budget_is_honoured_and_space_refused(world, tmp_path):
    import yaml

    rd = _run(world, tmp_path, budget={"trials": 2})
    run_search(rd, sphere)
    cfg = yaml.safe_load(rd.config_text())
    cfg["budget"] = {"trials": 3}
    (rd.path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_search(rd, sphere).trials_done == 3  # honoured
    assert "budget now {'trials': 3" in (rd.path / "log.txt").read_text()
    cfg["space"]["weight"] = [0, 3.0]
    (rd.path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MergelabError, match=r"config.yaml was edited after the run was created \(space changed\)"):
        run_search(rd, sphere)


def test_resume_trials_gives_a_finished_run_more_budget(world, tmp_path):
    from mergelab.cli import main

    rd = _run(world, tmp_path, budget={"trials": 2})
    run_search(rd, sphere)
    from search.recovery import set_budget_trials
    with pytest.raises(MergelabError, match="already counted 2 trials"):
        set_budget_trials(rd, 2)
    set_budget_trials(rd, 4)
    assert run_search(rd, sphere).trials_done == 4 and rd.status().budget_trials == 4
    assert main(["resume", str(rd.path), "--trials", "1", "--no-tui"]) == 2


# -- item 2: what a run directory names stays inside it ------------------------------------------
def test_run_pointing_outside_reads_and_writes_nothing_there(world, tmp_path):
    rd = _run(world, tmp_path)
    run_search(rd, sphere)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET\n")
    res = rd.resolved()
    res["eval"] = str(secret)
    rd.write_resolved(res)
    from search.export import search_metadata

    meta = search_metadata(rd)
    assert "SECRET" not in json.dumps(meta) and meta["eval_spec"] == {"path": str(secret)}
    # a `best` link out of the run: the next best is not written through it
    outside = tmp_path / "outside"
    outside.mkdir()
    import shutil
    shutil.rmtree(rd.path / "best")
    (rd.path / "best").symlink_to(outside)
    with pytest.raises(MergelabError, match="is a link"):
        rd.inside("best", "model")
    from search.summary import rebuild_summary
    with pytest.raises(MergelabError, match="never through a link"):
        rebuild_summary(rd, lambda m: None)
    assert list(outside.iterdir()) == []
    # a storage elsewhere is not created
    other = tmp_path / "elsewhere.db"
    res = rd.resolved()
    res["storage"] = f"sqlite:///{other}"
    rd.write_resolved(res)
    with pytest.raises(MergelabError, match="does not exist. mergelab does not create a database"):
        run_search(rd, sphere)
    assert not other.exists()


# -- item 3: no password in the run directory -----------------------------------------------------
def test_storage_password_is_kept_out_of_the_run(world, tmp_path, monkeypatch):
    from search.storage import public_url, storage_of

    url = "postgresql+psycopg2://ml:s3cr%40t@db.example:5432/runs"
    assert public_url(url) == "postgresql+psycopg2://ml@db.example:5432/runs"
    assert public_url("journal:/x/y.log") == "journal:/x/y.log"
    rd = _run(world, tmp_path)
    res = rd.resolved()
    res["storage"] = public_url(url)
    rd.write_resolved(res)
    assert storage_of(rd) == public_url(url)  # nothing given: .pgpass / trust may still work
    monkeypatch.setenv("MERGELAB_STORAGE", url)
    assert storage_of(rd) == url
    with pytest.raises(MergelabError, match="is not the storage of run"):
        storage_of(rd, "postgresql+psycopg2://ml:pw@other:5432/runs")


# -- issue 18: the study readable without mergelab; progress for viewers -------------------------
def test_study_is_described_for_optuna_users(world, tmp_path):
    import optuna

    rd = _run(world, tmp_path, budget={"trials": 2})
    run_search(rd, sphere)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{rd.path / 'study.db'}")
    assert study.study_name == rd.name and study.metric_names == ["combined"]
    params = study.user_attrs["mergelab_params"]
    assert set(params) == {p["name"] for p in rd.resolved()["params"]}
    some = next(v for v in params.values() if v["kind"] == "model" and v["parameter"] == "weight")
    assert some["model"] in rd.resolved()["models"]
    assert " · weight" in some["label"]
    t = study.trials[0]
    rec = rd.trials()[0]
    assert t.user_attrs["score/a"] == rec["scores"]["a"] and t.user_attrs["metric/b/dist2"] == rec["metrics"]["b/dist2"]


def test_progress_json_follows_the_trial_stages(world, tmp_path):
    rd = _run(world, tmp_path, budget={"trials": 2})
    seen = []

    def objective(recipe, ctx):
        ctx.progress("merge", 0.0)
        seen.append(rd.progress())
        ctx.progress("eval a", 0.5)
        seen.append(rd.progress())
        return sphere(recipe, ctx)

    run_search(rd, objective)
    assert {k: seen[0][k] for k in ("trial", "stage", "frac", "stages_done")} == \
        {"trial": 0, "stage": "merge", "frac": 0.0, "stages_done": []}
    assert {k: seen[3][k] for k in ("trial", "stage", "frac", "stages_done")} == \
        {"trial": 1, "stage": "eval a", "frac": 0.5, "stages_done": ["merge"]}
    end = rd.progress()
    assert end["trial"] == 1 and end["stage"] == "done" and end["stages_done"] == ["merge", "eval a"]
    assert abs(end["time"] - time.time()) < 60


# -- issue 14 item 4: --workers N on GPUs ---------------------------------------------------------
def test_each_local_worker_gets_its_own_gpu():
    from search.validate import worker_devices

    assert worker_devices("cuda", 2, 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("auto", 2, 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("cpu", 3, 2) == ["cpu", "cpu", "cpu"]
    assert worker_devices("cuda", 3, 2, share=True) == ["cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(MergelabError, match="torch sees 2 GPU.*--share-gpus"):
        worker_devices("cuda", 3, 2)
    with pytest.raises(MergelabError, match="one GPU for 2 workers"):
        worker_devices("cuda:1", 2, 2)
    with pytest.raises(MergelabError, match="no CUDA device"):
        worker_devices("cuda", 2, 0)


def test_workers_cli_starts_each_worker_on_its_gpu(world, tmp_path, monkeypatch):
    """`search --workers 2` with device cuda: worker i is started with --device cuda:i (the GPU
    count and the processes are mocked: this runs on CPU)."""
    import torch

    from mergelab.cli import main
    from mergelab.cli import search_cmd

    started = []

    class FakeProc:
        def __init__(self, cmd, env):
            started.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(search_cmd.subprocess, "Popen", FakeProc)
    monkeypatch.setattr("search.loop.check_device", lambda d: None)
    cfg = _config(world, tmp_path, device="cuda")
    journal = tmp_path / "j.log"
    assert main(["search", str(cfg), "--run", str(tmp_path / "run"), "--workers", "2", "--storage",
                 f"journal:{journal}"]) == 0
    assert [c[c.index("--device") + 1] for c, _ in started] == ["cuda:0", "cuda:1"]
    assert all("--storage" not in c and e["MERGELAB_STORAGE"] == f"journal:{journal}" for c, e in started)


# -- item 13: the PostgreSQL test on a machine without PostgreSQL -----------------------------------
def test_postgres_skip_names_its_reason(monkeypatch):
    import pg_server

    monkeypatch.setattr(pg_server.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(pg_server.shutil, "which", lambda name: None)
    assert "no PostgreSQL server binaries (initdb, pg_ctl)" in pg_server.unavailable()
