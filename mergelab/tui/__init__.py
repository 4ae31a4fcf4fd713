"""mergelab's terminal UI (Textual): runs browser, live dashboard, new-search form, compare view;
every screen reads only run directories.

`run_browser` opens the runs browser (`mergelab tui`); `run_dashboard` opens one run's dashboard;
`search_with_dashboard` runs a search in a thread under it (what `mergelab search` does on a terminal).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_browser", "run_dashboard", "search_with_dashboard"]


def run_browser(runs_dirs: list[str | Path], new_runs_dir: str | Path | None = None) -> None:
    """Open the runs browser over runs_dirs until the user quits (blocks); new searches go to
    new_runs_dir (default: the first of runs_dirs)."""
    from .app import MergelabApp

    MergelabApp(runs_dirs=list(runs_dirs), new_runs_dir=new_runs_dir).run()


def run_dashboard(run_dir: str | Path, controller: Any = None, *, search_thread: Any = None,
                  feed: Any = None) -> None:
    """Open the dashboard on a run directory until the user quits (blocks)."""
    from search.rundir import RunDir

    from .app import MergelabApp

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    MergelabApp(rd, controller=controller, search_thread=search_thread, feed=feed).run()


def search_with_dashboard(run_dir: str | Path, objective: Any = None, *, worker: bool = False,
                          storage: str | None = None, device: str | None = None,
                          max_trials_this_session: int | None = None):
    """Run (or resume) a search in a background thread with the dashboard in front; returns the
    search's SearchResult once both have ended (quitting the UI stops the search after its trial).

    The arguments are search.loop.run_search's, as `mergelab search` / `resume` give them:
    `worker` joins a shared-storage run, `storage` is the run's storage URL with its password
    (else $MERGELAB_STORAGE), `device` this process's device instead of the run's."""
    from search.loop import start_search_thread
    from search.rundir import RunDir

    from .state import LiveFeed

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    feed = LiveFeed()
    thread, controller = start_search_thread(rd, objective, progress=feed, worker=worker, storage=storage,
                                             device=device, max_trials_this_session=max_trials_this_session)
    run_dashboard(rd, controller, search_thread=thread, feed=feed)
    if thread.is_alive():
        controller.stop()
        print(f"waiting for the running trial of {rd.name} to finish before stopping...", flush=True)
        thread.join()
    if thread.error is not None:
        raise thread.error
    return thread.result
