"""The dashboard, driven by Textual's pilot on recorded run directories (tests/fixtures/tui/): table,
recipe pane, heat map, pause/stop, live following, export, push, 10,000 trials, CLI errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_dir, settled
from fakehub import DEFAULT_TOKEN, fakehub  # noqa: F401 - fixture
from mergelab.tui.app import MergelabApp
from mergelab.tui.screens.dialogs import ChoiceDialog, InputDialog
from mergelab.tui.state import RunReader, RunState, best_so_far, downsample, downsample_monotone, recipe_heatmaps
from mergelab.tui.widgets.heatmap import HeatMap
from mergelab.tui.widgets.score_plot import ScorePlot
from mergelab.tui.widgets.trials_table import TrialsTable
from search.rundir import RunDir, worker_id

FIXTURES = Path(__file__).parent / "fixtures" / "tui"
FROZEN = 1_800_000_000.0  # the dashboard's clock in tests: nothing on screen depends on real time
SIZE = (120, 40)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def copy_run(tmp_path: Path, name: str = "ties-search") -> Path:
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "trials.jsonl").read_text().splitlines() if l.strip()]


async def loaded(pilot, timeout: float = 5.0):
    """The dashboard screen once its first read of the run directory is on screen."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        screen = pilot.app.screen
        if getattr(screen, "loaded", False):
            # let the table settle: column widths are recomputed on the refresh after rows land
            await pilot.pause()
            await pilot.wait_for_scheduled_animations()
            await pilot.pause(0.1)
            return screen
        await pilot.pause(0.02)
    raise AssertionError("the dashboard did not load")


async def until(pilot, cond, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def make_live(run: Path, status: str = "running") -> RunDir:
    """Make a recorded run look like one a search process is running now (fresh heartbeat)."""
    rd = RunDir(run)
    rd.update_summary(lambda s: s.update(status=status, detail="running", paused=False))
    rd.heartbeat(worker_id(), {"trial": None, "paused": False, "started": time.time()})
    return rd


# ------------------------------------------------------------------------------- pure parts
def test_downsample_keeps_each_buckets_extremes():
    xs = list(range(8))
    ys = [5, 1, 2, 9, 3, 3, 0, 4]
    # 4 points -> 2 buckets of 4: bucket 0 min at x=1 (1) max at x=3 (9); bucket 1 min x=6 max x=7
    assert downsample(xs, ys, 4) == ([1, 3, 6, 7], [1, 9, 0, 4])
    assert downsample(xs, ys, 8) == (xs, ys)
    assert best_so_far([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]
    # a step line keeps its change points and its last point
    assert downsample_monotone([0, 1, 2, 3, 4], [1, 3, 3, 5, 5], 10) == ([0, 1, 3, 4], [1, 3, 5, 5])


def test_heatmap_grids_from_a_per_layer_recipe():
    resolved = {"num_layers": 4, "layer_groups": 2, "filters": ["mlp"],
                "params": [{"kind": "model", "param": "weight", "low": 0.0, "high": 2.0}]}
    recipe = {"merge_method": "ties", "models": [
        {"model": "/x/ft_a", "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 0.1, 0.2, 0.2]},
                                                      {"value": [0.3, 0.3, 0.4, 0.4]}], "density": 0.5}},
        {"model": "/x/ft_b", "parameters": {"weight": [{"filter": "mlp", "value": [1.1, 1.1, 1.2, 1.2]},
                                                      {"value": [1.3, 1.3, 1.4, 1.4]}], "density": 0.5}}]}
    [g] = recipe_heatmaps(recipe, resolved)  # density is not searched: no grid
    assert (g.param, g.cols, g.low, g.high) == ("weight", ["ft_a", "ft_b"], 0.0, 2.0)
    assert g.rows == ["mlp layers 0–1", "mlp layers 2–3", "other layers 0–1", "other layers 2–3"]
    assert g.values == [[0.1, 1.1], [0.2, 1.2], [0.3, 1.3], [0.4, 1.4]]


# ------------------------------------------------------------------------------- pilot on the fixture
@pytest.mark.asyncio
async def test_table_fills_and_header_shows_best(tmp_path):
    run = copy_run(tmp_path)
    recs = records(run)
    best = max((r for r in recs if r["state"] == "COMPLETE"), key=lambda r: r["value"])
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        table = screen.query_one(TrialsTable)
        assert table.row_count == len(recs) == 30
        # newest first; the best row carries a star
        assert table.get_row_at(0)[0].plain == "29"
        assert table.get_row(str(best["number"]))[0].plain == f"{best['number']} ★"
        assert table.get_row(str(best["number"]))[2].plain == f"{best['value']:.4f}"
        failed = [r for r in recs if r["state"] == "FAIL"]
        assert [table.get_row(str(r["number"]))[1].plain for r in failed] == ["FAIL"]
        header = screen.query_one("#run-header").render()
        text = " ".join(str(x) for x in getattr(header, "plain", [header]))
        assert screen.state.summary["best"]["number"] == best["number"] == 19
        # sorting by score puts the best first
        table.set_sort("score")
        await pilot.pause()
        assert table.get_row_at(0)[0].plain.startswith(str(best["number"]))
        # the log pane highlights the failed trial's warning
        assert screen.query_one("#log").warnings == 1


@pytest.mark.asyncio
async def test_selecting_a_row_shows_that_trials_recipe(tmp_path):
    run = copy_run(tmp_path)
    rec7 = next(r for r in records(run) if r["number"] == 7)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        table = screen.query_one(TrialsTable)
        table.focus()
        table.move_cursor(row=table.get_row_index("7"))
        await pilot.press("enter")
        await pilot.pause()
        assert screen.selected == 7
        shown = str(screen.query_one("#recipe").content)
        assert shown.startswith(f"trial 7  COMPLETE  score {rec7['value']:.4f}")
        recipe_part = shown.split("\n\n", 1)[1]
        assert yaml.safe_load(recipe_part) == rec7["recipe"]
        assert screen.query_one("#side-tabs").active == "tab-recipe"


@pytest.mark.asyncio
async def test_heatmap_shows_the_best_recipes_values(tmp_path):
    run = copy_run(tmp_path)
    best = yaml.safe_load((run / "best" / "recipe.yaml").read_text())
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        hm = screen.query_one(HeatMap)
        assert [g.param for g in hm.grids] == ["weight", "density"]
        assert hm.grids[0].cols == ["ft_math", "ft_code", "ft_chat"]
        assert hm.grids[0].rows == ["layers 0–1", "layers 2–3"]
        for g in hm.grids:
            for j, m in enumerate(best["models"]):
                per_layer = m["parameters"][g.param]
                assert hm.cell_text(g.param, "layers 0–1", g.cols[j]) == f"{per_layer[0]:.2f}"
                assert hm.cell_text(g.param, "layers 2–3", g.cols[j]) == f"{per_layer[2]:.2f}"
        assert hm.caption.startswith("trial 19 ")


@pytest.mark.asyncio
async def test_pause_resume_and_stop_write_the_control_file(tmp_path):
    run = copy_run(tmp_path)
    rd = make_live(run)
    app = MergelabApp(run, clock=lambda: FROZEN, poll_interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        assert screen.state.status() == "running"
        await pilot.press("p")
        assert rd.control() == "pause"
        rd.update_summary(lambda s: s.update(paused=True, detail="paused"))  # what the loop does
        await until(pilot, screen.state.paused)
        await pilot.press("p")
        assert rd.control() == "resume"
        await pilot.press("s")
        assert rd.control() == "stop"


@pytest.mark.asyncio
async def test_pause_and_stop_reach_the_search_controller(tmp_path):
    """A search in this process is steered through its SearchController (stop also sets its event)."""
    from search.loop import SearchController

    run = copy_run(tmp_path)
    rd = make_live(run)
    ctl = SearchController(rd)
    app = MergelabApp(rd, controller=ctl, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("p")
        assert rd.control() == "pause" and not ctl.stop_event.is_set()
        await pilot.press("p")
        assert rd.control() == "resume"
        await pilot.press("s")
        assert rd.control() == "stop" and ctl.stop_event.is_set()


@pytest.mark.asyncio
async def test_current_trial_shows_params_and_stage_progress(tmp_path):
    """The events search.loop._one_trial sends to `progress`, fed through a LiveFeed."""
    from mergelab.tui.state import LiveFeed
    from textual.widgets import ProgressBar

    run = copy_run(tmp_path)
    rd = make_live(run)
    resolved = rd.resolved()
    resolved["eval"] = {"scorers": [{"name": "math", "type": "exact_match"}, {"name": "code", "type": "exact_match"}]}
    rd.write_resolved(resolved)
    feed = LiveFeed()
    app = MergelabApp(rd, feed=feed, clock=lambda: FROZEN, poll_interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        assert screen.state.stages == ["merge", "math", "code"]
        feed({"event": "trial_start", "number": 30, "params": {"m0.weight.g0": 0.5, "m1.weight.g0": 1.25}})
        feed({"event": "stage", "number": 30, "stage": "merge", "fraction": 0.0})
        # the loop names a scorer's stage "eval NAME" and reports after each batch: one stage, not two
        feed({"event": "stage", "number": 30, "stage": "eval math", "fraction": 0.5})
        await until(pilot, lambda: bool(screen.state.running))
        await pilot.pause()
        assert str(screen.query_one("#current-title").content) == "trial 30 on this process"
        bar = screen.query_one("#current-progress", ProgressBar)
        assert (bar.total, bar.progress) == (3, 2)  # merge done, half of the eval batches done
        assert str(screen.query_one("#current-stages").content).split() == ["✓", "merge", "▶", "math", "·", "code"]
        params = screen.query_one("#current-params").content
        lines = [" ".join(str(c) for c in params.columns[0]._cells)]
        assert "ft_math · weight · layers 0–1" in lines[0] and "ft_code · weight · layers 0–1" in lines[0]
        feed({"event": "trial_end", "number": 30, "record": {}})
        await until(pilot, lambda: not screen.state.running)
        assert str(screen.query_one("#current-title").content) == "no trial running"


@pytest.mark.asyncio
async def test_quit_can_leave_a_search_in_another_process_running(tmp_path):
    run = copy_run(tmp_path)
    rd = make_live(run)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceDialog)
        await pilot.click("#leave")
        await pilot.pause()
    assert app.return_code == 0 and rd.control() is None  # left running


@pytest.mark.asyncio
async def test_quit_can_stop_a_search_in_another_process(tmp_path):
    run = copy_run(tmp_path)
    rd = make_live(run)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("q")
        await pilot.pause()
        await pilot.click("#stop")
        await pilot.pause()
    assert rd.control() == "stop"


@pytest.mark.asyncio
async def test_quit_stops_a_search_running_in_this_process(tmp_path):
    """With the search in a thread of this process, q can only stop it (after its trial) or cancel."""
    import threading

    from search.loop import SearchController

    run = copy_run(tmp_path)
    rd = make_live(run)
    ctl = SearchController(rd)
    thread = threading.Thread(target=ctl.stop_event.wait, args=(30,), daemon=True)
    thread.start()
    app = MergelabApp(rd, controller=ctl, search_thread=thread, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceDialog)
        assert [b.id for b in app.screen.query("Button")] == ["stop", "cancel"]
        await pilot.click("#cancel")
        await pilot.pause()
        assert not ctl.stop_event.is_set() and app.is_running
        await pilot.press("q")
        await pilot.pause()
        await pilot.click("#stop")
        await pilot.pause()
    thread.join(timeout=5)
    assert ctl.stop_event.is_set() and rd.control() == "stop" and not thread.is_alive()


@pytest.mark.asyncio
async def test_watch_follows_trials_another_process_appends(tmp_path):
    run = copy_run(tmp_path)
    recs = records(run)
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
    make_live(run)
    rest = tmp_path / "rest.jsonl"
    rest.write_text("".join(json.dumps(r) + "\n" for r in recs[10:]))
    app = MergelabApp(run, clock=lambda: FROZEN, poll_interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        assert screen.query_one(TrialsTable).row_count == 10
        writer = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})
            import json
            from search.rundir import RunDir
            rd = RunDir({str(run)!r})
            for line in open({str(rest)!r}):
                rd.append_trial(json.loads(line))
        """)
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=30)
        took = await until(pilot, lambda: screen.query_one(TrialsTable).row_count == 30, timeout=3)
        assert took < 2.0
        assert screen.query_one(ScorePlot).points_plotted > 0


# ------------------------------------------------------------------------------- export / push
def _tiny_run(tmp_path: Path) -> tuple[RunDir, dict[str, Path]]:
    """A run directory over a real tiny Llama family: two trials of a linear merge."""
    from fixtures.tui.make_run import write_tiny_model

    fam = tmp_path / "family"
    base, a, b = fam / "base", fam / "ft_a", fam / "ft_b"
    for i, p in enumerate((base, a, b)):
        write_tiny_model(p, i)
    rd = RunDir.create(tmp_path / "runs" / "tiny", "method: linear\n",
                       {"optimizer": {"name": "random"}, "budget": {"trials": 2, "timeout": None},
                        "device": "cpu", "num_layers": 4, "layer_groups": 1,
                        "params": [{"name": "m0.weight", "kind": "model", "param": "weight", "low": 0, "high": 1, "model": 0},
                                   {"name": "m1.weight", "kind": "model", "param": "weight", "low": 0, "high": 1, "model": 1}]})
    for n, (wa, wb, score) in enumerate([(0.5, 0.5, 0.1), (0.25, 0.75, 0.4)]):
        recipe = {"merge_method": "linear",
                  "models": [{"model": str(a), "parameters": {"weight": wa}},
                             {"model": str(b), "parameters": {"weight": wb}}], "dtype": "float32"}
        rec = {"number": n, "state": "COMPLETE", "params": {"m0.weight": wa, "m1.weight": wb}, "recipe": recipe,
               "value": score, "values": None, "metrics": {"acc": score}, "scores": {"acc": score},
               "timings": {"total_s": 1.0}}
        rd.append_trial(rec)
    rd.update_summary(lambda s: s.update(status="finished", trials_done=2, trials_complete=2,
                                         best={"number": 1, "value": 0.4, "metrics": {"acc": 0.4}}))
    return rd, {"base": base, "a": a, "b": b}


@pytest.mark.asyncio
async def test_export_writes_the_selected_trials_model(tmp_path):
    rd, fam = _tiny_run(tmp_path)
    out = tmp_path / "exported"
    app = MergelabApp(rd, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        await pilot.press("e")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, InputDialog)
        assert dialog.value == str(rd.path / "export-trial-1")  # the best trial by default
        dialog.query_one("#dialog-input").value = str(out)
        await pilot.press("enter")
        await until(pilot, lambda: not screen._busy and (out / "config.json").is_file(), timeout=20)
    got = load_dir(out)
    wa, wb = load_dir(fam["a"]), load_dir(fam["b"])
    assert set(got) == set(wa)
    for name in got:  # linear: 0.25 a + 0.75 b (weights sum to 1)
        torch.testing.assert_close(got[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=1e-6, atol=1e-6)
    prov = json.loads((out / "mergelab_search.json").read_text())
    assert (prov["best_trial"], prov["history"], prov["n_trials"]) == (1, [0.1, 0.4], 2)


@pytest.mark.asyncio
async def test_u_exports_the_best_and_pushes_it(tmp_path, fakehub):
    rd, fam = _tiny_run(tmp_path)
    app = MergelabApp(rd, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot)
        await pilot.press("u")
        await pilot.pause()
        assert isinstance(app.screen, InputDialog)
        app.screen.query_one("#dialog-input").value = "alice/tiny-merge"
        await pilot.press("enter")
        await until(pilot, lambda: not screen._busy and fakehub.commits, timeout=30)
    folder = rd.path / "best" / "model"
    assert [c.repo_id for c in fakehub.commits] == ["alice/tiny-merge"]
    files = fakehub.commits[0].files
    on_disk = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert files == on_disk and "README.md" in files and "model.safetensors" in files
    assert json.loads(files["mergelab_search.json"])["best_trial"] == 1
    assert all(DEFAULT_TOKEN.encode() not in v for v in files.values())


# ------------------------------------------------------------------------------- 10,000 trials
def _big_run(tmp_path: Path, n: int) -> Path:
    run = copy_run(tmp_path)
    tmpl = records(run)[0]
    tmpl["recipe"] = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
    lines = []
    for i in range(n):
        r = dict(tmpl, number=i, value=-((i * 7919) % 1000) / 1000.0)
        lines.append(json.dumps(r) + "\n")
    (run / "trials.jsonl").write_text("".join(lines))
    rd = RunDir(run)
    rd.update_summary(lambda s: s.update(trials_done=n, best=dict(s["best"], number=0, value=0.0)))
    return run


@pytest.mark.asyncio
async def test_ten_thousand_trials_stay_cheap(tmp_path):
    run = _big_run(tmp_path, 10_000)
    app = MergelabApp(run, clock=lambda: FROZEN, poll_interval=60)
    async with app.run_test(size=SIZE) as pilot:
        screen = await loaded(pilot, timeout=30)
        table = screen.query_one(TrialsTable)
        plot = screen.query_one(ScorePlot)
        assert len(screen.state.trials) == 10_000
        assert table.row_count == table.page_size == 100 and table.pages == 100
        assert table.rows_written == 100  # one page written, not 10,000 rows
        assert plot.points_plotted <= 2 * plot.max_points
        # 50 more trials arrive: one page rewritten, the plot stays bounded
        rd = RunDir(run)
        tmpl = screen.state.trials[0]
        for i in range(10_000, 10_050):
            rd.append_trial(dict(tmpl, number=i, value=-0.5))
        t0 = time.perf_counter()
        screen.read_now()
        took = time.perf_counter() - t0
        assert len(screen.state.trials) == 10_050
        assert table.rows_written == 200
        assert table.get_row_at(0)[0].plain == "10049"
        assert plot.points_plotted <= 2 * plot.max_points
        assert took < 2.0, f"one refresh of a 10,050-trial run took {took:.2f} s"
        await pilot.press("]")
        assert table.page == 1 and table.get_row_at(0)[0].plain == str(10_049 - 100)


# ------------------------------------------------------------------------------- snapshots, CLI
def test_dashboard_snapshot(tmp_path, snap_compare):
    run = copy_run(tmp_path)
    app = MergelabApp(run, clock=lambda: FROZEN)

    async def ready(pilot):
        await loaded(pilot, timeout=20)
        await settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_dashboard_snapshot_multi_objective_pareto(tmp_path, snap_compare):
    run = copy_run(tmp_path, "nsga2-search")
    app = MergelabApp(run, clock=lambda: FROZEN)

    async def ready(pilot):
        screen = await loaded(pilot, timeout=20)
        assert screen.query_one(ScorePlot).mode == "pareto"  # the default view of an nsga2 run
        await settled(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=ready)


def test_watch_and_tui_errors_are_one_paragraph(tmp_path, capsys):
    from mergelab.cli import main

    assert main(["watch", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run directory" in capsys.readouterr().err
    assert main(["tui", "--runs-dir", str(tmp_path / "none")]) == 2
    assert "No run directories under" in capsys.readouterr().err


def test_reader_follows_partial_lines(tmp_path):
    run = copy_run(tmp_path)
    recs = records(run)
    (run / "trials.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1])[:40])
    rd = RunDir(run)
    state, reader = RunState(rd), RunReader(rd)
    state.apply(reader.read())
    assert sorted(state.by_number) == [0]
    with open(run / "trials.jsonl", "a") as f:
        f.write(json.dumps(recs[1])[40:] + "\n")
    state.apply(reader.read())
    assert sorted(state.by_number) == [0, 1]


def test_search_under_the_dashboard_gets_the_clis_storage_and_device(tmp_path, monkeypatch):
    """`mergelab search/resume` on a terminal runs the search under the dashboard with the same
    run_search arguments as with --no-tui: the storage URL (with its password) and the device."""
    import search.loop
    from mergelab import tui
    from mergelab.cli import search_cmd

    rd = make_live(copy_run(tmp_path), status="stopped")
    calls = []

    def fake_run_search(run, objective=None, **kw):
        calls.append((run, objective, kw))
        return "result"

    monkeypatch.setattr(search.loop, "run_search", fake_run_search)
    monkeypatch.setattr(tui, "run_dashboard", lambda rd, ctl, search_thread, feed: search_thread.join())
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    url = "postgresql+psycopg2://alice:s3cret@db/merges"
    assert search_cmd._run(rd, False, False, url, "cpu") == "result"
    (run, objective, kw) = calls.pop()
    assert run is rd and objective is None
    assert kw["storage"] == url and kw["device"] == "cpu" and kw["worker"] is False
    assert kw["install_signals"] is False and kw["max_trials_this_session"] is None
    assert isinstance(kw["progress"], tui.state.LiveFeed)  # the dashboard's live feed
    # the same arguments reach run_search without the dashboard
    assert search_cmd._run(rd, True, True, url, "cpu") == "result"
    (run, _, kw) = calls.pop()
    assert kw["storage"] == url and kw["device"] == "cpu" and kw["worker"] is True
