"""The trials table: sortable by any column and paged, so a run of 10,000 trials puts at most one
page of rows in the DataTable at a time; rows are keyed by trial number."""
from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from ..state import RunState, fmt_num

PAGE_SIZE = 100
_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "bold red"}
FUSION_MARK = "⊕ fusion"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class TrialsTable(DataTable):
    """Shows one page of a RunState's trials in the chosen order."""

    class PageChanged(Message):
        def __init__(self, table: "TrialsTable") -> None:
            super().__init__()
            self.table = table

    def __init__(self, *args: Any, page_size: int = PAGE_SIZE, **kwargs: Any) -> None:
        super().__init__(*args, cursor_type="row", zebra_stripes=True, **kwargs)
        self.page_size = page_size
        self.page = 0
        self.sort_key = "number"
        self.sort_reverse = True  # newest first while a search runs
        self.rows_written = 0  # add_row calls so far (the 10,000-trial test bounds it)
        self._columns: list[str] = []
        self._state: RunState | None = None
        self._order: list[int] = []
        self._order_version = (-1, "", False)
        self.best_number: int | None = None
        self._newest_shown: int | None = None  # the newest trial at the last rebuild

    # -- columns
    def column_names(self, state: RunState) -> list[str]:
        cols = ["number", "state", "score"]
        if state.multi:
            cols += [f"obj:{n}" for n in state.objective_names]
        cols += [f"m:{m}" for m in state.metric_names]
        cols.append("time")
        if state.devices:  # trials record where they ran (cpu, cuda:0): one column when any does
            cols.append("device")
        return cols

    @staticmethod
    def _label(col: str) -> str:
        return {"number": "#", "state": "state", "score": "score", "time": "time s"}.get(col, col.split(":", 1)[-1])

    def _value(self, rec: dict, col: str) -> Any:
        if col == "number":
            return rec.get("number")
        if col == "state":
            return rec.get("state")
        if col == "score":
            return _num(rec.get("value"))
        if col == "time":
            return _num((rec.get("timings") or {}).get("total_s"))
        if col == "device":
            return str(rec["device"]) if rec.get("device") else None
        if col.startswith("obj:"):
            names = self._state.objective_names if self._state else []
            vals = rec.get("values") or []
            k = names.index(col[4:]) if col[4:] in names else -1
            return _num(vals[k]) if 0 <= k < len(vals) else None
        return _num((rec.get("metrics") or {}).get(col[2:]))

    # -- ordering and paging
    @property
    def pages(self) -> int:
        n = len(self._state.by_number) if self._state else 0
        return max(1, math.ceil(n / self.page_size))

    def ordered_numbers(self) -> list[int]:
        st = self._state
        if st is None:
            return []
        key = (st.version, self.sort_key, self.sort_reverse)
        if key != self._order_version:
            recs = list(st.by_number.values())
            if self.sort_key == "number":
                nums = sorted(st.by_number, reverse=self.sort_reverse)
            else:
                col = self.sort_key
                have = [r for r in recs if self._value(r, col) is not None]
                missing = [r for r in recs if self._value(r, col) is None]
                have.sort(key=lambda r: (self._value(r, col), r["number"]), reverse=self.sort_reverse)
                missing.sort(key=lambda r: r["number"])
                nums = [r["number"] for r in have + missing]  # trials without a value last
            self._order = nums
            self._order_version = key
        return self._order

    def set_sort(self, col: str) -> None:
        if col == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key = col
            self.sort_reverse = True  # highest score / newest trial first
        self.page = 0
        self.rebuild()

    def set_page(self, page: int) -> None:
        page = max(0, min(self.pages - 1, page))
        if page != self.page:
            self.page = page
            self.rebuild()

    # -- filling
    def show(self, state: RunState) -> None:
        self._state = state
        self.rebuild()

    def rebuild(self) -> None:
        st = self._state
        if st is None:
            return
        cols = self.column_names(st)
        keep = None
        if self.row_count and self.cursor_row is not None and 0 <= self.cursor_row < self.row_count:
            keep = self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value
        # the cursor on the newest trial (or no rows yet): follow the newest one, which a running
        # search keeps replacing; anywhere else the user put it, it stays on its trial
        follow = keep is None or keep == str(self._newest_shown)
        newest = max(st.by_number) if st.by_number else None
        self._newest_shown = newest
        if cols != self._columns:
            self.clear(columns=True)
            for c in cols:
                arrow = ""
                if c == self.sort_key:
                    arrow = " ▼" if self.sort_reverse else " ▲"
                self.add_column(self._label(c) + arrow, key=c)
            self._columns = cols
        else:
            self.clear()
            self._relabel()
        best = (st.summary.get("best") or {}).get("number")
        self.best_number = best
        nums = self.ordered_numbers()
        self.page = max(0, min(self.pages - 1, self.page))
        page = nums[self.page * self.page_size:(self.page + 1) * self.page_size]
        rows = [(n, self._cells(st.by_number[n], cols, best)) for n in page]
        self._fit_widths(cols, [cells for _, cells in rows])
        for n, cells in rows:
            self.add_row(*cells, key=str(n))
            self.rows_written += 1
        target = str(newest) if follow and newest is not None else keep
        if target is not None and target in {str(n) for n in page}:
            self.move_cursor(row=self.get_row_index(target), animate=False, scroll=True)
        self.post_message(self.PageChanged(self))

    def _fit_widths(self, cols: list[str], rows: list[list[Any]]) -> None:
        """Fixed column widths from this page's labels and cells. DataTable's auto widths are
        measured later, on an idle message, and a screen drawn before that (or a measurement
        that raced a rebuild) cut the state and score columns to their labels' width."""
        for k, c in enumerate(cols):
            col = self.columns.get(c)  # type: ignore[call-overload]
            if col is None:
                continue
            width = max([col.label.cell_len] + [cells[k].cell_len for cells in rows])
            col.auto_width = False
            col.width = width
        self._require_update_dimensions = True

    def _relabel(self) -> None:
        for c in self._columns:
            col = self.columns.get(c)  # type: ignore[call-overload]
            if col is not None:
                arrow = (" ▼" if self.sort_reverse else " ▲") if c == self.sort_key else ""
                col.label = Text(self._label(c) + arrow)

    def _cells(self, rec: dict, cols: list[str], best: int | None) -> list[Any]:
        out: list[Any] = []
        for c in cols:
            v = self._value(rec, c)
            if c == "number":
                out.append(Text(f"{v}{' ★' if v == best else ''}", style="bold" if v == best else ""))
            elif c == "state":
                cell = Text(str(v), style=_STATE_STYLE.get(str(v), ""))
                if rec.get("fusion"):  # a hybrid: its merge was scored fused with other models
                    cell.append(f" {FUSION_MARK}", style="magenta")
                out.append(cell)
            elif c == "time":
                out.append(Text(f"{v:.2f}" if v is not None else "-", justify="right"))
            elif c == "device":
                out.append(Text(v or "-"))
            else:
                out.append(Text(fmt_num(v), justify="right"))
        return out

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.set_sort(str(event.column_key.value))
