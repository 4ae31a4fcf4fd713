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
