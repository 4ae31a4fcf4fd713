"""Resume after a real SIGKILL at several moments of a trial, for every resumable optimizer: the
finished trials' parameters are those of the uninterrupted run, in the same order. The search
process kills itself (os.kill(getpid(), SIGKILL)) at the moment under test, so the moment is exact."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from search.loop import prepare_run, run_search
from search.synthetic import sphere

from test_search import ROOT, _config, _params_seq, world  # noqa: F401  (world: the fixture)

_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import optuna
    from search import loop
    from search.rundir import RunDir
    from search.synthetic import sphere
    run, moment, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "suggest":  # inside suggest_float of the trial's second parameter
        real = optuna.trial.Trial.suggest_float
        calls = {{}}
        def suggest(self, name, *a, **k):
            calls[self.number] = calls.get(self.number, 0) + 1
            if self.number == at and calls[self.number] == 2:
                die()
            return real(self, name, *a, **k)
        optuna.trial.Trial.suggest_float = suggest
    if moment == "told":  # told to the study, its trials.jsonl line not yet written
        real_append = RunDir.append_trial
        def append(self, rec):
            if rec["number"] == at and not rec.get("interrupted"):
                die()
            return real_append(self, rec)
        RunDir.append_trial = append

    def objective(recipe, ctx):
        if moment == "objective" and ctx.number == at:
            die()
        return sphere(recipe, ctx)

    loop.run_search(run, objective)
""")


@pytest.mark.parametrize("moment", ["suggest", "objective", "told"])
@pytest.mark.parametrize("opt", ["cmaes", "gp", "tpe", "random", "pycma"])
def test_sigkill_at_each_moment_resumes_to_the_uninterrupted_run(world, tmp_path, opt, moment):
    extra = {"n_startup_trials": 2} if opt in ("tpe", "gp") else {"popsize": 3}
    cfg = _config(world, tmp_path, optimizer={"name": opt, **extra}, budget={"trials": 6})
    ref = prepare_run(cfg, tmp_path / "ref")
    run_search(ref, sphere)
    rd = prepare_run(cfg, tmp_path / "killed")
    at = 4 if opt != "pycma" else 2  # pycma: mid-generation (popsize 3: slots 0, 1 done, 2 open)
    proc = subprocess.run([sys.executable, "-c", _KILLER.format(root=str(ROOT)), str(rd.path), moment, str(at)],
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert rd.status().status == "stopped"
    run_search(rd, sphere)
    assert _params_seq(rd) == _params_seq(ref)  # exact floats, same order
    recs = rd.trials()
    assert len({r["number"] for r in recs}) == len(recs)  # no line twice
    assert sum(r["state"] == "COMPLETE" for r in recs) == 6
    s = rd.summary()
    assert s["trials_done"] == 6 and s["status"] == "finished"
    assert s["best"]["value"] == ref.summary()["best"]["value"]
    interrupted = [r["number"] for r in recs if r.get("interrupted")]
    # "told": the trial finished in the study, so nothing was interrupted; its line is restored
    assert interrupted == ([] if moment == "told" else [at])
