"""A run directory under faults and in hostile hands: concurrent resumes, damaged or edited files,
secrets, paths that lead outside the run, a full disk, searches that cannot succeed."""
from __future__ import annotations

import json
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
