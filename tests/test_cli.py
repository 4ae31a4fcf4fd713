"""The command line's own conventions: -h, and no output from libraries mergelab does not own
(transformers' "Loading weights" bars, cma's note that matplotlib is missing)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.cli import main

FAMILY = Path(__file__).parents[1] / "mergelab" / "demo" / "family"


@pytest.mark.parametrize("args", [[], ["merge"], ["push"], ["eval"]])
def test_dash_h_is_help(args, capsys):
    assert main([*args, "--help"]) == 0
    long = capsys.readouterr().out
    assert main([*args, "-h"]) == 0
    assert capsys.readouterr().out == long and long.startswith("Usage: mergelab")


_LOAD = """
import sys
if sys.argv[1] == "quiet":
    from mergelab.cli import quiet_libraries
    quiet_libraries()
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[2])
import cma
"""


def test_library_bars_and_notes_are_silenced():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    runs = {mode: subprocess.run([sys.executable, "-c", _LOAD, mode, str(FAMILY / "base")], env=env,
                                 capture_output=True, text=True) for mode in ("loud", "quiet")}
    assert all(r.returncode == 0 for r in runs.values()), runs
    assert "Loading weights" in runs["loud"].stderr  # what a user saw before
    assert runs["quiet"].stderr.strip() == ""


def test_demo_replaces_an_export_a_failed_push_left(tmp_path, capsys, monkeypatch):
    """`u` in the dashboard exports runs/NAME/best/model before pushing; when the push fails that
    export stays, and the demo must still export its best and print its table."""
    import json

    import search.loop

    real = search.loop.run_search

    def search_then_failed_push(rd, **kw):
        result = real(rd, **kw)
        stale = rd.path / "best" / "model"
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"left by a push that failed")
        return result

    monkeypatch.setattr(search.loop, "run_search", search_then_failed_push)
    run = tmp_path / "runs" / "demo-u"
    assert main(["demo", "--headless", "--trials", "1", "--layer-groups", "1", "--val-limit", "2",
                 "--limit", "2", "--run", str(run), "--json", str(tmp_path / "d.json")]) == 0
    assert "searched merge" in capsys.readouterr().out
    best = run / "best" / "model"
    meta = json.loads((best / "mergelab_search.json").read_text())
    assert meta["best_trial"] == 0 and (best / "model.safetensors").stat().st_size > 1000
