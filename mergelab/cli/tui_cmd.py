"""`mergelab watch RUN_DIR` and `mergelab tui`: the terminal UI on one run directory, or the runs browser.

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
@click.option("--runs-dir", "runs_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Another directory holding run directories (repeatable); runs/ is always listed, and "
                   "new searches go to the first --runs-dir given.")
def tui(runs_dirs: tuple[Path, ...]) -> None:
    """Open the runs browser: every run under runs/ (and --runs-dir) with its status and best score.

    Keys: Enter dashboard, r resume, d delete, / filter, space mark, c compare marked runs,
    n new search, q quit.
    """
    from ..tui import run_browser

    for d in runs_dirs:
        if not d.is_dir():
            raise MergelabError(
                f"No run directories under {d.resolve()}: the directory does not exist. Check the "
                "--runs-dir path, or leave it out to browse runs/ (press n there to start a search)."
            )
    dirs: list[Path] = []
    for d in (Path("runs"), *runs_dirs):
        if all(d.resolve() != e.resolve() for e in dirs):
            dirs.append(d)
    run_browser(dirs, new_runs_dir=runs_dirs[0] if runs_dirs else Path("runs"))
