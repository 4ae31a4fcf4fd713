"""The live dashboard of one run: header, score plot, running trial, trials table, best-recipe heat
map, selected trial's recipe and the log; it polls the run directory and never blocks the UI."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from search.labels import label_of, short_model_names
from search.rundir import RunDir

from ...errors import MergelabError
from ..state import (Clock, Delta, LiveFeed, RunReader, RunState, fmt_num, global_values, log_stamp,
                     recipe_heatmaps)
from ..widgets.heatmap import HeatMap
from ..widgets.panels import CurrentTrial, LogPane, RunHeader, TaskBar
from ..widgets.score_plot import ScorePlot
from ..widgets.trials_table import FUSION_MARK, TrialsTable
from .dialogs import ChoiceDialog, InputDialog


def hub_available() -> bool:
    """`u` is offered only when the push feature is installed (mergelab.hub)."""
    try:
        import mergelab.hub  # noqa: F401
    except ImportError:
        return False
    return True


def fusion_text(fusion: dict) -> str:
    """One line saying that a hybrid trial's merge was scored fused with other models."""
    names = ", ".join("the merge" if m == "merge" else Path(m).name or m for m in fusion.get("members") or [])
    return (f"{FUSION_MARK}: {fusion.get('weighting')} weights, tau {fmt_num(fusion.get('tau'))}, over "
            f"{names} (inference time: export writes the merge + fusion_recipe.yaml)")


def kernels_text(kernels: Any) -> str:
    """A trial record's `kernels` (which kernel ran each operator), in one line."""
    if isinstance(kernels, dict):
        return ", ".join(f"{k}: {v}" for k, v in kernels.items())
    if isinstance(kernels, (list, tuple)):
        return ", ".join(map(str, kernels))
    return str(kernels)


def path_text(path: Any) -> str:
    """A data-flow trial's layer path ([[model, layer], ...]) as `model:layer → model:layer`."""
    steps = [p for p in path if isinstance(p, (list, tuple)) and len(p) == 2] if isinstance(path, list) else []
    if not steps:
        return str(path)
    refs = sorted({str(m) for m, _ in steps})
    names = dict(zip(refs, short_model_names(refs)))
    return " → ".join(f"{names[str(m)]}:{l}" for m, l in steps)


def recipe_text(rec: dict, labels: dict[str, str] | None = None) -> Text:
    """A trial's full record for the recipe pane: number, state, score, device, path, metrics,
    the searched values under their labels, recipe YAML."""
    head = [f"trial {rec.get('number')}  {rec.get('state')}  score {fmt_num(rec.get('value'))}"]
    if rec.get("device"):
        head.append(f"device {rec['device']}" + (f"  kernels {kernels_text(rec.get('kernels'))}" if rec.get("kernels") else ""))
    if rec.get("path"):
        head.append(f"path {path_text(rec['path'])}")
    if rec.get("values"):
        head.append("objectives " + ", ".join(fmt_num(v) for v in rec["values"]))
    if rec.get("error"):
        head.append(f"error: {rec['error']}")
    for k, v in (rec.get("metrics") or {}).items():
        head.append(f"  {k}: {fmt_num(v)}")
    fusion = rec.get("fusion")
    if fusion:
        head.append(fusion_text(fusion))
    params = rec.get("params") or {}
    if params and labels is not None:
        head.append("searched values:")
        head += [f"  {label_of(k, labels)}: {fmt_num(v)}" for k, v in params.items()]
    body = yaml.safe_dump(rec.get("recipe"), sort_keys=False, default_flow_style=None, width=100) \
        if rec.get("recipe") else "(no recipe: the trial was interrupted)\n"
    t = Text("\n".join(head) + "\n\n", style="bold")
    t.append(body, style="")
    return t


class DashboardScreen(Screen):
    """One run's live view. `controller` (search.loop.SearchController) steers a search running in
    this process; without it pause/stop go through the run directory's control file."""

    # short descriptions, the panel toggles first: an 80-column footer must show m and l
    BINDINGS = [
        Binding("q", "quit_dashboard", "Quit"),
        Binding("p", "pause", "Pause"),
        Binding("s", "stop", "Stop"),
        Binding("m", "toggle_map", "Table/map"),
        Binding("l", "toggle_log", "Log"),
        Binding("e", "export", "Export"),
        Binding("u", "push", "Push"),
        Binding("o", "sort", "Sort"),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False),
        Binding("right_square_bracket", "page(1)", "Next page", show=False),
        Binding("v", "plot_mode", "Plot view", show=False),
    ]

    def __init__(self, run_dir: RunDir | str | Path, *, controller: Any = None,
                 search_thread: threading.Thread | None = None, feed: LiveFeed | None = None,
                 clock: Clock = time.time, poll_interval: float = 0.5, page_size: int | None = None,
                 process: Any = None) -> None:
        super().__init__()
        self.rd = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
        self.controller = controller
        self.search_thread = search_thread
        self.process = process  # a search process this UI launched on the run (subprocess.Popen)
        self.clock = clock
        self.poll_interval = poll_interval
        self.state = RunState(self.rd)
        self.state.launching = self._launching
        self.reader = RunReader(self.rd, feed)
        self.selected: int | None = None  # the trial picked in the table (None: the best)
        self.loaded = False
        self.polls = 0
        self._polling = False
        self._page_size = page_size
        self._busy = False  # an export / push is running
        self._shown_best: int | None = -1

    # -- layout
    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        with Horizontal(id="top-row"):
            yield ScorePlot(id="score-plot")
            yield CurrentTrial(id="current-trial")
        with Horizontal(id="mid-row"):
            with Vertical(id="table-box"):
                kw = {"page_size": self._page_size} if self._page_size else {}
                yield TrialsTable(id="trials", **kw)
            with TabbedContent(id="side-tabs", initial="tab-heatmap"):
                with TabPane("Best recipe", id="tab-heatmap"):
                    with VerticalScroll():
                        yield HeatMap(id="heatmap")
                with TabPane("Trial recipe", id="tab-recipe"):
                    with VerticalScroll():
                        yield Static("select a trial in the table (Enter) to see its recipe", id="recipe")
        yield LogPane(id="log")
        yield TaskBar(id="taskbar")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(TaskBar).display = False
        self.query_one("#score-plot", ScorePlot).border_title = "score"
        self.query_one("#current-trial").border_title = "current trial"
        self.query_one("#table-box").border_title = "trials"
        self.query_one("#log", LogPane).border_title = "log"
        self.query_one(TrialsTable).focus()
        self.sub_title = str(self.rd.path)
        self._first_load()
        self.set_interval(self.poll_interval, self.poll)
        self.set_interval(1.0, self._tick)

    def _launching(self) -> bool:
        """A search launched from here (thread, process) that has not yet taken the run over."""
        if self.search_thread is not None and self.search_thread.is_alive():
            return True
        return self.process is not None and self.process.poll() is None

    def log_line(self, level: str, message: str) -> None:
        """One of the dashboard's own lines in the log pane, stamped like the run's log.txt."""
        self.query_one(LogPane).add_lines([f"{log_stamp(self.clock())} {level} dashboard: {message}"])

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "push" and not hub_available():
            return False  # the push feature is not installed: no key at all, not a dead one
        return True

    # -- polling
    @work(thread=True, group="poll")
    def _first_load(self) -> None:
        delta = self.reader.read()
        self.app.call_from_thread(self._apply, delta)

    def poll(self) -> None:
        """Start one background read of the run directory unless one is in flight."""
        if not self.loaded or self._polling:
            return
        self._polling = True
        self._poll_worker()

    @work(thread=True, group="poll")
    def _poll_worker(self) -> None:
        try:
            delta = self.reader.read()
        except Exception as e:  # a file caught mid-rename must not kill the viewer; next poll retries
            delta = Delta(log_lines=[f"{log_stamp(self.clock())} WARNING dashboard: could not read the run "
                                     f"directory: {e}"])
        self.app.call_from_thread(self._apply, delta)

    def read_now(self) -> None:
        """Read and show the run directory synchronously (tests, and the first frame of a screenshot)."""
        self._apply(self.reader.read())

    def _apply(self, delta: Delta) -> None:
        self._polling = False
        if not (self.is_attached and self.app.is_running):
            return  # the dashboard was closed (or the app is quitting) while the read ran
        self.polls += 1
        if not delta.summary and not delta.new_trials and not delta.log_lines and self.loaded:
            # a failed read: keep what is shown
            return
        ch = self.state.apply(delta)
        first = not self.loaded
        self.loaded = True
        now = self.clock()
        if ch.summary or ch.trials or first:
            self.query_one(RunHeader).show(self.state, now)
        if first and self.state.multi:
            self.query_one(ScorePlot).mode = "pareto"  # what a multi-objective search is after
            self.query_one(ScorePlot).border_title = "objectives"
        if ch.trials or ch.best or first:
            self.query_one(ScorePlot).update_from(self.state)
            self.query_one(TrialsTable).show(self.state)
        best = (self.state.summary.get("best") or {}).get("number")
        if best != self._shown_best or first:
            self._show_best()
        if ch.running or ch.summary or first:
            self.query_one(CurrentTrial).show(self.state)
        if ch.log:
            self.query_one(LogPane).add_lines(ch.log)

    def _tick(self) -> None:
        if self.loaded and (self.state.is_live() or self.state.status() == "starting"):
            self.query_one(RunHeader).show(self.state, self.clock())

    def _show_best(self) -> None:
        best = self.state.best
        self._shown_best = (self.state.summary.get("best") or {}).get("number")
        hm = self.query_one(HeatMap)
        if best is None:
            hm.show([], {}, "no completed trial yet")
            return
        recipe = best.get("recipe")
        if recipe is None:
            text = self.rd.best_recipe_text()
            recipe = yaml.safe_load(text) if text else None
        method = (recipe or {}).get("merge_method", "-")
        if best.get("fusion"):
            method += f" {FUSION_MARK} ({best['fusion'].get('weighting')})"
        caption = f"trial {best.get('number')}  score {fmt_num(best.get('value'))}  method {method}"
        if best.get("path"):  # a data-flow trial: the layers it runs, in order
            caption += f"\npath {path_text(best['path'])}"
        hm.show(recipe_heatmaps(recipe, self.state.resolved), global_values(recipe, self.state.resolved), caption)

    # -- table events
    def on_trials_table_page_changed(self, event: TrialsTable.PageChanged) -> None:
        t = event.table
        n = len(self.state.by_number)
        order = "↓" if t.sort_reverse else "↑"
        pages = f"page {t.page + 1}/{t.pages} ([ ])" if t.pages > 1 else "page 1/1"
        # in the box's bottom border: every row of an 80x24 terminal goes to trials
        self.query_one("#table-box").border_subtitle = (
            f"{n} trials · {pages} · sorted by {t._label(t.sort_key)} {order} · Enter: recipe")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        self.show_trial(int(event.row_key.value))

    def show_trial(self, number: int) -> None:
        rec = self.state.by_number.get(number)
        if rec is None:
            return
        self.selected = number
        self.query_one("#recipe", Static).update(recipe_text(rec, self.state.labels))
        self.query_one("#side-tabs", TabbedContent).active = "tab-recipe"
        if self.has_class("-narrow"):
            self.add_class("map-toggled")  # one panel at a time on a narrow terminal: show the recipe

    # -- keys
    def action_page(self, step: int) -> None:
        t = self.query_one(TrialsTable)
        t.set_page(t.page + step)

    def action_sort(self) -> None:
        t = self.query_one(TrialsTable)
        cols = t.column_names(self.state)
        t.set_sort(cols[(cols.index(t.sort_key) + 1) % len(cols)] if t.sort_key in cols else "number")

    def action_toggle_map(self) -> None:
        """Narrow terminals show the trials table or the recipe tabs; wide ones hide the tabs."""
        self.toggle_class("map-toggled")

    def action_toggle_log(self) -> None:
        """Short terminals hide the log by default, tall ones show it; l flips that."""
        self.toggle_class("log-toggled")

    def action_plot_mode(self) -> None:
        if not self.state.multi:
            self.notify("v switches to the Pareto front of a multi-objective search; this run has one "
                        "objective, so the plot stays score by trial.", severity="information")
            return
        plot = self.query_one(ScorePlot)
        plot.mode = "pareto" if plot.mode == "history" and self.state.multi else "history"
        plot.border_title = "score" if plot.mode == "history" else "objectives"
        plot.update_from(self.state)

    def _request(self, command: str) -> None:
        if self.controller is not None:
            getattr(self.controller, command)()
        else:
            self.rd.request(command)

    def action_pause(self) -> None:
        if self.state.status() != "running":
            self.notify(f"The search is {self.state.status()}; there is nothing to pause.", severity="warning")
            return
        resume = self.state.paused() or self.state.control == "pause"
        self._request("resume" if resume else "pause")
        self.state.control = "resume" if resume else "pause"
        self.notify("resuming the search" if resume else "pausing after the current trial")
        self.query_one(RunHeader).show(self.state, self.clock())

    def action_stop(self) -> None:
        if self.state.status() != "running" and self.search_thread is None:
            self.notify(f"The search is {self.state.status()}; there is nothing to stop.", severity="warning")
            return
        self._request("stop")
        self.state.control = "stop"
        self.notify("stopping after the current trial")
        self.query_one(RunHeader).show(self.state, self.clock())

    def _target_record(self) -> dict | None:
        n = self.selected if self.selected is not None else (self.state.summary.get("best") or {}).get("number")
        return self.state.by_number.get(n) if n is not None else None

    def action_export(self) -> None:
        if self._busy:
            self.notify("an export or push is already running", severity="warning")
            return
        rec = self._target_record()
        if rec is None:
            self.notify("no trial to export yet", severity="warning")
            return
        default = str(self.rd.path / f"export-trial-{rec['number']}")
        which = "selected" if self.selected is not None else "best"

        def done(path: str | None) -> None:
            if path:
                self.start_export(rec, Path(path).expanduser())

        self.app.push_screen(InputDialog(f"Export trial {rec['number']} ({which})",
                                         "Directory to write the merged model to:", default), done)

    def start_export(self, rec: dict, out_dir: Path) -> None:
        self._busy = True
        self.query_one(TaskBar).start(f"exporting trial {rec['number']} to {out_dir}", total=None)
        self._export_worker(rec, out_dir)

    @work(thread=True, group="task")
    def _export_worker(self, rec: dict, out_dir: Path) -> None:
        from .. import actions

        bar = self.query_one(TaskBar)
        try:
            out = actions.export_trial(self.rd, rec, out_dir,
                                       on_tensor=lambda d, t: self.app.call_from_thread(bar.step, d, t))
        except MergelabError as e:
            self.app.call_from_thread(self._task_done, None, str(e))
            return
        except Exception as e:  # shown, not raised: the dashboard must survive a failed export
            self.app.call_from_thread(self._task_done, None, f"export failed: {type(e).__name__}: {e}")
            return
        self.app.call_from_thread(self._task_done, f"exported trial {rec['number']} to {out}", None)

    def _task_done(self, ok: str | None, err: str | None) -> None:
        self._busy = False
        self.query_one(TaskBar).finish()
        if ok:
            self.notify(ok, title="done", timeout=8)
            self.log_line("INFO", ok)
        if err:
            self.notify(err, title="failed", severity="error", timeout=15)
            self.log_line("ERROR", err)

    def action_push(self) -> None:
        if self._busy:
            self.notify("an export or push is already running", severity="warning")
            return
        if not (self.state.summary.get("best") or {}):
            self.notify("no completed trial yet: nothing to push", severity="warning")
            return

        def done(repo: str | None) -> None:
            if repo:
                self.start_push(repo)

        self.app.push_screen(InputDialog("Push the best model to the Hub", "Repository (OWNER/NAME):",
                                         placeholder="alice/my-merge"), done)

    def start_push(self, repo_id: str) -> None:
        self._busy = True
        self.query_one(TaskBar).start(f"exporting the best trial for {repo_id}", total=None)
        self._push_worker(repo_id)

    @work(thread=True, group="task")
    def _push_worker(self, repo_id: str) -> None:
        from .. import actions

        bar = self.query_one(TaskBar)

        def progress(stage: str, msg: str) -> None:
            self.app.call_from_thread(bar.step, 0, None, f"push {repo_id}: {msg}")

        try:
            result = actions.push_best(self.rd, repo_id, progress=progress,
                                       on_tensor=lambda d, t: self.app.call_from_thread(bar.step, d, t))
        except MergelabError as e:
            self.app.call_from_thread(self._task_done, None, str(e))
            return
        except Exception as e:  # shown, not raised
            self.app.call_from_thread(self._task_done, None, f"push failed: {type(e).__name__}: {e}")
            return
        self.app.call_from_thread(self._task_done, f"pushed to {result.commit_url or result.repo_id}", None)

    def action_quit_dashboard(self) -> None:
        thread_alive = self.search_thread is not None and self.search_thread.is_alive()
        if thread_alive:
            self.app.push_screen(ChoiceDialog(
                "Quit", "The search runs inside this program: quitting stops it after the current trial.",
                [("stop", "Stop the search and quit"), ("cancel", "Cancel")]), self._quit_choice)
            return
        if self.state.is_live():
            self.app.push_screen(ChoiceDialog(
                "Quit", f"{self.state.name} is still running in its own process.",
                [("leave", "Leave it running"), ("stop", "Stop it after the current trial"), ("cancel", "Cancel")]),
                self._quit_choice)
            return
        self._leave()

    def _quit_choice(self, choice: str | None) -> None:
        if choice == "stop":
            self._request("stop")
            self._leave()
        elif choice == "leave":
            self._leave()

    def _leave(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()  # opened from another screen (e.g. a runs browser)
        else:
            self.app.exit()
