"""`mergelab watch RUN_DIR` and `mergelab tui`: the terminal UI on run directories.

Both only read the run directory (pause / stop go through its control file), so they attach to any
run, live or finished, started here or by another process or machine sharing the directory.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import MergelabError


@click.command("watch")
@click.argument("run_dir", type=click.Path(path_type=Path))
def watch(run_dir: Path) -> None:
    """Open the live dashboard of RUN_DIR (runs/NAME) and keep following it.

    Keys: p pause/resume, s stop, e export a trial, u push the best to the Hub, q quit
    (leaving a search that runs in its own process running, or stopping it).
    """
    from search.rundir import RunDir

    from ..tui import run_dashboard

    run_dashboard(RunDir.open(run_dir))


@click.command("tui")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Directory holding the run directories.")
def tui(runs_dir: Path) -> None:
    """Open the terminal UI on the most recent run under --runs-dir."""
    from search.rundir import RunDir

    from ..tui import run_dashboard

    runs = RunDir.list(runs_dir)
    if not runs:
        raise MergelabError(
            f"No run directories under {runs_dir.resolve()}: start a search with `mergelab search "
            "CONFIG.yml`, try `mergelab demo`, or point --runs-dir at the directory holding your runs."
        )
    run_dashboard(runs[0])
