"""The runs browser and the compare view, driven by Textual's pilot on recorded run directories
(tests/fixtures/runs/): listing, filtering, delete, compare, a real background resume, snapshot."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import settled
from mergelab.tui.app import MergelabApp
from mergelab.tui.screens.browser import RunsBrowserScreen
from mergelab.tui.screens.compare import CompareScreen
from mergelab.tui.screens.dashboard import DashboardScreen
from mergelab.tui.screens.dialogs import ChoiceDialog
from mergelab.tui.widgets.heatmap import HeatMap
from search.rundir import RunDir, worker_id

RUNS = Path(__file__).parent / "fixtures" / "runs"
FROZEN = 1_800_000_000.0  # the UI's clock: ages on screen do not depend on the real time
SMALL = (80, 24)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def copy_runs(dest: Path, *names: str) -> Path:
    for n in names or ("finished-cmaes", "stopped-tpe"):
        shutil.copytree(RUNS / n, dest / n)
    return dest


async def browser(pilot, scans: int = 1, timeout: float = 5.0) -> RunsBrowserScreen:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = pilot.app.screen
        if isinstance(s, RunsBrowserScreen) and s.scans >= scans:
            await pilot.pause()
            return s
        await pilot.pause(0.02)
    raise AssertionError("the runs browser did not scan in time")


async def until(pilot, cond, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not met in time")


def rows(screen: RunsBrowserScreen) -> list[list[str]]:
    table = screen.query_one("#runs")
    return [[c.plain.strip() for c in table.get_row_at(i)] for i in range(table.row_count)]


# ------------------------------------------------------------------------------- listing
@pytest.mark.asyncio
async def test_browser_lists_runs_with_status_trials_and_best(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    # a third run looks live: a fresh heartbeat of a process on this machine (this one)
    shutil.copytree(RUNS / "stopped-tpe", runs / "live-one")
    live = RunDir(runs / "live-one")
    live.update_summary(lambda s: s.update(name="live-one", status="running", created=s["created"] + 10))
    live.heartbeat(worker_id(), {"trial": 3, "paused": False})
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        # newest first; best scores from each summary.json (stopped-tpe: trial 2, -0.083221...;
        # finished-cmaes: trial 7, -0.346406...), shown with 4 decimals
        # (the last column, last activity, is file times against the frozen clock: see the snapshot)
        assert [r[:6] for r in rows(screen)] == [
            ["live-one", "running", "3/10", "-0.0832", "tpe", "49d ago"],
            ["stopped-tpe", "stopped", "3/10", "-0.0832", "tpe", "49d ago"],
            ["finished-cmaes", "finished", "8/8", "-0.3464", "cmaes", "49d ago"],
        ]
        # the heartbeat goes stale (process gone): the next scan shows the run as stopped
        live.remove_worker(worker_id())
        n = screen.scans
        screen.refresh_runs()
        await until(pilot, lambda: screen.scans > n)
        assert rows(screen)[0][:2] == ["live-one", "stopped"]


@pytest.mark.asyncio
async def test_browser_picks_up_new_runs_on_its_own(tmp_path):
    runs = copy_runs(tmp_path / "runs", "finished-cmaes")
    app = MergelabApp(runs_dirs=[runs, tmp_path / "more"], clock=lambda: FROZEN, browse_interval=0.1)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        assert [r[0] for r in rows(screen)] == ["finished-cmaes"]
        copy_runs(tmp_path / "more", "stopped-tpe")  # another --runs-dir gets a run
        await until(pilot, lambda: len(rows(screen)) == 2, timeout=3)
        assert [r[0] for r in rows(screen)] == ["stopped-tpe", "finished-cmaes"]


@pytest.mark.asyncio
async def test_filter_by_name(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("slash")
        await pilot.press("t", "p", "e")
        assert screen.filter_text == "tpe"
        assert [r[0] for r in rows(screen)] == ["stopped-tpe"]
        assert str(screen.query_one("#browser-info").render()) == "1 of 2 runs matching 'tpe'"
        await pilot.press("enter")  # back to the list, filter kept
        assert screen.app.focused is screen.query_one("#runs")
        assert [r[0] for r in rows(screen)] == ["stopped-tpe"]
        await pilot.press("escape")  # clears it
        assert [r[0] for r in rows(screen)] == ["stopped-tpe", "finished-cmaes"]


# ------------------------------------------------------------------------------- open / delete
@pytest.mark.asyncio
async def test_enter_opens_the_runs_dashboard_and_q_comes_back(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.loaded)
        assert app.screen.rd.name == "finished-cmaes"
        await pilot.press("q")  # a finished run: back to the browser, not out of the app
        await pilot.pause()
        assert app.screen is screen and app.is_running


@pytest.mark.asyncio
async def test_delete_asks_naming_the_run_then_removes_it(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("d")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, ChoiceDialog)
        assert dialog.title_text == "Delete run stopped-tpe?"
        assert str(runs / "stopped-tpe") in dialog.text
        await pilot.press("enter")  # the first (focused) button keeps it
        await pilot.pause()
        assert (runs / "stopped-tpe").is_dir()
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#delete")
        await until(pilot, lambda: len(rows(screen)) == 1)
        assert not (runs / "stopped-tpe").exists() and (runs / "finished-cmaes").is_dir()
        assert [r[0] for r in rows(screen)] == ["finished-cmaes"]


@pytest.mark.asyncio
async def test_a_running_run_is_not_deleted(tmp_path):
    runs = copy_runs(tmp_path / "runs", "stopped-tpe")
    rd = RunDir(runs / "stopped-tpe")
    rd.update_summary(lambda s: s.update(status="running"))
    rd.heartbeat(worker_id(), {"trial": None, "paused": False})
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        await browser(pilot)
        await pilot.press("d")
        await pilot.pause()
        assert not isinstance(app.screen, ChoiceDialog) and rd.path.is_dir()


# ------------------------------------------------------------------------------- compare
@pytest.mark.asyncio
async def test_compare_shows_both_runs_best_scores_and_recipes(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    best = {n: json.loads((runs / n / "summary.json").read_text())["best"] for n in ("stopped-tpe", "finished-cmaes")}
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("c")  # nothing marked: a hint, no screen
        assert app.screen is screen
        await pilot.press("space", "down", "space")
        assert len(screen.marked) == 2 and rows(screen)[0][0] == "● stopped-tpe"
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.loaded)
        cmp = app.screen
        # columns follow the browser's order: stopped-tpe, finished-cmaes
        assert cmp.value("score (combined)", 0) == "-0.0832" and cmp.value("score (combined)", 1) == "-0.3464"
        # one row per quantity: scorer a's one metric, not "score a" and "a/dist2" both
        assert cmp.value("a/dist2", 0) == "0.0065" and cmp.value("a/dist2", 1) == "0.1915"
        assert cmp.value("b/dist2", 0) == "0.0768" and cmp.value("b/dist2", 1) == "0.1549"
        labels = [str(k.value) for k in cmp.query_one("#compare-table").rows]
        assert "score a" not in labels and len(labels) == len(set(labels))
        # the lower distance (higher score) stands out
        assert "bold green" in str(cmp.query_one("#compare-table").get_cell("a/dist2", "run0").style)
        # both runs' best-so-far curves on one plot, by trial
        hist = [RunDir(runs / n).history() for n in ("stopped-tpe", "finished-cmaes")]
        assert [c[1] for c in cmp.curves] == [[v for v in h if v is not None] for h in hist]
        assert cmp.curves[1][1][-1] == pytest.approx(-0.3464, abs=1e-4)
        assert cmp.value("best trial", 0) == "2" and cmp.value("best trial", 1) == "7"
        assert cmp.value("trials", 0) == "3/10" and cmp.value("trials", 1) == "8/8"
        assert [best["stopped-tpe"]["number"], best["finished-cmaes"]["number"]] == [2, 7]
        # heat maps of each best recipe: stopped-tpe has one layer group, finished-cmaes two
        tpe_recipe = yaml.safe_load((runs / "stopped-tpe" / "best" / "recipe.yaml").read_text())
        cma_recipe = yaml.safe_load((runs / "finished-cmaes" / "best" / "recipe.yaml").read_text())
        hm0, hm1 = cmp.query_one("#compare-map-0", HeatMap), cmp.query_one("#compare-map-1", HeatMap)
        assert [g.param for g in hm0.grids] == [g.param for g in hm1.grids] == ["density", "weight"]
        for j, col in enumerate(["m1", "m2"]):
            w = tpe_recipe["models"][j]["parameters"]["weight"]
            assert hm0.cell_text("weight", "all layers", col) == f"{w:.2f}"
            w2 = cma_recipe["models"][j]["parameters"]["weight"]  # per layer: groups layers 0–1, 2–3
            assert hm1.cell_text("weight", "layers 0–1", col) == f"{w2[0]:.2f}"
            assert hm1.cell_text("weight", "layers 2–3", col) == f"{w2[2]:.2f}"
        await pilot.press("escape")
        assert app.screen is screen


# ------------------------------------------------------------------------------- a real resume
def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+= ")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def stopped_real_run(root: Path) -> RunDir:
    """A run over real tiny Llamas and a real exact-match eval, stopped after 1 of 3 trials by the
    loop's session limit (search.loop.prepare_run / run_search, the real objective)."""
    from conftest import make_llama
    from search.loop import prepare_run, run_search

    tok = _char_tokenizer()
    fam = root / "family"
    base = make_llama(fam / "base", 0, layers=2, hidden=16, vocab=len(tok))
    paths = [base, make_llama(fam / "ft_a", 1, layers=2, hidden=16, vocab=len(tok), base=base),
             make_llama(fam / "ft_b", 2, layers=2, hidden=16, vocab=len(tok), base=base)]
    for p in paths:
        tok.save_pretrained(p)
    (fam / "sums.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+3=", "answer": "5"}\n')
    (fam / "eval.yaml").write_text("scorers:\n  - {name: sums, type: exact_match, data: sums.jsonl, max_new_tokens: 2}\n")
    cfg = {"base_model": str(base), "models": [str(paths[1]), str(paths[2])], "method": "task_arithmetic",
           "space": {"weight": [0, 1]}, "eval": str(fam / "eval.yaml"), "optimizer": "random",
           "budget": {"trials": 3}, "seed": 0}
    (root / "tiny.yml").write_text(yaml.safe_dump(cfg))
    rd = prepare_run(root / "tiny.yml", root / "runs" / "tiny")
    res = run_search(rd, install_signals=False, max_trials_this_session=1)
    assert (res.status, res.trials_done) == ("stopped", 1)
    return rd


@pytest.mark.asyncio
async def test_resume_continues_a_stopped_run_in_the_background(tmp_path):
    rd = stopped_real_run(tmp_path)
    app = MergelabApp(runs_dirs=[rd.path.parent], clock=lambda: FROZEN, browse_interval=0.2, poll_interval=0.2)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        assert rows(screen)[0][:3] == ["tiny", "stopped", "1/3"]
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        proc = screen.processes[str(rd.path)]
        assert proc.args[1:4] == ["-m", "mergelab", "resume"] and proc.args[4] == str(rd.path)
        # its own session: Ctrl-C in the UI or closing it does not reach the search
        assert os.getsid(proc.pid) == proc.pid
        await pilot.press("q")  # the dashboard: leave it running (it is its own process) or back
        await pilot.pause()
        if isinstance(app.screen, ChoiceDialog):
            await pilot.click("#leave")
        await until(pilot, lambda: app.screen is screen)
        await until(pilot, lambda: rows(screen)[0][1:3] == ["finished", "3/3"], timeout=120)
        assert proc.wait(timeout=30) == 0
    trials = rd.trials()
    assert [t["number"] for t in trials] == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in trials)
    # the resumed trials are real evaluations: exact match over 2 items is 0, 0.5 or 1
    assert all(t["scores"]["sums"] in (0.0, 0.5, 1.0) for t in trials)
    assert rd.summary()["detail"] == "budget met: 3 trials"
    assert "resume" in (rd.path / "process.log").read_text()


@pytest.mark.asyncio
async def test_resume_refuses_a_finished_run(tmp_path):
    runs = copy_runs(tmp_path / "runs", "finished-cmaes")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("r")
        await pilot.pause()
        assert app.screen is screen and not screen.processes


class FakeProcess:
    """What start_detached returns, for a search that never really starts."""

    pid = 4242

    def __init__(self, cmd):
        self.cmd, self.code = cmd, None

    def poll(self):
        return self.code


@pytest.mark.asyncio
async def test_plus_gives_a_finished_run_more_trials_through_mergelab_resume(tmp_path, monkeypatch):
    import sys

    from mergelab.tui import launch
    from mergelab.tui.screens.dialogs import InputDialog

    runs = copy_runs(tmp_path / "runs", "finished-cmaes")
    started = []
    monkeypatch.setattr(launch, "start_detached", lambda cmd, run, **kw: started.append(FakeProcess(cmd)) or started[-1])
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("plus")
        await pilot.pause()
        assert isinstance(app.screen, InputDialog) and "done 8 trials" in app.screen.prompt
        app.screen.query_one("#dialog-input").value = "none"
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is screen and not started  # not a number: nothing started
        await pilot.press("plus")
        await pilot.pause()
        app.screen.query_one("#dialog-input").value = "5"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        assert started[0].cmd == [sys.executable, "-m", "mergelab", "resume", str(runs / "finished-cmaes"),
                                  "--trials", "5", "--no-tui"]
        dash = app.screen
        await until(pilot, lambda: dash.loaded)
        assert dash.state.status() == "starting"  # launched, not yet running its loop
        await pilot.press("q")
        await until(pilot, lambda: app.screen is screen)
        assert rows(screen)[0][1] == "starting"
        started[0].code = 0
        screen.scan_now()
        assert rows(screen)[0][1] == "finished"


def test_more_trials_refuses_a_running_run_and_a_bad_count(tmp_path):
    from mergelab.errors import MergelabError
    from mergelab.tui.launch import more_trials_in_background

    runs = copy_runs(tmp_path / "runs", "finished-cmaes")
    rd = RunDir(runs / "finished-cmaes")
    with pytest.raises(MergelabError, match="not a number of trials"):
        more_trials_in_background(rd, 0)
    rd.update_summary(lambda s: s.update(status="running"))
    rd.heartbeat(worker_id(), {"trial": None, "paused": False, "started": time.time()})
    with pytest.raises(MergelabError, match="is running"):
        more_trials_in_background(rd, 3)


@pytest.mark.asyncio
async def test_delete_removes_the_warm_start_file_an_older_mergelab_left_beside_the_run(tmp_path):
    runs = copy_runs(tmp_path / "runs")
    side = runs / ".stopped-tpe.warm_start.yml"
    side.write_text("merge_method: ties\n")
    other = runs / ".finished-cmaes.warm_start.yml"
    other.write_text("merge_method: ties\n")
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#delete")
        await until(pilot, lambda: len(rows(screen)) == 1)
    assert not (runs / "stopped-tpe").exists() and not side.exists()
    assert other.is_file()  # another run's file stays


@pytest.mark.asyncio
async def test_a_created_run_reads_new(tmp_path):
    runs = tmp_path / "runs"
    RunDir.create(runs / "fresh", "method: ties\n", {"optimizer": {"name": "tpe"}, "budget": {"trials": 4, "timeout": None}})
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        assert rows(screen)[0][:3] == ["fresh", "new", "0/4"]


# ------------------------------------------------------------------------------- snapshot, CLI
def test_browser_snapshot(tmp_path, monkeypatch, snap_compare):
    runs = copy_runs(tmp_path / "runs")
    for p in runs.rglob("*"):  # last activity = file times: fixed, so the picture is too
        os.utime(p, (FROZEN - 7200, FROZEN - 7200))
    monkeypatch.chdir(tmp_path)
    app = MergelabApp(runs_dirs=[Path("runs")], clock=lambda: FROZEN, browse_interval=600)

    async def ready(pilot):
        screen = await browser(pilot)
        await pilot.press("space")
        await settled(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=ready)


@pytest.mark.parametrize("size", [SMALL, (120, 40)], ids=["80x24", "120x40"])
def test_compare_snapshot(tmp_path, monkeypatch, snap_compare, size):
    """The table (one row per quantity), both runs' best-so-far curves, the heat maps."""
    runs = copy_runs(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    app = MergelabApp(runs_dirs=[Path("runs")], clock=lambda: FROZEN, browse_interval=600)

    async def ready(pilot):
        await browser(pilot)
        await pilot.press("space", "down", "space", "c")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.loaded)
        await settled(pilot)

    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_tui_command_rejects_a_missing_runs_dir(tmp_path, capsys):
    from mergelab.cli import main

    assert main(["tui", "--runs-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"No run directories under {tmp_path / 'none'}: the directory does not exist" in err
