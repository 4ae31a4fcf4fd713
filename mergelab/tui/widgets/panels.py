"""Small dashboard panels: the run header, the running trial with its stage progress, the log pane
and the task bar that shows an export or push in progress."""
from __future__ import annotations

from typing import Any, NamedTuple

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, RichLog, Static

from search.labels import label_of

from ..state import RunState, fmt_duration, fmt_num

_STATUS_STYLE = {"running": "bold green", "starting": "bold green", "paused": "bold yellow",
                 "stopped": "bold yellow", "new": "bold", "finished": "bold cyan", "failed": "bold red"}


class RunHeader(Static):
    """Run name, optimizer, device, trials done / budget, elapsed, ETA, best score and its trial."""

    _last: tuple[RunState, float] | None = None

    def on_resize(self) -> None:
        if self._last is not None:
            self.show(*self._last)  # the layout depends on the width

    def show(self, state: RunState, now: float) -> None:
        self._last = (state, now)
        s = state.summary
        status = state.status()
        if state.paused():
            status = "paused"
        elif state.control == "pause" and status == "running":
            status = "pausing"
        elif state.control == "stop" and status == "running":
            status = "stopping"
        budget = s.get("budget") or {}
        done = int(s.get("trials_done") or 0)
        trials = f"{done}/{budget['trials']}" if budget.get("trials") else str(done)
        if budget.get("timeout"):
            trials += f" (limit {fmt_duration(float(budget['timeout']))})"
        best = s.get("best") or {}
        best_txt = f"{fmt_num(best.get('value'))} (trial {best.get('number')})" if best else "-"
        if state.multi:
            best_txt = f"{len(state.pareto())} on the Pareto front"
        eta = state.eta(now)
        workers = [w for w in state.workers if w.get("alive")]
        run = Text.assemble(("run ", "dim"), (state.name, "bold"))
        stat = Text.assemble(("status ", "dim"), (status, _STATUS_STYLE.get(status, "bold yellow")))
        opt = Text.assemble(("optimizer ", "dim"), str(s.get("optimizer") or "-"),
                            ("  device ", "dim"), str(s.get("device") or state.resolved.device or "-"))
        best_t = Text.assemble(("best ", "dim"), (best_txt, "bold"))
        trials_t = Text.assemble(("trials ", "dim"), trials, ("  failed ", "dim"), str(s.get("trials_failed") or 0))
        elapsed_t = Text.assemble(("elapsed ", "dim"), fmt_duration(state.elapsed(now)))
        eta_t = Text.assemble(("ETA ", "dim"), fmt_duration(eta) if eta is not None else
                              ("done" if status == "finished" else "-"))
        workers_t = Text.assemble(("workers ", "dim"), str(len(workers)), ("  ", ""),
                                  (state.detail(), "dim"))
        narrow = 0 < self.size.width < 100
        t = Table.grid(expand=True, padding=(0, 2))
        for _ in range(3 if narrow else 4):
            t.add_column(no_wrap=True, overflow="ellipsis")
        if narrow:  # an 80-column terminal: what matters most, in three columns
            t.add_row(run, stat, best_t)
            t.add_row(trials_t, Text.assemble(elapsed_t, "  ", eta_t), opt)
        else:
            t.add_row(run, stat, opt, best_t)
            t.add_row(trials_t, elapsed_t, eta_t, workers_t)
        self.update(t)


CACHING = "caching sources"  # the stage of the first trial after a start: reading every source model once


class StageProgress(NamedTuple):
    done: list[str]  # the stages before the running one
    position: float  # the bar's position, out of len(stages)


def stage_progress(stages: list[str], stage: str | None, frac: float | None) -> StageProgress:
    """How far a trial at `stage` is: the merge is one step, the scorers share the rest by `frac`
    (the loop's fraction of all eval batches)."""
    if stage is None or stage == CACHING or stage not in stages:
        return StageProgress([], 0.0)
    k = stages.index(stage)
    pos = float(k)  # stage k runs: k stages are done
    if k > 0 and frac is not None:  # within the eval: the batches' fraction, kept inside stage k
        pos = min(k + 1.0, max(float(k), 1.0 + frac * (len(stages) - 1)))
    return StageProgress(stages[:k], pos)


class CurrentTrial(Vertical):
    """The trial being evaluated: its number, parameters and progress across merge -> each scorer."""

    def compose(self) -> ComposeResult:
        yield Label("no trial running", id="current-title")
        yield ProgressBar(total=1, show_eta=False, id="current-progress")
        yield Static("", id="current-stages")
        yield Static("", id="current-params")

    def show(self, state: RunState) -> None:
        title = self.query_one("#current-title", Label)
        bar = self.query_one("#current-progress", ProgressBar)
        stages_w = self.query_one("#current-stages", Static)
        params_w = self.query_one("#current-params", Static)
        if not state.running:
            status = state.status()
            title.update("paused between trials" if state.paused() else
                         "starting the search…" if status == "starting" else "no trial running")
            bar.display = False
            stages_w.update("")
            params_w.update("")
            return
        cur = state.running[0]
        more = f"  (+{len(state.running) - 1} on other workers)" if len(state.running) > 1 else ""
        title.update(f"trial {cur['number']} on {cur.get('worker') or '?'}{more}")
        stages = list(state.stages)
        stage = cur.get("stage")
        if stage is not None and stage != CACHING and stage not in stages:
            stages.append(stage)  # a scorer the eval spec (read here) does not list
        prog = stage_progress(stages, stage, cur.get("frac"))
        done = prog.done
        if stage == CACHING:
            stage_text = Text.assemble(("▶ caching sources", "bold yellow"),
                                       (" (the first trial after a start reads every model once)", "dim"))
        elif stage is None:
            stage_text = Text("starting the trial" if cur.get("live") else "waiting for the trial's first stage",
                              style="dim")
        else:
            parts = []
            for st in stages:
                if st in done:
                    parts.append((f"✓ {st}", "green"))
                elif st == stage:
                    parts.append((f"▶ {st}", "bold yellow"))
                else:
                    parts.append((f"· {st}", "dim"))
                parts.append(("  ", ""))
            stage_text = Text.assemble(*parts[:-1])
        stage_text.no_wrap, stage_text.overflow = True, "ellipsis"
        bar.display = True
        bar.update(total=max(1, len(stages)), progress=prog.position)
        stages_w.update(stage_text)
        params = cur.get("params") or {}
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(style="dim", no_wrap=True, overflow="ellipsis", ratio=1)
        grid.add_column(no_wrap=True, justify="right")
        for k, v in list(params.items())[:24]:
            grid.add_row(label_of(k, state.labels, state.resolved), fmt_num(v))
        if len(params) > 24:
            grid.add_row("…", f"{len(params) - 24} more")
        params_w.update(grid if params else Text("parameters not yet known", style="dim"))


def log_text(line: str) -> Text:
    """A log line, with warnings and errors highlighted."""
    parts = line.split(" ", 3)
    level = parts[2] if len(parts) >= 3 else ""
    style = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}.get(level, "")
    if not style and ("Traceback" in line or "Error" in line.split(":", 1)[0]):
        style = "red"
    return Text(line, style=style)


class LogPane(RichLog):
    """The run's log.txt, followed; keeps the last lines only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, max_lines=2000, wrap=False, markup=False, highlight=False, **kwargs)
        self.warnings = 0
        self.errors = 0

    def add_lines(self, lines: list[str]) -> None:
        for line in lines:
            t = log_text(line)
            if " WARNING " in line:
                self.warnings += 1
            elif " ERROR " in line or " CRITICAL " in line:
                self.errors += 1
            self.write(t)


class TaskBar(Horizontal):
    """One long task (export, push) at a time: a label and a progress bar, hidden when idle."""

    def compose(self) -> ComposeResult:
        yield Label("", id="task-label")
        yield ProgressBar(total=None, show_eta=False, id="task-progress")

    def start(self, label: str, total: float | None = None) -> None:
        self.query_one("#task-label", Label).update(label)
        self.query_one("#task-progress", ProgressBar).update(total=total, progress=0)
        self.display = True

    def step(self, done: float, total: float | None = None, label: str | None = None) -> None:
        if label is not None:
            self.query_one("#task-label", Label).update(label)
        bar = self.query_one("#task-progress", ProgressBar)
        if total is not None:
            bar.update(total=total)
        bar.update(progress=done)

    def finish(self) -> None:
        self.display = False
