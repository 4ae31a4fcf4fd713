"""The compare view: two or more runs side by side: their best scores per metric in one table, their
best-so-far curves on one plot and their best recipes as heat maps (the dashboard's HeatMap), read
from the run directories."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalScroll, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual_plotext import PlotextPlot

from search.rundir import RunDir

from ..state import Clock, HeatGrid, fmt_num, global_values, recipe_heatmaps
from ..widgets.heatmap import HeatMap


@dataclass
class RunBest:
    """What the compare view shows of one run."""

    name: str
    path: Path
    status: str
    optimizer: str
    trials: str
    best_number: int | None
    value: float | None
    scores: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    method: str = "-"
    grids: list[HeatGrid] = field(default_factory=list)
    globals: dict[str, Any] = field(default_factory=dict)
    history: list[float | None] = field(default_factory=list)  # best so far after each trial


def read_best(path: str | Path) -> RunBest:
    """A run's best trial: scores, metrics and recipe heat maps (file reads only)."""
    rd = RunDir.open(path)
    st = rd.status()
    best = rd.summary().get("best") or {}
    recipe = None
    trial = rd.path / "best" / "trial.json"
    if trial.is_file():
        recipe = json.loads(trial.read_text(encoding="utf-8")).get("recipe")
    text = rd.best_recipe_text() if recipe is None else None
    if text:
        recipe = yaml.safe_load(text)
    resolved = rd.resolved_run()
    trials = f"{st.trials_done}/{st.budget_trials}" if st.budget_trials else str(st.trials_done)
    return RunBest(name=st.name, path=rd.path, status=st.status, optimizer=st.optimizer or "-", trials=trials,
                   best_number=best.get("number"), value=best.get("value"),
                   scores=dict(best.get("scores") or {}), metrics=dict(best.get("metrics") or {}),
                   method=(recipe or {}).get("merge_method", "-"),
                   grids=recipe_heatmaps(recipe, resolved), globals=global_values(recipe, resolved),
                   history=rd.history())


class CompareRow(NamedTuple):
    """One row of the compare table: a value per run, and per run the number that ranks it (higher
    is better; the best stands out) or None for a row nothing ranks."""

    label: str
    values: list[Any]
    rank: list[Any] | None = None


def comparison_rows(runs: list[RunBest]) -> list[CompareRow]:
    """The table's rows, each quantity once: a scorer with one metric is that metric's row (ranked by
    the scorer's score, so "lower distance is better" stands out right); a scorer with several
    metrics gets its score row and then its metrics."""
    rows = [
        CompareRow("status", [r.status for r in runs]),
        CompareRow("optimizer", [r.optimizer for r in runs]),
        CompareRow("trials", [r.trials for r in runs]),
        CompareRow("best trial", [r.best_number for r in runs]),
        CompareRow("method", [r.method for r in runs]),
        CompareRow("score (combined)", [r.value for r in runs], [r.value for r in runs]),
    ]
    scorers: list[str] = []
    metrics: list[str] = []
    for r in runs:
        scorers += [k for k in r.scores if k not in scorers]
        metrics += [k for k in r.metrics if k not in metrics]
    shown: set[str] = set()
    for k in scorers:
        scores = [r.scores.get(k) for r in runs]
        own = [m for m in metrics if m.split("/", 1)[0] == k]
        if len(own) == 1:
            rows.append(CompareRow(own[0], [r.metrics.get(own[0]) for r in runs], scores))
        else:
            rows.append(CompareRow(f"score {k}", scores, scores))
            rows += [CompareRow(m, [r.metrics.get(m) for r in runs]) for m in own]
        shown.update(own)
    rows += [CompareRow(m, [r.metrics.get(m) for r in runs]) for m in metrics if m not in shown]
    return rows


def _cell(v: Any, top: bool) -> Text:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return Text(fmt_num(v) if isinstance(v, float) else str(v), justify="right",
                    style="bold green" if top else "")
    return Text("-" if v is None else str(v), justify="right")


class CompareScreen(Screen):
    """Runs side by side; Escape goes back to the browser."""

    BINDINGS = [Binding("escape", "back", "Back"), Binding("q", "back", "Back", show=False)]

    def __init__(self, paths: list[str | Path], *, clock: Clock = time.time) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.clock = clock
        self.runs: list[RunBest] = []
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Static(Text(f"comparing {len(self.paths)} runs", style="bold"), id="compare-title")
        yield DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        yield PlotextPlot(id="compare-plot")
        with HorizontalScroll(id="compare-maps"):
            for i, _ in enumerate(self.paths):
                with Vertical(classes="compare-run", id=f"compare-run-{i}"):
                    yield HeatMap(id=f"compare-map-{i}")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.sub_title = "compare"
        self.query_one("#compare-table").focus()
        self._load()

    @work(thread=True, group="compare")
    def _load(self) -> None:
        try:
            runs = [read_best(p) for p in self.paths]
        except Exception as e:  # a run deleted meanwhile: say so instead of crashing
            self.app.call_from_thread(self.notify, f"cannot compare: {e}", severity="error")
            return
        self.app.call_from_thread(self.show_runs, runs)

    def show_runs(self, runs: list[RunBest]) -> None:
        if not (self.is_attached and self.app.is_running):
            return  # closed (Escape, quit) while the runs were read
        self.runs = runs
        table = self.query_one("#compare-table", DataTable)
        table.clear(columns=True)
        table.add_column("", key="label")
        for i, r in enumerate(runs):
            table.add_column(r.name, key=f"run{i}")
        for row in comparison_rows(runs):
            rank = row.rank or []
            nums = [v for v in rank if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
            top = max(nums) if len(nums) > 1 else None
            table.add_row(Text(row.label, style="dim"),
                          *[_cell(v, top is not None and i < len(rank) and rank[i] == top) for i, v in enumerate(row.values)],
                          key=row.label)
        self._plot(runs)
        for i, r in enumerate(runs):
            hm = self.query_one(f"#compare-map-{i}", HeatMap)
            hm.show(r.grids, r.globals, f"trial {r.best_number} · score {fmt_num(r.value)}")
            hm.parent.border_title = r.name
        self.loaded = True

    COLORS = ("cyan", "orange", "green", "magenta", "red", "blue")

    def _plot(self, runs: list[RunBest]) -> None:
        """Each run's best-so-far score by trial, as step lines on one plot."""
        from ..widgets.score_plot import step_line, trial_ticks

        widget = self.query_one("#compare-plot", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        self.curves: list[tuple[list[int], list[float]]] = []
        legend = []
        last = 0
        for i, r in enumerate(runs):
            xs = [n for n, v in enumerate(r.history) if v is not None]
            ys = [float(r.history[n]) for n in xs]
            self.curves.append((xs, ys))
            if xs:
                color = self.COLORS[i % len(self.COLORS)]
                plt.plot(*step_line(xs, ys), marker="braille", color=color)
                last = max(last, xs[-1])
                legend.append(f"{r.name}: {color}")
        ticks = trial_ticks(0, last, 6)
        plt.xticks(ticks, [str(t) for t in ticks])
        widget.border_title = "best so far by trial"
        widget.border_subtitle = "  ".join(legend)
        widget.refresh()

    def action_back(self) -> None:
        self.app.pop_screen()

    # for tests: the table's value for a row and run
    def value(self, label: str, run: int) -> str:
        table = self.query_one("#compare-table", DataTable)
        return table.get_cell(label, f"run{run}").plain

