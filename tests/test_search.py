"""Search: config validation, space -> recipe, every optimizer, resume after SIGKILL, graceful stop,
workers on a journal file and on PostgreSQL. A synthetic deterministic objective stands in for
merge + eval here (the loop does not care); tiny safetensors models give the layer layout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mergelab.errors import MergelabError
from search.config import parse_search_config
from search.loop import prepare_run, run_search
from search.rundir import RunDir
from search.validate import build_space
from search.synthetic import sphere

from conftest import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    for i, n in enumerate(["base", "m1", "m2"]):
        write_tiny_model(d / n, i)
    (d / "em.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    (d / "eval.yaml").write_text(
        "scorers:\n  - {name: a, type: exact_match, data: em.jsonl}\n  - {name: b, type: exact_match, data: em.jsonl}\n")
    return d


def _config(world: Path, tmp: Path, **over) -> Path:
    cfg = {"base_model": str(world / "base"), "models": [str(world / "m1"), str(world / "m2")],
           "method": "ties", "space": {"weight": [0, 1.5], "density": None, "lambda": [0.5, 2.0]},
           "eval": str(world / "eval.yaml"), "optimizer": {"name": "cmaes", "popsize": 3},
           "budget": {"trials": 6}, "seed": 7}
    cfg.update(over)
    p = tmp / f"search-{len(list(tmp.glob('search-*.yml')))}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _params_seq(rd: RunDir) -> list[dict]:
    return [r["params"] for r in rd.trials() if r["state"] == "COMPLETE"]


# -- config and space ---------------------------------------------------------------------------
def test_layer_groups_expand_to_per_layer_gradients(world):
    cfg = parse_search_config({"base_model": str(world / "base"), "models": [str(world / "m1"), str(world / "m2")],
                               "method": "ties", "space": {"weight": [0, 1.5], "density": 0.5},
                               "layer_groups": 2, "eval": "x"})
    space = build_space(cfg, world / "base")
    assert space.names == ["m0.weight.g0", "m0.weight.g1", "m1.weight.g0", "m1.weight.g1"]
    r = space.recipe({"m0.weight.g0": 0.1, "m0.weight.g1": 0.2, "m1.weight.g0": 0.3, "m1.weight.g1": 0.4})
    assert r["models"][0]["parameters"] == {"weight": [0.1, 0.1, 0.2, 0.2], "density": 0.5}
    assert r["models"][1]["parameters"] == {"weight": [0.3, 0.3, 0.4, 0.4], "density": 0.5}
    assert r["merge_method"] == "ties" and r["base_model"] == str(world / "base") and "parameters" not in r
    # the recipe is an ordinary recipe: mergelab's validator and resolver accept it, layer by layer
    from mergelab.recipe import load_recipe, resolve_value
    rec = load_recipe(r)
    got = [resolve_value(rec.models[1].parameters["weight"], f"model.layers.{l}.mlp.up_proj.weight", l / 3) for l in range(4)]
    assert got == pytest.approx([0.3, 0.3, 0.4, 0.4], abs=1e-12)


def test_filters_io_group_and_layer_sources(world):
    cfg = parse_search_config({"base_model": str(world / "base"), "models": [str(world / "m1"), str(world / "m2")],
                               "method": ["task_arithmetic", "ties"], "space": {"weight": [0, 1]},
                               "layer_groups": 2, "filters": ["self_attn"], "io_group": True,
                               "layer_sources": True, "eval": "x"})
    space = build_space(cfg, world / "base")
    assert space.names[:1] == ["method"]
    assert "m0.weight.io" in space.names and "m1.weight.other.g1" in space.names
    assert space.names[-2:] == ["source.g0", "source.g1"]
    vals = {n: 0.5 for n in space.names}
    vals["method"] = 1.2  # -> ties
    vals["source.g0"], vals["source.g1"] = 0.4, 2.7  # group 0: the merge; group 1: model 1 (m2)
    r = space.recipe(vals)
    assert r["merge_method"] == "ties"
    w0 = r["models"][0]["parameters"]["weight"]
    assert [e["filter"] for e in w0[:3]] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert w0[3] == {"filter": "self_attn", "value": [0.5, 0.5, 0.0, 0.0]}
    assert w0[4] == {"value": [0.5, 0.5, 0.0, 0.0]}
    w1 = r["models"][1]["parameters"]["weight"]
    assert w1[3] == {"filter": "self_attn", "value": [0.5, 0.5, 1.0, 1.0]}
    assert r["models"][1]["parameters"]["density"] == [1.0, 1.0, 1.0, 1.0]  # ties default 1, layers 2-3 forced 1
    assert r["parameters"]["lambda"] == [1.0, 1.0, 1.0, 1.0]



def test_layer_sources_refuse_an_operator_that_does_not_declare_it(world):
    # OperatorSpec.layer_source decides (breadcrumbs' gamma keeps it from equalling one model)
    cfg = parse_search_config({"base_model": str(world / "base"), "models": [str(world / "m1"), str(world / "m2")],
                               "method": ["ties", "breadcrumbs"], "space": {"weight": [0, 1]},
                               "layer_groups": 2, "layer_sources": True, "eval": "x"})
    with pytest.raises(MergelabError) as e:
        build_space(cfg, world / "base")
    assert "works with dare_linear, dare_ties, linear, task_arithmetic, ties" in str(e.value)
    assert "`method` has breadcrumbs." in str(e.value)


@pytest.mark.parametrize("over, needle", [
    ({"space": {"weight": [1.5, 0]}}, "space.weight: [1.5, 0]` is reversed"),
    ({"space": {"weight": [0, 1], "temperature": [0, 1]}}, "`space.temperature`: `temperature` is not a parameter of ties"),
    ({"eval": "/nonexistent/eval.yaml"}, "`eval`: the eval spec file /nonexistent/eval.yaml does not exist"),
    ({"models": ["/nonexistent/model"]}, "`models[0]`"),
    ({"method": "nope"}, "unknown operator `nope`"),
    ({"space": {"weight": [0, 1]}, "layer_groups": 9}, "more than the base model's 4 layers"),
])
def test_bad_config_fails_before_any_trial(world, tmp_path, over, needle):
    cfg = _config(world, tmp_path, **over)
    with pytest.raises(MergelabError) as e:
        prepare_run(cfg, tmp_path / "runs" / "r")
    assert needle in str(e.value)
    assert not (tmp_path / "runs" / "r").exists()  # nothing created, no trial ran


# -- every optimizer -----------------------------------------------------------------------------
def test_gp_starts_random_then_models_the_score_and_beats_random_search(world, tmp_path):
    # The same derived seeds: gp's startup trials are the random search's trials exactly; after
    # them the Gaussian process proposes, and on the sphere it closes in where random does not.
    runs = {}
    for opt in ("gp", "random"):
        cfg = _config(world, tmp_path, optimizer={"name": opt, "n_startup_trials": 4}, budget={"trials": 14})
        runs[opt] = prepare_run(cfg, tmp_path / opt)
        run_search(runs[opt], sphere)
    gp, rnd = _params_seq(runs["gp"]), _params_seq(runs["random"])
    assert gp[:4] == rnd[:4] and gp[4] != rnd[4]
    best = {k: max(r["value"] for r in rd.trials()) for k, rd in runs.items()}
    assert best["gp"] > best["random"] + 0.05, best


@pytest.mark.parametrize("opt", ["cmaes", "gp", "tpe", "random", "nsga2", "pycma"])
def test_six_trial_search_each_optimizer(world, tmp_path, opt):
    extra = {"n_startup_trials": 3} if opt == "gp" else {"popsize": 4}
    cfg = _config(world, tmp_path, optimizer={"name": opt, **extra})
    rd = prepare_run(cfg, tmp_path / "run", objective_names=["a", "b"] if opt == "nsga2" else None)
    res = run_search(rd, sphere)
    recs = rd.trials()
    assert res.status == "finished" and [r["number"] for r in recs] == list(range(6))
    assert all(r["state"] == "COMPLETE" for r in recs)
    s = rd.summary()
    assert s["status"] == "finished" and s["trials_done"] == 6
    best = max(recs, key=lambda r: r["value"])
    assert s["best"]["number"] == best["number"] and s["best"]["value"] == best["value"]
    assert yaml.safe_load((rd.path / "best" / "recipe.yaml").read_text()) == best["recipe"]
    # each record's score is the objective's value of its params (the loop passes them through)
    for r in recs:
        assert r["value"] == pytest.approx(r["scores"]["a"] + r["scores"]["b"])
    if opt == "cmaes":  # the paper's start: every parameter at the middle of its range
        pass
    if opt == "nsga2":
        assert s["pareto"] and all(p["values"] is not None for p in s["pareto"])
        assert all(r["values"] == [r["scores"]["a"], r["scores"]["b"]] for r in recs)
    if opt == "pycma":  # no pickle: the state is re-derived from the trials' slots
        assert not list(rd.path.rglob("*.pkl"))
        import optuna
        study = optuna.load_study(study_name=rd.study_name(), storage=rd.storage_url())
        assert [t.user_attrs["pycma_slot"] for t in study.trials] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1]]
    assert rd.status().status == "finished"


# -- resume after SIGKILL -------------------------------------------------------------------------
_RUNNER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from search.loop import run_search
    from search.synthetic import sphere
    run, hold, hold_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    def objective(recipe, ctx):
        if ctx.number == hold:  # tell the test we are inside this trial, then take our time
            open(os.path.join(run, "inside"), "w").close()
            time.sleep(hold_s)
        return sphere(recipe, ctx)

    run_search(run, objective)
""")


def _start(run: Path, hold: int, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUNNER.format(root=str(ROOT)), str(run), str(hold), str(hold_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_inside(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (run / "inside").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.parametrize("opt", ["cmaes", "tpe", "random", "pycma"])
def test_sigkill_and_resume_gives_the_uninterrupted_sequence(world, tmp_path, opt):
    extra = {"n_startup_trials": 2} if opt == "tpe" else {"popsize": 4}
    cfg = _config(world, tmp_path, optimizer={"name": opt, **extra}, budget={"trials": 7})
    rd = prepare_run(cfg, tmp_path / "killed")
    proc = _start(rd.path, 4, 60)
    ref = prepare_run(cfg, tmp_path / "ref")  # the reference runs while the subprocess starts up
    run_search(ref, sphere)
    _wait_inside(rd.path, proc)  # trial 4 is inside its objective
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rd.status().status == "stopped" and "interrupted" in rd.status().detail
    run_search(rd, sphere)
    recs = rd.trials()
    assert _params_seq(rd) == _params_seq(ref)  # exact floats, same order
    done = [r for r in recs if r["state"] == "COMPLETE"]
    assert len(done) == 7 and len({r["number"] for r in recs}) == len(recs)
    killed = [r for r in recs if r.get("interrupted")]
    assert len(killed) == 1 and killed[0]["number"] == 4  # died inside trial 4
    assert [r["retry_of"] for r in done].count(4) == (0 if opt == "pycma" else 1)
    assert rd.summary()["trials_done"] == 7 and rd.status().status == "finished"


def test_sigterm_stops_gracefully_and_resumes(world, tmp_path):
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 6})
    ref = prepare_run(cfg, tmp_path / "ref")
    run_search(ref, sphere)
    rd = prepare_run(cfg, tmp_path / "run")
    proc = _start(rd.path, 2, 0.5)
    _wait_inside(rd.path, proc)
    proc.send_signal(signal.SIGTERM)  # inside trial 2: it finishes, then the search stops
    assert proc.wait(timeout=60) == 0
    recs = rd.trials()
    assert len(recs) == 3 and all(r["state"] == "COMPLETE" for r in recs)  # the current trial finished
    s = rd.status()
    assert s.status == "stopped" and s.detail == "stopped by signal" and s.trials_done == len(recs)
    run_search(rd, sphere)
    assert _params_seq(rd) == _params_seq(ref) and [r["number"] for r in rd.trials()] == list(range(6))


def test_control_file_stop_and_pause(world, tmp_path):
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 50})
    rd = prepare_run(cfg, tmp_path / "run")
    seen = []

    def objective(recipe, ctx):
        seen.append(ctx.number)
        if ctx.number == 2:
            rd.request("stop")
        return sphere(recipe, ctx)

    res = run_search(rd, objective)
    assert res.status == "stopped" and seen == [0, 1, 2] and rd.control() is None
    assert rd.summary()["detail"] == "stopped by user"


# -- workers ---------------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from search.loop import prepare_run, run_search
    from search.synthetic import slow_sphere
    rd = prepare_run(sys.argv[1], sys.argv[2], storage=sys.argv[3])
    run_search(rd, slow_sphere, worker=True, storage=sys.argv[3])
""")


def _two_workers(world, tmp_path, storage: str, run: Path) -> RunDir:
    cfg = _config(world, tmp_path, optimizer={"name": "tpe"}, budget={"trials": 8})
    rd = prepare_run(cfg, run, storage=storage)  # the first creates; the workers join
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER.format(root=str(ROOT)), str(cfg), str(run), storage],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    return rd


def check_shared(rd: RunDir, budget: int, storage) -> None:
    """Budget met exactly, no trial run twice, the study and trials.jsonl agree."""
    import optuna

    from search.optimizers import ABANDONED_ATTR
    recs = rd.trials()
    numbers = [r["number"] for r in recs]
    assert len(numbers) == len(set(numbers))  # no trial run twice
    assert sum(r["state"] == "COMPLETE" for r in recs) == budget  # met, not overshot
    assert len({json.dumps(r["params"], sort_keys=True) for r in recs}) == len(recs)
    # both workers usually take trials, but a worker that starts late on a loaded machine may
    # find the budget already taken; what matters is that none was run twice
    assert 1 <= len({r["worker"] for r in recs}) <= 2
    study = optuna.load_study(study_name=rd.study_name(), storage=storage)
    ran = [t for t in study.trials if not t.user_attrs.get(ABANDONED_ATTR)]
    assert sorted(t.number for t in ran) == sorted(numbers)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t.user_attrs.get(ABANDONED_ATTR))
    assert rd.summary()["status"] == "finished" and rd.summary()["trials_done"] == budget


@pytest.fixture(scope="module")
def postgres_url():
    """MERGELAB_TEST_POSTGRES_URL when set, else a throwaway server started from the installed
    binaries (tests/pg_server.py); skipped with the reason when neither is possible, a failure
    instead when MERGELAB_REQUIRE_POSTGRES=1 (.ci/run sets it, so CI always runs these)."""
    import shutil

    import pg_server

    url = os.environ.get("MERGELAB_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    why = pg_server.unavailable()
    if why:
        if os.environ.get("MERGELAB_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"MERGELAB_REQUIRE_POSTGRES=1 but no PostgreSQL server can be started: {why}.")
        pytest.skip(f"PostgreSQL worker test skipped: {why}.")
    server = pg_server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(server.data.parent, ignore_errors=True)


def test_a_dead_workers_trial_on_another_machine_is_failed_by_its_heartbeat_and_retried(
        world, tmp_path, postgres_url, monkeypatch):
    """A worker on another machine died inside a trial: its storage heartbeat stops, and a worker
    joining the run fails the trial through optuna.storages.fail_stale_trials (public API), records
    it as interrupted (not counted), re-tries its parameters under a new number, and meets the
    budget exactly."""
    import time
    import uuid

    import optuna
    from optuna.trial import TrialState

    import search.storage
    from search.optimizers import RETRY_ATTR, counted
    from search.storage import TrialIds, open_storage
    from search.validate import config_of

    monkeypatch.setattr(search.storage, "GRACE_PERIOD_S", 1)  # stale after 1 s without a heartbeat
    monkeypatch.setattr(search.storage, "HEARTBEAT_INTERVAL_S", 1)
    run = tmp_path / f"pg-{uuid.uuid4().hex[:12]}"
    cfg = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 3})
    rd = prepare_run(cfg, run, storage=postgres_url)
    try:
        # the other machine's worker: asked a trial, drew every parameter, beat once, died
        storage = open_storage(postgres_url, heartbeat=True)
        study = optuna.load_study(study_name=rd.study_name(), storage=storage)
        _, space = config_of(rd)
        dead = study.ask()
        dead.set_user_attr("worker", "elsewhere-4242")
        drawn = {p.name: dead.suggest_float(p.name, p.low, p.high) for p in space.params}
        storage.record_heartbeat(TrialIds(storage, rd.study_name())(dead.number))
        time.sleep(2.5)
        res = run_search(rd, sphere, worker=True, storage=postgres_url)
        assert res.status == "finished" and res.trials_done == 3
        trials = optuna.load_study(study_name=rd.study_name(), storage=postgres_url).get_trials()
        t0 = trials[dead.number]
        assert t0.state == TrialState.FAIL and not counted(t0)
        assert sum(counted(t) for t in trials) == 3
        recs = {r.number: r for r in rd.trial_records()}
        assert recs[dead.number].interrupted and recs[dead.number].state == "FAIL"
        (retry,) = [r for r in recs.values() if r.retry_of == dead.number]
        assert retry.state == "COMPLETE" and retry.params == drawn
        assert [t.user_attrs.get(RETRY_ATTR) for t in trials].count(dead.number) == 1
        assert rd.summary()["trials_done"] == 3
    finally:
        try:
            optuna.delete_study(study_name=rd.study_name(), storage=postgres_url)
        except KeyError:
            pass


def test_two_workers_share_postgresql(world, tmp_path, postgres_url):
    import uuid

    import optuna

    from search.loop import public_url

    url = postgres_url
    run = tmp_path / f"pg-{uuid.uuid4().hex[:12]}"  # its own study: reruns and parallel runs never meet
    try:
        rd = _two_workers(world, tmp_path, url, run)
        assert rd.study_name() == f"mergelab-{run.name}"
        check_shared(rd, 8, url)
        # the URL's password is nowhere in the run directory (resolved.json, summary.json, logs)
        password = url.split("://", 1)[1].split("@")[0].partition(":")[2]
        assert rd.resolved()["storage"] == public_url(url)
        if password:
            for f in rd.path.rglob("*"):
                assert not f.is_file() or password not in f.read_text(errors="replace"), f
    finally:
        try:
            optuna.delete_study(study_name=f"mergelab-{run.name}", storage=url)
        except KeyError:
            pass  # never created (the run failed before)


def test_racing_worker_gives_up_a_trial_past_the_budget(world, tmp_path):
    """Two workers pass the budget check at once: the one whose trial has the higher number
    gives it up before evaluating it (not counted, no trials.jsonl line)."""
    import optuna

    from search.loop import _one_trial
    from search.storage import open_storage
    from search.validate import config_of
    from search.optimizers import ABANDONED_ATTR, make_sampler, n_counted

    journal = f"journal:{tmp_path / 'j.log'}"
    cfg_path = _config(world, tmp_path, optimizer={"name": "random"}, budget={"trials": 3})
    rd = prepare_run(cfg_path, tmp_path / "run", storage=journal)
    run_search(rd, sphere, worker=True, max_trials_this_session=2)
    cfg, space = config_of(rd)
    storage = open_storage(rd.storage_url(), False)
    study = optuna.load_study(study_name=rd.study_name(), storage=storage,
                              sampler=make_sampler("random", space, cfg.seed))
    other = study.ask()  # trial 2: another worker took the last slot and is evaluating it
    _one_trial(study, rd, space, sphere, cfg, "me", False, ["combined"], {"trial": None},
               lambda *a: None, None, shared_budget=3)
    t3 = study.trials[3]
    assert t3.state == optuna.trial.TrialState.FAIL and t3.user_attrs[ABANDONED_ATTR] is True
    assert [r["number"] for r in rd.trials()] == [0, 1] and n_counted(study) == 2
    study.tell(other, 0.0)
    assert n_counted(study) == 3  # the budget, exactly
    # without the race the same call runs the trial
    _one_trial(study, rd, space, sphere, cfg, "me", False, ["combined"], {"trial": None},
               lambda *a: None, None, shared_budget=5)
    assert [r["number"] for r in rd.trials()] == [0, 1, 4]


def test_default_method_is_tsv_and_a_ties_only_parameter_says_so(world, tmp_path):
    from search.config import parse_search_config
    from search.validate import validate_config

    base = {"base_model": str(world / "base"), "models": [str(world / "m1"), str(world / "m2")],
            "eval": str(world / "eval.yaml"), "budget": {"trials": 2}}
    cfg, space = validate_config(parse_search_config({**base, "space": {"weight": [0, 2]}}, "t"))
    assert cfg.methods == ["tsv"] and sorted(p.name for p in space.params) == ["m0.weight", "m1.weight"]
    with pytest.raises(MergelabError, match=r"`density` is not a parameter of tsv.*`method` is not given, so it is "
                                            r"the default, tsv; write e.g. `method: ties`"):
        validate_config(parse_search_config({**base, "space": {"weight": [0, 2], "density": [0.1, 1]}}, "t"))
    # given explicitly, the message does not blame the default
    with pytest.raises(MergelabError) as e:
        validate_config(parse_search_config({**base, "method": "tsv", "space": {"density": [0.1, 1]}}, "t"))
    assert "is the default" not in str(e.value)
