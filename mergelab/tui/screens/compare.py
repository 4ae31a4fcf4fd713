"""The compare view: two or more runs side by side, their best scores per metric in one table and their
best recipes as heat maps (the dashboard's HeatMap), read from the run directories."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalScroll, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

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
    resolved = rd.resolved()
    trials = f"{st.trials_done}/{st.budget_trials}" if st.budget_trials else str(st.trials_done)
    return RunBest(name=st.name, path=rd.path, status=st.status, optimizer=st.optimizer or "-", trials=trials,
                   best_number=best.get("number"), value=best.get("value"),
                   scores=dict(best.get("scores") or {}), metrics=dict(best.get("metrics") or {}),
                   method=(recipe or {}).get("merge_method", "-"),
                   grids=recipe_heatmaps(recipe, resolved), globals=global_values(recipe, resolved))


def comparison_rows(runs: list[RunBest]) -> list[tuple[str, list[Any], bool]]:
    """(label, one value per run, whether higher is better and the best should stand out)."""
    rows: list[tuple[str, list[Any], bool]] = [
        ("status", [r.status for r in runs], False),
        ("optimizer", [r.optimizer for r in runs], False),
        ("trials", [r.trials for r in runs], False),
        ("best trial", [r.best_number for r in runs], False),
        ("method", [r.method for r in runs], False),
        ("score (combined)", [r.value for r in runs], True),
    ]
    scorers: list[str] = []
    metrics: list[str] = []
    for r in runs:
        scorers += [k for k in r.scores if k not in scorers]
        metrics += [k for k in r.metrics if k not in metrics]
    rows += [(f"score {k}", [r.scores.get(k) for r in runs], True) for k in scorers]
    rows += [(k, [r.metrics.get(k) for r in runs], False) for k in metrics]
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
        for label, values, higher in comparison_rows(runs):
            nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v)]
            top = max(nums) if higher and len(nums) > 1 else None
            table.add_row(Text(label, style="dim"), *[_cell(v, top is not None and v == top) for v in values],
                          key=label)
        for i, r in enumerate(runs):
            hm = self.query_one(f"#compare-map-{i}", HeatMap)
            hm.show(r.grids, r.globals, f"trial {r.best_number} · score {fmt_num(r.value)}")
            hm.parent.border_title = r.name
        self.loaded = True

    def action_back(self) -> None:
        self.app.pop_screen()

    # for tests: the table's value for a row and run
    def value(self, label: str, run: int) -> str:
        table = self.query_one("#compare-table", DataTable)
        return table.get_cell(label, f"run{run}").plain

