"""The mergelab Textual app: one App whose screens (dashboard, and later runs browser, new-search
form, compare view) live in mergelab.tui.screens and share app.tcss."""
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
    """Opens the dashboard of `run_dir` when given (other screens push themselves)."""

    CSS_PATH = "app.tcss"
    TITLE = "mergelab"
    BINDINGS = [Binding("ctrl+c", "quit", "Quit", show=False, priority=True)]
    # screen classes app.tcss uses to fit an 80x24 terminal
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (32, "-tall")]

    def __init__(self, run_dir: RunDir | str | Path | None = None, *, controller: Any = None,
                 search_thread: threading.Thread | None = None, feed: LiveFeed | None = None,
                 clock: Clock = time.time, poll_interval: float = 0.5, page_size: int | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.dashboard_kw = dict(controller=controller, search_thread=search_thread, feed=feed, clock=clock,
                                 poll_interval=poll_interval, page_size=page_size)
        self.clock = clock

    def on_mount(self) -> None:
        if self.run_dir is not None:
            self.open_dashboard(self.run_dir, **self.dashboard_kw)

    def open_dashboard(self, run_dir: RunDir | str | Path, **kw: Any) -> DashboardScreen:
        screen = DashboardScreen(run_dir, **{"clock": self.clock, **kw})
        self.push_screen(screen)
        return screen
