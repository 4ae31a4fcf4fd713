"""The new-search form: registry pre-fill, the command line's validator messages beside the fields,
the search-space size, and the config it writes (accepted by `mergelab search --dry-run`)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import settled
from mergelab.tui.app import MergelabApp
from mergelab.tui.form import FormValues, build_config, field_of, parse_param_text, sync_params
from mergelab.tui.screens.browser import RunsBrowserScreen
from mergelab.tui.screens.dashboard import DashboardScreen
from mergelab.tui.screens.new_search import NewSearchScreen
from search.rundir import RunDir

MODELS = Path(__file__).parent / "fixtures" / "runs" / "models"  # base, m1, m2 (4 layers), eval.yaml
FROZEN = 1_800_000_000.0
SMALL = (80, 24)
REVERSED = ("search config: the range `space.weight: [1.5, 0]` is reversed or empty (low must be below "
            "high). Write it as [0, 1.5], or give a single value to fix the parameter.")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _FakeProcess:
    """Stands in for the background search process (the browser tests start a real one)."""

    pid = 0

    def poll(self):
        return None


async def until(pilot, cond, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


async def open_form(pilot, runs: Path, started: list) -> NewSearchScreen:
    await until(pilot, lambda: isinstance(pilot.app.screen, RunsBrowserScreen) and pilot.app.screen.scans)
    browser = pilot.app.screen

    def start(rd: RunDir):
        started.append(rd)
        return _FakeProcess()

    form = NewSearchScreen(runs, clock=lambda: FROZEN, browser=browser, start_process=start,
                           values=FormValues(name="my-search", methods=["ties"]))  # weight, density, lambda
    pilot.app.push_screen(form)
    await until(pilot, lambda: form.checks >= 1)
    return form


async def settle(pilot, form: NewSearchScreen) -> None:
    """Wait for the check that follows the last edit (checks run in a worker after a pause)."""
    await pilot.pause()
    n = form.checks
    form.schedule_check(0.0)
    await until(pilot, lambda: form.checks > n)


def fill(form: NewSearchScreen, base: str, models: str, eval_spec: str, **more: str) -> None:
    q = form.query_one
    q("#f-base").value = base
    q("#f-models").value = models
    q("#f-eval").value = eval_spec
    for wid, value in more.items():
        q(f"#{wid}").value = value


# ------------------------------------------------------------------------------- pure parts
def test_param_text_and_field_mapping():
    assert parse_param_text("0, 1.5") == [0, 1.5] and parse_param_text("[0.1, 1]") == [0.1, 1]
    assert parse_param_text("0.5") == 0.5 and parse_param_text("true") is True and parse_param_text(" ") is None
    assert field_of(REVERSED) == "space.weight"
    assert field_of("search config `models[1]`: Model `x` is neither ...") == "models"
    assert field_of("Invalid search config: `budget.trials`: Input should be a valid integer") == "budget"
    assert field_of("search config `layer_groups: 9` is more than the base model's 4 layers") == "layer_groups"
    assert field_of("a model is listed twice") == "general"


def test_registry_prefill_and_config_mapping(tmp_path):
    v = FormValues(methods=["ties"], base_model="org/base", models="org/a, org/b", eval="spec.yml",
                   layer_groups="2", trials="5", timeout="", seed="3")
    specs = sync_params(v)
    # ties' registry: weight (required, [0, 1]), density ([0.1, 1]), lambda ([0.5, 2]), bools
    assert [s.name for s in specs] == ["weight", "density", "lambda", "normalize", "rescale", "int8_mask"]
    assert {n: (c.searched, c.text) for n, c in v.params.items()} == {
        "weight": (True, "0, 1"), "density": (True, "0.1, 1"), "lambda": (False, "0.5, 2"),
        "normalize": (False, "true"), "rescale": (False, "false"), "int8_mask": (False, "false")}
    v.params["normalize"].searched = True  # a checked single value is a fixed value
    assert build_config(v) == {
        "base_model": "org/base", "models": ["org/a", "org/b"], "method": "ties",
        "space": {"weight": [0, 1], "density": [0.1, 1], "normalize": True}, "layer_groups": 2,
        "eval": "spec.yml", "optimizer": "cmaes", "budget": {"trials": 5}, "seed": 3, "device": "cpu"}
    v.methods = ["ties", "slerp"]  # two operators: a list, and slerp's `t` joins the parameters
    sync_params(v)
    assert build_config(v)["method"] == ["ties", "slerp"] and "t" in v.params


# ------------------------------------------------------------------------------- pilot
@pytest.mark.asyncio
async def test_n_opens_the_form_with_registry_ranges(tmp_path):
    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsBrowserScreen) and app.screen.scans)
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewSearchScreen) and app.screen.checks >= 1)
        form = app.screen
        # the search config's default operator, tsv: its weight searched over [0, 2], lambda fixed
        assert [r.id for r in form.query(".param-value")] == ["pv-weight", "pv-lambda"]
        assert form.query_one("#pv-weight").value == "0, 2" and form.query_one("#p-weight").value is True
        assert form.query_one("#pv-lambda").value == "0.5, 1.5" and form.query_one("#p-lambda").value is False
        # empty required fields are not shouted at before Start
        assert form.error("base_model") is None
        assert "3 fields to fix" in str(form.query_one("#form-size").render())
        # choosing another operator rebuilds the parameter rows (ties: weight, density, lambda ...)
        sel = form.query_one("#f-methods")
        sel.deselect("tsv")
        sel.select("ties")
        await until(pilot, lambda: "pv-density" in [r.id for r in form.query(".param-value")])
        assert form.query_one("#pv-density").value == "0.1, 1" and form.query_one("#p-density").value is True
        # what was already there is kept as typed
        assert form.query_one("#pv-weight").value == "0, 2" and form.query_one("#pv-lambda").value == "0.5, 1.5"
        sel.deselect("ties")  # (slerp: only `t`)
        sel.select("slerp")
        await until(pilot, lambda: [r.id for r in form.query(".param-value")] == ["pv-t"])
        assert form.query_one("#pv-t").value == "0, 1"
        await pilot.press("escape")  # the form was changed: it asks first
        await pilot.pause()
        await pilot.click("#discard")
        await until(pilot, lambda: isinstance(app.screen, RunsBrowserScreen))


@pytest.mark.asyncio
async def test_escape_asks_before_discarding_a_filled_form_and_not_an_untouched_one(tmp_path):
    from mergelab.tui.screens.dialogs import ChoiceDialog

    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        await pilot.press("escape")  # nothing typed: straight back
        await until(pilot, lambda: isinstance(app.screen, RunsBrowserScreen))
        form = await open_form(pilot, runs, [])
        await pilot.press(*"models/base")
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceDialog) and app.screen.title_text == "Discard this search?"
        await pilot.press("enter")  # the first button keeps the form
        await pilot.pause()
        assert app.screen is form and form.query_one("#f-base").value == "models/base"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.click("#discard")
        await until(pilot, lambda: isinstance(app.screen, RunsBrowserScreen))


@pytest.mark.asyncio
async def test_tab_reaches_the_eval_spec_in_three_steps_and_skips_the_browse_buttons(tmp_path):
    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        seen = [app.focused.id]
        while app.focused.id != "f-eval" and len(seen) < 40:
            await pilot.press("tab")
            seen.append(app.focused.id)
        assert seen == ["f-base", "f-models", "f-eval"]
        # a full round of Tab never focuses a button that is not Start / Cancel, so typing goes to a field
        for _ in range(60):
            await pilot.press("tab")
            seen.append(app.focused.id)
        assert not [i for i in seen if i and i.startswith("b-")]
        form.query_one("#f-eval").focus()
        await pilot.press(*"x.yml")
        assert form.query_one("#f-eval").value.endswith("x.yml")
        # a Browse button still works with the mouse
        await pilot.click("#b-base")
        await pilot.pause()
        from mergelab.tui.screens.dialogs import PathPicker

        assert isinstance(app.screen, PathPicker)


@pytest.mark.asyncio
async def test_checkboxes_draw_a_tick_only_when_on(tmp_path):
    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        on, off = form.query_one("#p-weight"), form.query_one("#p-lambda")
        assert (on.value, off.value) == (True, False)
        assert "✓" in on.render().plain and "X" not in on.render().plain
        assert "✓" not in off.render().plain and "X" not in off.render().plain
        off.toggle()
        await pilot.pause()
        assert "✓" in off.render().plain
        # the operators list too: ✓ only beside the chosen ones
        sel = form.query_one("#f-methods")
        values = [sel.get_option_at_index(i).value for i in range(sel.option_count)]
        i = values.index("ties")
        sel.scroll_to(y=i, animate=False)
        await pilot.pause()
        top = sel.scroll_offset[1]
        assert sel.render_line(i - top).text.split()[:2] == ["▐✓▌", "ties"]
        other = i - 1 if i - 1 >= top else i + 1
        assert "✓" not in sel.render_line(other - top).text and "X" not in sel.render_line(other - top).text


@pytest.mark.asyncio
async def test_a_nonexistent_base_model_is_flagged_as_you_type(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        form.query_one("#f-base").value = "models/bsae"  # models/ exists: a typo, not a Hub id
        await settle(pilot, form)
        assert "there is no directory models/bsae" in form.error("base_model")
        form.query_one("#f-base").value = "./nowhere/base"
        await settle(pilot, form)
        assert "neither an existing directory nor a Hugging Face repo id" in form.error("base_model")
        form.query_one("#f-base").value = "Qwen/Qwen2-0.5B"  # a Hub id: a note, checked at the start
        await settle(pilot, form)
        assert "a Hub id" in form.error("base_model") and "base_model" not in form.result.errors


@pytest.mark.asyncio
async def test_form_shows_the_validators_message_for_a_reversed_range(tmp_path, capsys):
    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        fill(form, str(MODELS / "base"), f"{MODELS / 'm1'}, {MODELS / 'm2'}", str(MODELS / "eval.yaml"))
        form.query_one("#pv-weight").value = "1.5, 0"
        form.query_one("#pv-density").value = "0.1, 2"
        await settle(pilot, form)
        assert form.error("space.weight") == REVERSED
        assert form.error("space.density") == (
            "search config `space.density`: the range [0.1, 2] leaves the allowed values of `density` "
            "(a finite number in (0, 1]). Narrow the range.")
        assert not form.result.ok and "2 fields to fix" in str(form.query_one("#form-size").render())
        await pilot.press("ctrl+s")  # refused: nothing is created
        await pilot.pause()
        assert form.started is None and not runs.exists()
        # a layer-group count the base model cannot take: the validator's message beside that field
        form.query_one("#pv-weight").value = "0, 1.5"
        form.query_one("#pv-density").value = "0.1, 1"
        form.query_one("#f-groups").value = "9"
        await settle(pilot, form)
        assert form.error("layer_groups") == (
            "search config `layer_groups: 9` is more than the base model's 4 layers; use at most 4.")
        assert form.error("space.weight") is None
    # the command line says exactly the same about the same config
    cfg = build_config(FormValues(base_model=str(MODELS / "base"), models=f"{MODELS / 'm1'}, {MODELS / 'm2'}",
                                  eval=str(MODELS / "eval.yaml"), params={}))
    cfg["space"] = {"weight": [1.5, 0]}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    from mergelab.cli import main

    assert main(["search", "--dry-run", str(tmp_path / "bad.yml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {REVERSED}"


@pytest.mark.asyncio
async def test_filled_form_writes_a_config_the_command_line_accepts_and_starts_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    started: list[RunDir] = []
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, started)
        fill(form, str(MODELS / "base"), f"{MODELS / 'm1'}, {MODELS / 'm2'}", str(MODELS / "eval.yaml"),
             **{"f-groups": "2", "f-trials": "4", "f-seed": "5"})
        form.query_one("#p-lambda").value = True  # search lambda too, over its registry range
        held = tmp_path / "held-out.yaml"  # another spec file: the held-out `test_eval`
        held.write_text((MODELS / "eval.yaml").read_text().replace("em.jsonl", str(MODELS / "em.jsonl")))
        form.query_one("#f-test_eval").value = str(MODELS / "eval.yaml")  # the fitness spec again
        await settle(pilot, form)
        assert form.error("test_eval").startswith("search config: `test_eval` is the same eval spec as `eval`")
        assert not form.result.ok
        form.query_one("#f-test_eval").value = str(held)
        await settle(pilot, form)
        assert form.result.ok and form.result.complete, form.result.errors
        # 2 models x 2 layer groups for weight and density, plus one global lambda
        assert form.result.size_text == "9 searched numbers (lambda 1, weight 4, density 4)"
        assert str(form.query_one("#f-scorers").render()) == \
            "2 scorers: a (exact_match, em.jsonl, weight 1); b (exact_match, em.jsonl, weight 1)"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen), timeout=10)
        assert app.screen.rd.path == runs / "my-search"
        # let the dashboard finish mounting before the app shuts down (a TabbedContent torn down
        # mid-mount raises inside Textual)
        await until(pilot, lambda: app.screen.query_one("#side-tabs").active == "tab-heatmap", timeout=10)
    run = runs / "my-search"
    assert [rd.path for rd in started] == [run]
    text = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg == {"base_model": str(MODELS / "base"), "models": [str(MODELS / "m1"), str(MODELS / "m2")],
                   "method": "ties", "space": {"weight": [0, 1], "density": [0.1, 1], "lambda": [0.5, 2]},
                   "layer_groups": 2, "eval": str(MODELS / "eval.yaml"), "test_eval": str(tmp_path / "held-out.yaml"),
                   "optimizer": "cmaes", "budget": {"trials": 4}, "seed": 5, "device": "cpu"}
    assert RunDir(run).summary()["status"] == "stopped" and RunDir(run).resolved()["num_layers"] == 4
    # the file runs unchanged with the command line (dry run: validated, nothing started)
    (tmp_path / "copy.yml").write_text(text)
    from mergelab.cli import main

    assert main(["search", "--dry-run", str(tmp_path / "copy.yml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK: ties over 2 models, 9 searched numbers, optimizer cmaes, budget 4 trials")


@pytest.mark.asyncio
async def test_an_existing_run_name_is_refused(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(Path(__file__).parent / "fixtures" / "runs" / "stopped-tpe", runs / "stopped-tpe")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        form.query_one("#f-name").value = "stopped-tpe"
        await settle(pilot, form)
        assert form.error("name").startswith(f"Run directory {runs / 'stopped-tpe'} already exists")


# ------------------------------------------------------------------------------- snapshot
@pytest.mark.parametrize("size", [SMALL, (120, 40)], ids=["80x24", "120x40"])
def test_form_snapshot(tmp_path, monkeypatch, snap_compare, size):
    shutil.copytree(MODELS, tmp_path / "models")
    monkeypatch.chdir(tmp_path)  # relative paths on screen: the picture does not depend on the machine
    app = MergelabApp(runs_dirs=[Path("runs")], clock=lambda: FROZEN, browse_interval=600)

    async def ready(pilot):
        form = await open_form(pilot, Path("runs"), [])
        fill(form, "models/base", "models/m1, models/m2", "models/eval.yaml", **{"f-groups": "2"})
        form.query_one("#pv-weight").value = "1.5, 0"
        await settle(pilot, form)
        form.query_one("#form").scroll_to(y=0, animate=False)
        for inp in form.query("Input"):
            inp.cursor_blink = False  # a blinking cursor would make the picture depend on timing
        await pilot.pause()
        await settled(pilot)

    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.asyncio
async def test_ctrl_o_picks_a_model_directory_and_an_eval_file(tmp_path):
    from mergelab.tui.screens.dialogs import PathPicker

    runs = tmp_path / "runs"
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        form = await open_form(pilot, runs, [])
        form.query_one("#f-base").value = str(MODELS / "base")
        form.query_one("#f-base").focus()
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, PathPicker) and app.screen.highlighted is not None)
        picker = app.screen
        assert picker.start == (MODELS / "base").resolve() and not picker.files
        picker.highlighted = MODELS / "m1"
        await pilot.press("c")  # choose the highlighted directory
        await until(pilot, lambda: app.screen is form)
        assert form.query_one("#f-base").value == str(MODELS / "m1")
        form.pick("f-models")  # Models: a picked directory is appended to the list
        await until(pilot, lambda: isinstance(app.screen, PathPicker) and app.screen.highlighted is not None)
        app.screen.highlighted = MODELS / "m2"
        await pilot.press("c")
        await until(pilot, lambda: app.screen is form)
        assert form.query_one("#f-models").value == str(MODELS / "m2")
        form.pick("f-eval")  # file mode: a folder is not a choice, a file is
        await until(pilot, lambda: isinstance(app.screen, PathPicker) and app.screen.highlighted is not None)
        app.screen.highlighted = MODELS / "eval.yaml"
        await pilot.press("c")
        await until(pilot, lambda: app.screen is form)
        assert form.query_one("#f-eval").value == str(MODELS / "eval.yaml")
