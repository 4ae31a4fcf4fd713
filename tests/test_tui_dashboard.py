"""The dashboard as issue 18 found it: the 80x24 layout, the newest trial in view, truthful status
words, stage progress another process writes (progress.json), the trial axis, parameter labels,
the clock while paused, `v` on one objective, stamped log lines."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import settled
from fakehub import fakehub  # noqa: F401 - fixture
from mergelab.tui.app import MergelabApp
from mergelab.tui.screens.dashboard import path_text, recipe_text
from mergelab.tui.widgets.score_plot import ScorePlot, step_line, trial_ticks
from mergelab.tui.widgets.trials_table import TrialsTable
from search.rundir import RunDir, worker_id
from test_tui import FROZEN, copy_run, loaded, make_live, records, until

SMALL = (80, 24)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def screen_text(app) -> list[str]:
    """The terminal's rows as plain text."""
    return ["".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips()]


def header_text(screen) -> str:
    return " ".join(" ".join(str(c) for c in col._cells) for col in screen.query_one("#run-header").content.columns)


# ------------------------------------------------------------------------------- 80x24 layout
@pytest.mark.asyncio
async def test_80x24_shows_an_8_row_plot_8_table_rows_whole_numbers_and_the_toggle_keys(tmp_path):
    run = copy_run(tmp_path)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await loaded(pilot)
        plot, table = screen.query_one(ScorePlot), screen.query_one(TrialsTable)
        assert plot.content_region.height >= 8
        assert table.size.height - 1 >= 8  # rows below the header
        rows = screen_text(app)
        rec29 = records(run)[29]
        line = next(r for r in rows if r.strip("│ ").startswith("29 "))
        # every metric column whole: the numbers as the wide table shows them, and the device
        for v in (rec29["value"], *rec29["metrics"].values()):
            assert f"{v:.4f}" in line
        assert "cpu" in line
        footer = rows[-1]
        assert "m Table/map" in footer and "l Log" in footer
        assert not screen.query_one("#log").display and not screen.query_one("#side-tabs").display
        await pilot.press("m")  # the recipe tabs in place of the table
        await pilot.pause()
        assert screen.query_one("#side-tabs").display and not screen.query_one("#table-box").display
        await pilot.press("m", "l")
        await pilot.pause()
        assert screen.query_one("#table-box").display and screen.query_one("#log").display


@pytest.mark.asyncio
async def test_enter_on_a_narrow_terminal_shows_the_trials_recipe(tmp_path):
    run = copy_run(tmp_path)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await loaded(pilot)
        await pilot.press("enter")
        await pilot.pause()
        assert screen.selected == 29 and screen.query_one("#side-tabs").display
        text = str(screen.query_one("#recipe").content)
        assert "ft_math · weight · layers 0–1:" in text


@pytest.mark.parametrize("size", [SMALL, (120, 40)], ids=["80x24", "120x40"])
def test_dashboard_live_snapshot(tmp_path, snap_compare, size):
    """A live run at both sizes: status, a running trial's stage from progress.json, labels."""
    run = copy_run(tmp_path)
    rd = RunDir(run)
    summary = {**rd.summary(), "status": "running", "detail": "running", "elapsed_s": 30.0, "updated": FROZEN - 12}
    (run / "summary.json").write_text(json.dumps(summary))  # as written 12 s before the frozen clock
    rd.heartbeat("worker-a", {"trial": 29, "paused": False, "started": 1.0})  # a name without a pid
    (run / "progress.json").write_text(json.dumps({"trial": 30, "stage": "eval a", "frac": 0.5, "time": FROZEN}))
    app = MergelabApp(run, clock=lambda: FROZEN)

    async def ready(pilot):
        await loaded(pilot, timeout=20)
        await settled(pilot)

    assert snap_compare(app, terminal_size=size, run_before=ready)


# ------------------------------------------------------------------------------- newest trial
@pytest.mark.asyncio
async def test_the_newest_trial_stays_in_view_unless_the_user_moved_away(tmp_path):
    run = copy_run(tmp_path)
    recs = records(run)
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
    rd = make_live(run)
    app = MergelabApp(run, clock=lambda: FROZEN, poll_interval=0.1)
    async with app.run_test(size=SMALL) as pilot:
        screen = await loaded(pilot)
        table = screen.query_one(TrialsTable)
        for r in recs[10:25]:
            rd.append_trial(r)
        await until(pilot, lambda: table.row_count == 25)
        await pilot.pause()
        assert table.cursor_row == 0 and table.get_row_at(0)[0].plain == "24" and table.scroll_y == 0
        await pilot.press("down", "down")  # the user looks at trial 22
        for r in recs[25:]:
            rd.append_trial(r)
        await until(pilot, lambda: table.row_count == 30)
        await pilot.pause()
        assert table.get_row_at(table.cursor_row)[0].plain == "22"


# ------------------------------------------------------------------------------- status words
@pytest.mark.asyncio
async def test_status_says_new_starting_running_and_started_truthfully(tmp_path):
    rd = RunDir.create(tmp_path / "fresh", "method: ties\n", {"optimizer": {"name": "cmaes"},
                                                              "budget": {"trials": 5, "timeout": None}})

    class Launched:  # a search process this UI started, not yet running its loop
        alive = True

        def poll(self):
            return None if self.alive else 0

    proc = Launched()
    app = MergelabApp(rd, clock=lambda: FROZEN)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await loaded(pilot)
        assert screen.state.status() == "new" and "status new" in header_text(screen)
        screen.process = proc
        screen.read_now()
        screen.query_one("#run-header").show(screen.state, FROZEN)
        assert "status starting" in header_text(screen)
        assert str(screen.query_one("#current-title").content) in ("no trial running", "starting the search…")
        # the search takes over: a queued warm-start trial made the loop say "resumed"
        rd.update_summary(lambda s: s.update(status="running", detail="resumed"))
        rd.heartbeat(worker_id(), {"trial": None, "paused": False, "started": time.time()})
        proc.alive = False
        screen.read_now()
        text = header_text(screen)
        assert "status running" in text and "resumed" not in text and "started" in text


# ------------------------------------------------------------------------------- progress.json
@pytest.mark.asyncio
async def test_watch_shows_the_stage_another_process_writes_to_progress_json(tmp_path):
    from textual.widgets import ProgressBar

    run = copy_run(tmp_path)
    rd = make_live(run)  # its heartbeat still says trial None: the progress file is newer
    resolved = rd.resolved()
    resolved["eval"] = {"scorers": [{"name": "math"}, {"name": "code"}]}
    rd.write_resolved(resolved)
    app = MergelabApp(run, clock=lambda: FROZEN, poll_interval=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await loaded(pilot)
        (run / "progress.json").write_text(json.dumps(
            {"trial": 30, "stage": "caching sources", "frac": 0.0, "time": time.time()}))
        await until(pilot, lambda: bool(screen.state.running))
        await pilot.pause()
        assert str(screen.query_one("#current-title").content).startswith("trial 30 on ")
        assert "caching sources" in str(screen.query_one("#current-stages").content)
        (run / "progress.json").write_text(json.dumps(
            {"trial": 30, "stage": "eval code", "frac": 0.75, "time": time.time()}))
        bar = screen.query_one("#current-progress", ProgressBar)
        await until(pilot, lambda: screen.state.running and screen.state.running[0]["stage"] == "code")
        await pilot.pause()
        assert str(screen.query_one("#current-stages").content).split() == ["✓", "merge", "✓", "math", "▶", "code"]
        assert (bar.total, bar.progress) == (3, 2.5)  # 1 + 0.75 of the two scorers' batches
        # a progress file older than the worker's session says nothing about it
        (run / "progress.json").write_text(json.dumps({"trial": 31, "stage": "merge", "time": 1.0}))
        await until(pilot, lambda: not screen.state.running)


def test_a_missing_or_broken_progress_file_changes_nothing(tmp_path):
    from mergelab.tui.state import read_progress

    assert read_progress(tmp_path) == {}
    (tmp_path / "progress.json").write_text("{not json")
    assert read_progress(tmp_path) == {}
    (tmp_path / "progress.json").write_text(json.dumps({"trial": "7", "stage": "merge"}))
    assert read_progress(tmp_path) == {}


# ------------------------------------------------------------------------------- plot
def test_trial_axis_ticks_are_whole_numbers_and_best_so_far_steps():
    assert trial_ticks(0, 1, 5) == [0, 1]
    assert trial_ticks(0, 29, 5) == [0, 10, 20, 29]
    assert trial_ticks(4, 4, 5) == [4]
    assert all(isinstance(t, int) for t in trial_ticks(0, 10_049, 8))
    # flat until the trial that improved, then straight up: never a diagonal
    assert step_line([0, 1, 2, 3], [1.0, 1.0, 3.0, 5.0]) == ([0, 1, 2, 2, 3, 3], [1.0, 1.0, 1.0, 3.0, 3.0, 5.0])


@pytest.mark.asyncio
async def test_a_two_trial_plot_has_an_integer_axis(tmp_path):
    run = copy_run(tmp_path)
    recs = records(run)
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        plot = app.screen.query_one(ScorePlot)
        rows = screen_text(app)[plot.region.y:plot.region.bottom]
        axis = next(r for r in rows if "└" in r)
        labels = rows[rows.index(axis) + 1][plot.region.x:plot.region.right].strip("│ ").split()
        assert labels == ["0", "1"]


# ------------------------------------------------------------------------------- clock, v, log
@pytest.mark.asyncio
async def test_paused_freezes_elapsed_and_eta(tmp_path):
    run = copy_run(tmp_path)
    rd = make_live(run)
    rd.update_summary(lambda s: s.update(elapsed_s=30.0, trials_done=10, budget={"trials": 30, "timeout": None}))
    now = [time.time() + 100]
    app = MergelabApp(run, clock=lambda: now[0])
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await loaded(pilot)
        running = screen.state.elapsed(now[0])
        assert running > 100  # while running, the clock moves
        rd.update_summary(lambda s: s.update(paused=True))
        screen.read_now()
        e, eta = screen.state.elapsed(now[0]), screen.state.eta(now[0])
        now[0] += 500
        assert (screen.state.elapsed(now[0]), screen.state.eta(now[0])) == (e, eta) == (30.0, 60.0)
        assert "status paused" in header_text(screen) and "elapsed 0:30" in header_text(screen)


@pytest.mark.asyncio
async def test_v_on_a_single_objective_run_says_why_and_own_log_lines_are_stamped(tmp_path):
    run = copy_run(tmp_path)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await loaded(pilot)
        said = []
        screen.notify = lambda msg, **kw: said.append(msg)
        await pilot.press("v")
        assert screen.query_one(ScorePlot).mode == "history"
        assert len(said) == 1 and "one objective" in said[0]
        screen._task_done(None, "push failed: boom")
        await pilot.pause()
        last = screen.query_one("#log").lines[-1].text
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(FROZEN))
        assert last.startswith(f"{stamp} ERROR dashboard: push failed: boom")


# ------------------------------------------------------------------------------- other producers
def test_recipe_pane_shows_device_kernels_path_and_labels():
    rec = {"number": 3, "state": "COMPLETE", "value": 0.5, "device": "cuda:0", "kernels": {"ties": "triton"},
           "path": [["fam/addition", 0], ["fam/sort", 1], ["fam/addition", 1]],
           "params": {"m1.weight.g0": 0.25}, "recipe": {"merge_method": "ties"}}
    text = recipe_text(rec, {"m1.weight.g0": "sort · weight · layers 0–1"}).plain
    assert "device cuda:0  kernels ties: triton" in text
    assert "path addition:0 → sort:1 → addition:1" in text
    assert "  sort · weight · layers 0–1: 0.2500" in text
    assert path_text([["a/x", 2]]) == "x:2"


@pytest.mark.asyncio
async def test_a_push_that_fails_after_exporting_leaves_nothing_that_breaks_the_demo(tmp_path, fakehub):
    """`u` exports runs/NAME/best/model, then the Hub refuses the commit: the dashboard says so, and
    the demo's own export of that folder (overwrite) still succeeds afterwards."""
    from search.export import export_trial
    from test_tui import _tiny_run

    from mergelab.tui.screens.dialogs import InputDialog

    rd, _ = _tiny_run(tmp_path)
    fakehub.fail("commit", 500, times=5)
    app = MergelabApp(rd, clock=lambda: FROZEN)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await loaded(pilot)
        await pilot.press("u")
        await pilot.pause()
        assert isinstance(app.screen, InputDialog)
        app.screen.query_one("#dialog-input").value = "alice/tiny-merge"
        await pilot.press("enter")
        await until(pilot, lambda: screen._busy is False and len(screen.query_one("#log").lines) > 0, timeout=30)
        await pilot.pause()
        assert " ERROR dashboard: " in screen.query_one("#log").lines[-1].text
    best = rd.path / "best" / "model"
    assert (best / "model.safetensors").is_file() and not fakehub.commits
    # what `mergelab demo` runs after its search (mergelab/cli/demo_cmd.py)
    path, _ = export_trial(rd, best, device="cpu", overwrite=True)
    assert path == best and (best / "model.safetensors").is_file()


def test_a_finished_trial_or_an_idle_worker_is_not_shown_as_running(tmp_path):
    """progress.json outlives its trial: once the trial's record is in, or the worker's heartbeat
    (newer than the file) says it is idle, nothing is running."""
    from mergelab.tui.state import RunReader

    run = copy_run(tmp_path)
    rd = RunDir(run)
    rd.heartbeat("w", {"trial": None, "paused": False, "started": 1.0})
    hb = json.loads((run / "workers" / "w.json").read_text())["heartbeat"]
    reader = RunReader(rd)
    (run / "progress.json").write_text(json.dumps({"trial": 30, "stage": "eval a", "frac": 1.0, "time": hb - 1}))
    assert reader.read().running == []  # the idle heartbeat is newer
    (run / "progress.json").write_text(json.dumps({"trial": 30, "stage": "eval a", "frac": 0.5, "time": hb + 1}))
    [cur] = reader.read().running
    assert (cur["number"], cur["stage"], cur["frac"]) == (30, "a", 0.5)
    rd.append_trial({**records(run)[0], "number": 30})  # trial 30 finished
    assert reader.read().running == []


def test_stage_progress_counts_the_merge_then_the_eval_batches():
    from mergelab.tui.widgets.panels import stage_progress

    stages = ["merge", "math", "code"]
    assert stage_progress(stages, "merge", 0.0) == ([], 0.0)
    assert stage_progress(stages, "math", 0.25) == (["merge"], 1.5)
    assert stage_progress(stages, "code", 0.9) == (["merge", "math"], 2.8)
    assert stage_progress(stages, "code", None) == (["merge", "math"], 2.0)  # no fraction: stages done
    assert stage_progress(stages, "caching sources", 0.0) == ([], 0.0)
