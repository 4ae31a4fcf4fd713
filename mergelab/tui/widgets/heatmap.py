"""A heat map of a recipe's per-layer-group values (rows) for each model (columns), one grid per
searched parameter; used by the dashboard for the best recipe and reusable for comparing runs."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..state import HeatGrid, fmt_num

# low -> high: deep blue, teal, yellow, red (readable on dark and light themes with black/white text)
_STOPS = [(0.0, (49, 54, 149)), (0.33, (69, 170, 160)), (0.66, (240, 200, 60)), (1.0, (200, 40, 40))]


def heat_color(u: float) -> tuple[int, int, int]:
    """The colour of a value at fraction u (0..1) of its parameter's range."""
    u = min(1.0, max(0.0, u))
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if u <= b:
            t = (u - a) / (b - a) if b > a else 0.0
            return tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))  # type: ignore[return-value]
    return _STOPS[-1][1]


def _cell(v: float | None, g: HeatGrid) -> Text:
    if v is None:
        return Text("  -  ", justify="center")
    u = (v - g.low) / (g.high - g.low) if g.high > g.low else 0.5
    r, gr, b = heat_color(u)
    fg = "black" if (0.299 * r + 0.587 * gr + 0.114 * b) > 140 else "white"
    return Text(f"{v:.2f}", style=f"{fg} on rgb({r},{gr},{b})", justify="center")


def grid_table(g: HeatGrid) -> Table:
    t = Table(title=f"{g.param}  [{fmt_num(g.low, 3)} .. {fmt_num(g.high, 3)}]", title_justify="left",
              box=None, padding=(0, 1), show_edge=False, expand=False, title_style="bold")
    t.add_column("", style="dim", no_wrap=True)
    for c in g.cols:
        t.add_column(c, justify="center", no_wrap=True, max_width=12, overflow="ellipsis")
    for label, row in zip(g.rows, g.values):
        t.add_row(label, *[_cell(v, g) for v in row])
    return t


class HeatMap(Static):
    """Shows HeatGrids (and searched global values as a line under them)."""

    DEFAULT_CSS = """
    HeatMap { height: auto; }
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("", *args, **kwargs)
        self.grids: list[HeatGrid] = []
        self.globals: dict[str, Any] = {}
        self.caption = ""

    def show(self, grids: list[HeatGrid], globals_: dict[str, Any] | None = None, caption: str = "") -> None:
        self.grids, self.globals, self.caption = grids, dict(globals_ or {}), caption
        parts: list[Any] = []
        if caption:
            parts.append(Text(caption, style="bold"))
        if not grids and not self.globals:
            parts.append(Text("no recipe yet", style="dim"))
        for g in grids:
            parts.append(grid_table(g))
            parts.append(Text(""))
        if self.globals:
            parts.append(Text("  ".join(f"{k} = {fmt_num(v) if not isinstance(v, list) else '[per layer]'}"
                                        for k, v in self.globals.items())))
        self.update(Group(*parts))

    def cell_text(self, param: str, row: str, col: str) -> str:
        """The value a cell shows (as text), for tests and screen readers."""
        for g in self.grids:
            if g.param == param:
                v = g.values[g.rows.index(row)][g.cols.index(col)]
                return "-" if v is None else f"{v:.2f}"
        raise KeyError(param)
