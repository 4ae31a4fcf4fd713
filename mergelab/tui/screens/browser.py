"""The runs browser: every run directory under the runs directories with its status, progress and best
score; opens dashboards, resumes, deletes, filters, marks runs to compare and starts new searches."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from search.rundir import RunDir, RunStatus, fmt_age

from ...errors import MergelabError
from ..state import Clock, fmt_num
from .dialogs import ChoiceDialog

STATUS_STYLE = {"running": "bold green", "starting": "bold green", "paused": "bold yellow", "stopped": "yellow",
                "new": "bold", "finished": "cyan", "failed": "bold red"}
# (key, label, width): fixed widths, so a refresh never makes the columns jump; 80 columns in all
COLUMNS = (("name", "name", 20), ("status", "status", 8), ("trials", "trials", 7), ("best", "best", 8),
           ("optimizer", "optim.", 6), ("started", "started", 8), ("activity", "active", 8))


def scan_runs(runs_dirs: list[Path]) -> list[RunStatus]:
    """Status of every run directory under each runs directory, newest first (file reads only)."""
    seen: set[Path] = set()
    out: list[RunStatus] = []
    for d in runs_dirs:
        for rd in RunDir.list(d):
            key = rd.path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                out.append(rd.status())
            except (OSError, ValueError):
                continue  # a run directory being deleted or half-written: it shows up next scan
    out.sort(key=lambda s: s.created or 0.0, reverse=True)
    return out


class RunsTable(DataTable):
    """The runs list; Enter opens the highlighted run (shown in the footer)."""

    BINDINGS = [Binding("enter", "select_cursor", "Open", show=False)]  # the info line says it


class RunsBrowserScreen(Screen):
    """The home screen of `mergelab tui`."""

    BINDINGS = [
        Binding("r", "resume", "Resume"),
        Binding("plus", "more_trials", "More trials", key_display="+"),
        Binding("d", "delete", "Delete"),
        Binding("slash", "filter", "Filter"),
        Binding("space", "mark", "Mark", show=False),  # the info line says it
        Binding("c", "compare", "Compare"),
        Binding("n", "new_search", "New"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, runs_dirs: list[str | Path], *, new_runs_dir: str | Path | None = None,
                 clock: Clock = time.time, poll_interval: float = 2.0) -> None:
        super().__init__()
        self.runs_dirs = [Path(d) for d in runs_dirs]
        self.new_runs_dir = Path(new_runs_dir) if new_runs_dir is not None else self.runs_dirs[0]
        self.clock = clock
        self.poll_interval = poll_interval
        self.runs: list[RunStatus] = []
        self.marked: set[str] = set()  # run paths marked with space (to compare)
        self.filter_text = ""
        self.scans = 0
        self._scanning = False
        self.processes: dict[str, subprocess.Popen] = {}  # searches this UI started, by run path

    def compose(self) -> ComposeResult:
        yield Static("", id="browser-title")
        yield Input(placeholder="filter runs by name (Enter: back to the list, Escape: clear)", id="browser-filter")
        table = RunsTable(id="runs", cursor_type="row", zebra_stripes=True)
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield Static("", id="browser-info")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#browser-filter").display = False
        self.query_one("#runs", DataTable).focus()
        self.sub_title = "runs"
        self.refresh_runs()
        self.set_interval(self.poll_interval, self.refresh_runs)

    # -- scanning (a worker thread; the UI only folds the result in)
    def refresh_runs(self) -> None:
        if self._scanning:
            return
        self._scanning = True
        self._scan_worker()

    @work(thread=True, group="scan")
    def _scan_worker(self) -> None:
        try:
            runs = scan_runs(self.runs_dirs)
        except Exception as e:  # a vanished directory must not kill the browser; the next scan retries
            self.app.call_from_thread(self._scan_failed, str(e))
            return
        self.app.call_from_thread(self.apply_runs, runs)

    def _scan_failed(self, why: str) -> None:
        self._scanning = False
        self.query_one("#browser-info", Static).update(Text(f"could not read the runs: {why}", style="red"))

    def scan_now(self) -> None:
        """Scan synchronously (tests and screenshots)."""
        self.apply_runs(scan_runs(self.runs_dirs))

    def apply_runs(self, runs: list[RunStatus]) -> None:
        self._scanning = False
        if not (self.is_attached and self.app.is_running):
            return  # the app is quitting while the scan ran
        self.scans += 1
        self.runs = runs
        paths = {str(r.path) for r in runs}
        self.marked &= paths
        self._check_processes()
        self._render_table()

    def visible(self) -> list[RunStatus]:
        f = self.filter_text.lower()
        return [r for r in self.runs if f in r.name.lower()] if f else list(self.runs)

    def status_word(self, s: RunStatus) -> str:
        """As the dashboard says it: starting (launched here, not yet running), new (never started)."""
        proc = self.processes.get(str(s.path))
        if s.status != "running" and proc is not None and proc.poll() is None:
            return "starting"
        if s.paused:
            return "paused"
        if s.status == "stopped" and s.detail == "created" and not s.trials_done:
            return "new"
        return s.status

    def _row(self, s: RunStatus) -> list[Text]:
        now = self.clock()
        status = self.status_word(s)
        mark = "● " if str(s.path) in self.marked else "  "
        trials = f"{s.trials_done}/{s.budget_trials}" if s.budget_trials else str(s.trials_done)
        return [Text(mark + s.name, style="bold" if mark.strip() else "", no_wrap=True, overflow="ellipsis"),
                Text(status, style=STATUS_STYLE.get(status, "")),
                Text(trials, justify="right"),
                Text(fmt_num(s.best_value), justify="right"),
                Text(s.optimizer or "-"),
                Text(fmt_age(s.created, now)),
                Text(fmt_age(s.last_activity, now))]

    def _render_table(self) -> None:
        table = self.query_one("#runs", DataTable)
        rows = self.visible()
        keys = [str(r.path) for r in rows]
        current = [rk.value for rk in table.rows]
        cursor_key = current[table.cursor_row] if current and 0 <= table.cursor_row < len(current) else None
        if current == keys:
            for s in rows:  # same rows: update the cells in place (the cursor stays put)
                for (col, _, _), cell in zip(COLUMNS, self._row(s)):
                    table.update_cell(str(s.path), col, cell)
        else:
            table.clear()
            for s in rows:
                table.add_row(*self._row(s), key=str(s.path))
            if cursor_key in keys:
                table.move_cursor(row=keys.index(cursor_key))
        self._show_info()

    def _show_info(self) -> None:
        n, shown = len(self.runs), len(self.visible())
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.status] = counts.get(r.status, 0) + 1
        title = Text.assemble(("mergelab runs ", "bold"), ("in " + ", ".join(f"{d}/" for d in self.runs_dirs), "dim"),
                              ("  " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())), "dim"))
        self.query_one("#browser-title", Static).update(title)
        if not n:
            info = "no runs yet: press n to set up a search (or run `mergelab search CONFIG.yml`)"
        else:
            info = f"{shown} of {n} runs" if self.filter_text else f"{n} runs · Enter: dashboard · space: mark to compare"
            if self.filter_text:
                info += f" matching '{self.filter_text}'"
            if self.marked:
                info += f" · {len(self.marked)} marked (c: compare)"
        self.query_one("#browser-info", Static).update(Text(info, style="dim"))

    def _check_processes(self) -> None:
        """Tell the user when a search this UI started exits with an error."""
        from ..launch import process_log_tail

        for path, proc in list(self.processes.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.processes[path]
            if code != 0:
                tail = process_log_tail(path) or f"exit code {code}"
                self.notify(f"the search of {Path(path).name} exited with an error:\n{tail}",
                            title="search failed", severity="error", timeout=20)

    # -- selection helpers
    def current(self) -> RunStatus | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        key = list(table.rows)[table.cursor_row].value
        return next((r for r in self.runs if str(r.path) == key), None)

    # -- keys
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        s = self.current()
        if s is None:
            self.notify("no run selected", severity="warning")
            return
        self.open_dashboard(s.path)

    def open_dashboard(self, path: Path) -> None:
        try:
            self.app.open_dashboard(RunDir.open(path), process=self.processes.get(str(path)))
        except MergelabError as e:
            self.notify(str(e), severity="error")

    def action_resume(self) -> None:
        s = self.current()
        if s is None:
            return
        from ..launch import resume_in_background

        try:
            proc = resume_in_background(RunDir.open(s.path))
        except MergelabError as e:
            self.notify(str(e), severity="warning", timeout=8)
            return
        self.processes[str(s.path)] = proc
        self._render_table()
        self.notify(f"resuming {s.name} in the background (pid {proc.pid}); it keeps running if you quit")
        self.open_dashboard(s.path)

    def action_more_trials(self) -> None:
        s = self.current()
        if s is None:
            return
        if s.status == "running":
            self.notify(f"{s.name} is running; give it more trials once it has stopped or finished.",
                        severity="warning", timeout=8)
            return
        from .dialogs import InputDialog

        def done(text: str | None) -> None:
            if text is None:
                return
            try:
                n = int(text.strip())
            except ValueError:
                n = 0
            if n < 1:
                self.notify(f"More trials: '{text.strip()}' is not a whole number of 1 or more; nothing started.",
                            severity="warning", timeout=8)
                return
            self.give_more_trials(s, n)

        self.app.push_screen(InputDialog(
            f"More trials for {s.name}",
            f"It has done {s.trials_done} trials ({s.status}). How many more? The search continues in the "
            "background (`mergelab resume RUN --trials N`).", "10"), done)

    def give_more_trials(self, s: RunStatus, n: int) -> None:
        from ..launch import more_trials_in_background

        try:
            proc = more_trials_in_background(RunDir.open(s.path), n)
        except MergelabError as e:
            self.notify(str(e), severity="warning", timeout=8)
            return
        self.processes[str(s.path)] = proc
        self._render_table()  # "starting" at once, not at the next scan
        self.notify(f"{s.name}: {n} more trials in the background (pid {proc.pid})")
        self.open_dashboard(s.path)

    def action_delete(self) -> None:
        s = self.current()
        if s is None:
            return
        if s.status == "running":
            self.notify(f"{s.name} is running; stop it from its dashboard (Enter, then s) before deleting it.",
                        severity="warning", timeout=8)
            return

        def done(choice: str | None) -> None:
            if choice == "delete":
                self._delete(s)

        self.app.push_screen(ChoiceDialog(
            f"Delete run {s.name}?",
            f"This removes {s.path} with its {s.trials_done} trials, study and best recipe. It cannot be undone.",
            [("cancel", "Keep it"), ("delete", f"Delete {s.name}")]), done)

    def _delete(self, s: RunStatus) -> None:
        if RunDir(s.path).live_workers():  # it started between the question and the answer
            self.notify(f"{s.name} started running; not deleted.", severity="warning")
            return
        from ..launch import legacy_side_files

        side = legacy_side_files(s.path)
        shutil.rmtree(s.path, ignore_errors=True)
        for f in side:
            f.unlink(missing_ok=True)
        self.marked.discard(str(s.path))
        self.notify(f"deleted {s.name}")
        self.scan_now()

    def action_filter(self) -> None:
        box = self.query_one("#browser-filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "browser-filter":
            self.filter_text = event.value.strip()
            self._render_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "browser-filter":
            event.stop()
            if not event.value.strip():
                event.input.display = False
            self.query_one("#runs", DataTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#browser-filter", Input)
        box.value = ""
        box.display = False
        self.filter_text = ""
        self._render_table()
        self.query_one("#runs", DataTable).focus()

    def action_mark(self) -> None:
        s = self.current()
        if s is None:
            return
        key = str(s.path)
        if key in self.marked:
            self.marked.discard(key)
        else:
            self.marked.add(key)
        self._render_table()

    def action_compare(self) -> None:
        picked = [r for r in self.runs if str(r.path) in self.marked]
        if len(picked) < 2:
            self.notify("mark two or more runs with space, then press c to compare them", severity="warning")
            return
        empty = [r.name for r in picked if r.best_value is None]
        if empty:
            self.notify(f"no completed trial yet in {', '.join(empty)}: nothing to compare", severity="warning")
            return
        from .compare import CompareScreen

        self.app.push_screen(CompareScreen([r.path for r in picked], clock=self.clock))

    def action_new_search(self) -> None:
        from .new_search import NewSearchScreen

        self.app.push_screen(NewSearchScreen(self.new_runs_dir, clock=self.clock, browser=self))

    def search_started(self, path: Path, proc: subprocess.Popen) -> None:
        """Called by the new-search form once its run directory exists and its process runs."""
        self.processes[str(path)] = proc
        self.scan_now()
        self.open_dashboard(path)

    def action_quit(self) -> None:
        self.app.exit()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # while typing a filter, letters are text, not commands
        if action in ("resume", "more_trials", "delete", "mark", "compare", "new_search", "quit", "filter", "open"):
            focused = self.app.focused
            if isinstance(focused, Input):
                return False
        return True
