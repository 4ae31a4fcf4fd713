"""The mergelab Textual app: one App whose screens (runs browser, dashboard, new-search form, compare
view) live in mergelab.tui.screens and share app.tcss."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from textual.app import App
from textual.binding import Binding

from search.rundir import RunDir

from .screens.dashboard import DashboardScreen
from .state import Clock, LiveFeed


class MergelabApp(App):
    """Opens the dashboard of `run_dir` when given, else the runs browser over `runs_dirs` (other
    screens push themselves)."""

    CSS_PATH = "app.tcss"
    TITLE = "mergelab"
    BINDINGS = [Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]
    # screen classes app.tcss uses to fit an 80x24 terminal
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]

    def __init__(self, run_dir: RunDir | str | Path | None = None, *, controller: Any = None,
                 search_thread: threading.Thread | None = None, feed: LiveFeed | None = None,
                 clock: Clock = time.time, poll_interval: float = 0.5, page_size: int | None = None,
                 runs_dirs: list[str | Path] | None = None, new_runs_dir: str | Path | None = None,
                 browse_interval: float = 2.0) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.runs_dirs = [Path(d) for d in runs_dirs] if runs_dirs is not None else None
        self.new_runs_dir = new_runs_dir
        self.browse_interval = browse_interval
        self.dashboard_kw = dict(controller=controller, search_thread=search_thread, feed=feed, clock=clock,
                                 poll_interval=poll_interval, page_size=page_size)
        self.clock = clock

    def on_mount(self) -> None:
        if self.run_dir is not None:
            self.open_dashboard(self.run_dir, **self.dashboard_kw)
        elif self.runs_dirs is not None:
            from .screens.browser import RunsBrowserScreen

            self.push_screen(RunsBrowserScreen(self.runs_dirs, new_runs_dir=self.new_runs_dir, clock=self.clock,
                                               poll_interval=self.browse_interval))

    def open_dashboard(self, run_dir: RunDir | str | Path, **kw: Any) -> DashboardScreen:
        kw = {"clock": self.clock, "poll_interval": self.dashboard_kw["poll_interval"],
              "page_size": self.dashboard_kw["page_size"], **kw}
        screen = DashboardScreen(run_dir, **kw)
        self.push_screen(screen)
        return screen
