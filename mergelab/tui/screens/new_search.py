"""The new-search form: models, operators, searched parameters and ranges, layer groups, eval spec,
optimizer, budget, seed, device; checked as you type with the command line's validators, then it
creates the run directory (as `mergelab search` does) and starts the search in the background."""
from __future__ import annotations

import copy
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rich.segment import Segment
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.strip import Strip
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, SelectionList, Static
from textual.widgets.option_list import OptionDoesNotExist

from search.rundir import RunDir

from ...errors import MergelabError
from ..form import FIELDS, GENERAL, FormCheck, FormValues, check_form, operator_params, sync_params
from ..state import Clock
from .dialogs import PathPicker

PATH_FIELDS = {"f-base": ("base_model", False), "f-models": ("models", False), "f-eval": ("eval", True),
               "f-test_eval": ("test_eval", True)}
CHECK_DELAY_S = 0.3  # typing pauses this long before the (threaded) check runs


def _launch(rd: RunDir) -> subprocess.Popen:
    from ..launch import resume_command, start_detached

    return start_detached(resume_command(rd.path), rd.path)


def browse_button(label: str, bid: str) -> Button:
    """A path picker's button: clicked, never focused, so Tab goes field to field and no keystroke
    lands on a button (ctrl+o picks a path from the focused field)."""
    b = Button(label, compact=True, id=bid, classes="form-browse")
    b.can_focus = False
    return b


class TickBox(Checkbox):
    """A checkbox that shows its state in the glyph (✓ on, blank off), not only in a colour: the
    compact Checkbox draws X in both states."""

    def render(self):
        # ToggleButton draws its box from BUTTON_INNER at each render: an instance value per state
        self.BUTTON_INNER = "✓" if self.value else " "
        return super().render()


class TickList(SelectionList):
    """A SelectionList whose boxes show ✓ for a chosen operator and a blank otherwise (the stock one
    draws X in both states)."""

    def render_line(self, y: int) -> Strip:
        line = super().render_line(y)
        segs = list(line)
        try:
            option = self.get_option_at_index(self.scroll_offset[1] + y)
        except OptionDoesNotExist:
            return line
        if len(segs) < 2:
            return line
        # the stock line is [left edge, box glyph, right edge, space, prompt...]: swap the glyph
        segs[1] = Segment("✓" if option.value in self._selected else " ", segs[1].style)
        return Strip(segs, line.cell_length)


class NewSearchScreen(Screen):
    """Set up a search and start it. `start_process(run_dir)` starts the search process (tests swap it)."""

    BINDINGS = [
        Binding("ctrl+s", "start", "Start search"),
        Binding("ctrl+o", "browse", "Pick path"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, runs_dir: str | Path, *, clock: Clock = time.time, browser: Any = None,
                 start_process: Callable[[RunDir], subprocess.Popen] = _launch,
                 values: FormValues | None = None) -> None:
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.clock = clock
        self.browser = browser
        self.start_process = start_process
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(clock()))
        self.values = values or FormValues(name=f"search-{stamp}")
        sync_params(self.values)
        self.result: FormCheck | None = None
        self.checks = 0
        self._version = 0
        self._timer = None
        self.started: RunDir | None = None
        self._starting = False
        self.show_missing = False  # empty required fields are flagged once Start was pressed

    # -- layout
    def _row(self, label: str, *widgets, field: str) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label(label, classes="form-label")
            yield from widgets
        yield Static("", id=f"e-{field}", classes="form-error")

    def compose(self) -> ComposeResult:
        from operators import REGISTRY
        from search.config import OPTIMIZERS

        v = self.values
        with VerticalScroll(id="form"):
            yield from self._row("Run name", Input(v.name, id="f-name", compact=True), field="name")
            yield from self._row("Base model", Input(v.base_model, placeholder="directory or org/name", id="f-base", compact=True),
                                 browse_button("Browse", "b-base"), field="base_model")
            yield from self._row("Models", Input(v.models, placeholder="dirs or hub ids, comma-separated", id="f-models", compact=True),
                                 browse_button("Add dir", "b-models"), field="models")
            # right after the models: the eval spec is 3 Tabs from the top, not behind the parameters
            yield from self._row("Eval spec", Input(v.eval, placeholder="eval spec YAML", id="f-eval", compact=True),
                                 browse_button("Browse", "b-eval"), field="eval")
            yield Static("", id="f-scorers", classes="form-note")
            yield from self._row("Held-out spec", Input(v.test_eval, placeholder="optional: test-split eval spec YAML",
                                                        id="f-test_eval", compact=True),
                                 browse_button("Browse", "b-test_eval"),
                                 field="test_eval")
            names = sorted({op.name for op in REGISTRY.values()})
            yield from self._row("Operators", TickList(*[(n, n, n in v.methods) for n in names], compact=True, id="f-methods"),
                                 field="method")
            yield Static("", id="f-chosen", classes="form-note")
            yield Label("Parameters (✓ searched; text: low, high = range, one value = fixed)",
                        classes="form-section")
            yield Vertical(id="f-params")
            yield Static("", id="e-space", classes="form-error")
            yield from self._row("Layer groups", Input(v.layer_groups, id="f-groups", compact=True), field="layer_groups")
            yield from self._row("Filters", Input(v.filters, placeholder="optional: self_attn, mlp", id="f-filters", compact=True),
                                 field="filters")
            with Horizontal(classes="form-row"):
                yield Label("", classes="form-label")
                yield TickBox("io group", v.io_group, compact=True, id="f-io")
                yield TickBox("layer sources", v.layer_sources, compact=True, id="f-sources")
            yield Static("", id="e-io_group", classes="form-error")
            yield Static("", id="e-layer_sources", classes="form-error")
            yield from self._row("Optimizer", Select([(o, o) for o in OPTIMIZERS], value=v.optimizer,
                                                     allow_blank=False, compact=True, id="f-optimizer"), field="optimizer")
            yield from self._row("Budget", Input(v.trials, placeholder="trials", id="f-trials", compact=True),
                                 Input(v.timeout, placeholder="timeout (s)", id="f-timeout", compact=True), field="budget")
            yield from self._row("Seed, device", Input(v.seed, id="f-seed", compact=True), Input(v.device, id="f-device", compact=True),
                                 field="seed")
            yield Static("", id="e-device", classes="form-error")
            yield Static("", id="e-general", classes="form-error")
            with Horizontal(classes="form-row form-buttons"):
                yield Button("Start search", variant="primary", compact=True, id="start")
                yield Button("Cancel", compact=True, id="cancel")
        yield Static("", id="form-size")
        yield Footer(show_command_palette=False)

    def _param_rows(self) -> list:
        rows = []
        for spec in operator_params(self.values.methods):
            ch = self.values.params[spec.name]
            rows.append(Horizontal(
                TickBox(spec.name, ch.searched, compact=True, id=f"p-{spec.name}", classes="param-check"),
                Input(ch.text, id=f"pv-{spec.name}", classes="param-value", compact=True),
                Label(Text(f"{spec.scope}: {spec.help}", style="dim", no_wrap=True, overflow="ellipsis"),
                      classes="param-help"),
                classes="param-row"))
            rows.append(Static("", id=f"pe-{spec.name}", classes="form-error"))
        return rows

    async def on_mount(self) -> None:
        self.sub_title = f"new search in {self.runs_dir}"
        for st in self.query(".form-error"):
            st.display = False
        await self._rebuild_params()
        self.query_one("#f-base", Input).focus()
        self._initial = asdict(copy.deepcopy(self.read_values()))  # Escape asks once this changed
        self.schedule_check(0.0)

    async def _rebuild_params(self) -> None:
        box = self.query_one("#f-params", Vertical)
        await box.remove_children()
        sync_params(self.values)
        rows = self._param_rows()
        await box.mount_all(rows)
        for st in box.query(".form-error"):
            st.display = False

    # -- reading the widgets
    def read_values(self) -> FormValues:
        v = self.values
        q = self.query_one
        v.name = q("#f-name", Input).value
        v.base_model = q("#f-base", Input).value
        v.models = q("#f-models", Input).value
        v.methods = list(q("#f-methods", SelectionList).selected)
        v.layer_groups = q("#f-groups", Input).value
        v.filters = q("#f-filters", Input).value
        v.io_group = q("#f-io", Checkbox).value
        v.layer_sources = q("#f-sources", Checkbox).value
        v.eval = q("#f-eval", Input).value
        v.test_eval = q("#f-test_eval", Input).value
        opt = q("#f-optimizer", Select).value
        v.optimizer = opt if isinstance(opt, str) else "cmaes"
        v.trials = q("#f-trials", Input).value
        v.timeout = q("#f-timeout", Input).value
        v.seed = q("#f-seed", Input).value
        v.device = q("#f-device", Input).value
        for name, ch in v.params.items():
            for cb in self.query(f"#p-{name}"):
                ch.searched = cb.value
            for inp in self.query(f"#pv-{name}"):
                ch.text = inp.value
        return v

    # -- checking as you type
    @on(Input.Changed)
    @on(Checkbox.Changed)
    @on(Select.Changed)
    def _changed(self, event) -> None:
        self.schedule_check()

    @on(SelectionList.SelectedChanged)
    async def _methods_changed(self, event) -> None:
        self.read_values()
        await self._rebuild_params()
        self.schedule_check()

    def schedule_check(self, delay: float = CHECK_DELAY_S) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(max(delay, 0.01), self._start_check)  # Textual rejects a 0 s timer

    def _start_check(self) -> None:
        self._version += 1
        values = copy.deepcopy(self.read_values())  # the worker must not see later keystrokes
        self._check_worker(values, self._version)

    @work(thread=True, exclusive=True, group="form-check")
    def _check_worker(self, values: FormValues, version: int) -> None:
        try:
            res = check_form(values, self.runs_dir)
        except Exception as e:  # a validator bug must not take the form down; show it
            res = FormCheck(errors={GENERAL: f"could not check the form: {type(e).__name__}: {e}"})
        self.app.call_from_thread(self._apply_check, res, version)

    def check_now(self) -> FormCheck:
        """Check synchronously and show the result (tests, and the Start key)."""
        res = check_form(self.read_values(), self.runs_dir)
        self._apply_check(res, self._version)
        return res

    def _apply_check(self, res: FormCheck, version: int) -> None:
        if version != self._version:
            return  # the form changed since: a newer check is coming
        if not (self.is_attached and self.app.is_running):
            return  # the form was closed (Escape, quit) while the check ran: nothing to show it on
        try:
            self._show_check(res)
        except NoMatches:
            return  # the form is being taken down (its widgets go before it detaches)

    def _show_check(self, res: FormCheck) -> None:
        self.result = res
        self.checks += 1
        for f in (*FIELDS, GENERAL):
            for st in self.query(f"#e-{f}"):
                msg = res.errors.get(f) or res.notes.get(f)
                if f in res.missing and not self.show_missing:
                    msg = None
                st.update(Text(msg or "", style="red" if f in res.errors else "dim"))
                st.display = bool(msg)
        for name in self.values.params:
            for st in self.query(f"#pe-{name}"):
                msg = res.errors.get(f"space.{name}")
                st.update(Text(msg or "", style="red"))
                st.display = bool(msg)
        self.query_one("#f-scorers", Static).update(Text(res.scorers_text, style="dim"))
        chosen = ", ".join(self.values.methods) or "none"
        self.query_one("#f-chosen", Static).update(Text(f"chosen: {chosen} (space toggles)", style="dim"))
        n = len(res.errors)
        if n:
            status = Text(f"{n} field{'s' if n > 1 else ''} to fix", style="bold red")
        else:
            status = Text("ready: ctrl+s starts the search", style="bold green")
        size = Text.assemble(("search space: ", "dim"), res.size_text or "-", "  ", status)
        self.query_one("#form-size", Static).update(size)

    def error(self, field: str) -> str | None:
        """The message shown beside a field (tests)."""
        st = self.query_one(f"#pe-{field[6:]}" if field.startswith("space.") else f"#e-{field}", Static)
        return str(st.render()) if st.display else None

    # -- path pickers
    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        if bid == "start":
            self.action_start()
        elif bid == "cancel":
            self.action_back()
        elif bid.startswith("b-"):
            self.pick("f-" + bid[2:])

    def action_browse(self) -> None:
        focused = self.app.focused
        fid = getattr(focused, "id", None)
        if fid in PATH_FIELDS:
            self.pick(fid)
        else:
            self.notify("ctrl+o picks a path for Base model, Models, Eval spec or Held-out spec: focus one of them first",
                        severity="warning")

    def pick(self, fid: str) -> None:
        inp = self.query_one(f"#{fid}", Input)
        _, files = PATH_FIELDS[fid]
        current = inp.value.split(",")[-1].strip() if fid == "f-models" else inp.value.strip()
        title = {"f-base": "Base model directory", "f-models": "Add a model directory",
                 "f-eval": "Eval spec file", "f-test_eval": "Held-out eval spec file"}[fid]

        def done(path: str | None) -> None:
            if not path:
                return
            if fid == "f-models":
                have = [p.strip() for p in inp.value.split(",") if p.strip()]
                inp.value = ", ".join([*have, path])
            else:
                inp.value = path
            inp.focus()

        self.app.push_screen(PathPicker(title, current or ".", files=files), done)

    # -- start
    def action_start(self) -> None:
        if self._starting:
            return
        self.show_missing = True
        res = self.check_now()
        if not res.ok:
            first = next(iter(res.errors))
            self.notify(f"{len(res.errors)} field(s) to fix first: {res.errors[first]}", severity="error", timeout=10)
            return
        self._starting = True
        self.notify(f"creating {self.runs_dir / self.values.name.strip()} and starting the search")
        self._start_worker(res.yaml_text, self.runs_dir / self.values.name.strip())

    @work(thread=True, exclusive=True, group="form-start")
    def _start_worker(self, text: str, run_path: Path) -> None:
        from ..launch import create_run

        try:
            rd = create_run(text, run_path)
            proc = self.start_process(rd)
        except MergelabError as e:
            self.app.call_from_thread(self._start_failed, str(e))
            return
        except Exception as e:  # shown, not raised: the form keeps what was typed
            self.app.call_from_thread(self._start_failed, f"{type(e).__name__}: {e}")
            return
        self.app.call_from_thread(self._started, rd, proc)

    def _start_failed(self, msg: str) -> None:
        self._starting = False
        st = self.query_one("#e-general", Static)
        st.update(Text(msg, style="red"))
        st.display = True
        self.notify(msg, title="the search did not start", severity="error", timeout=15)

    async def _started(self, rd: RunDir, proc: subprocess.Popen) -> None:
        self._starting = False
        self.started = rd
        await self.app.pop_screen()  # gone before the dashboard mounts (its tabs mount in order)
        if self.browser is not None:
            self.browser.search_started(rd.path, proc)
        else:
            self.app.open_dashboard(rd)

    def edited(self) -> bool:
        return asdict(self.read_values()) != getattr(self, "_initial", None)

    def action_back(self) -> None:
        """Leave the form; a filled-in form is discarded only when the user says so."""
        if not self.edited():
            self.app.pop_screen()
            return
        from .dialogs import ChoiceDialog

        def done(choice: str | None) -> None:
            if choice == "discard":
                self.app.pop_screen()

        self.app.push_screen(ChoiceDialog(
            "Discard this search?", "The form has values you typed; leaving now loses them.",
            [("keep", "Keep editing"), ("discard", "Discard it")]), done)
