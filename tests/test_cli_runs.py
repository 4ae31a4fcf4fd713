"""Commands on run directories as a user reads them: `mergelab show` names searched values by
their labels, `mergelab export` (and the demo's export) shows a tensor bar that stays one clean
line off a terminal, and everything of a demo run lives inside its directory, so deleting the
run from the runs browser leaves nothing behind."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mergelab.cli import main
from mergelab.errors import MergelabError
from search.rundir import WARM_START_FILE, RunDir

FIXTURES = Path(__file__).parent / "fixtures"
COMPACT = re.compile(r"\bm\d+\.\w+(\.\w+)?\.g\d+\b")  # m0.weight.g0, m1.weight.io.g0


# ------------------------------------------------------------------------------- show
def test_show_names_the_best_trials_values_by_their_labels(capsys):
    assert main(["show", str(FIXTURES / "tui" / "ties-search"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    best = json.loads((FIXTURES / "tui" / "ties-search" / "summary.json").read_text())["best"]
    assert best["number"] == 19 and best["params"]["m0.weight.g0"] == pytest.approx(0.7500697218474138)
    lines = out.splitlines()
    head = lines.index("best trial 19, searched values:")
    values = lines[head + 1:head + 1 + len(best["params"])]
    # models by their short names, layer groups as the layers they cover (4 layers, 2 groups)
    assert values[:3] == [
        "  ft_math · weight · layers 0–1   0.7501",
        "  ft_math · weight · layers 2–3   0.6494",
        "  ft_math · density · layers 0–1  0.421",
    ]
    assert "  ft_chat · density · layers 2–3  0.5709" in values
    assert lines[head + 1 + len(best["params"])] == "best recipe:"
    assert not COMPACT.search(out), out


def test_show_labels_a_run_without_a_params_list_from_the_compact_names(tmp_path, capsys):
    """An older run's resolved.json has no "params": the labels come from the names themselves."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURES / "runs" / "finished-cmaes", run)
    res = json.loads((run / "resolved.json").read_text())
    del res["params"]
    (run / "resolved.json").write_text(json.dumps(res))
    assert main(["show", str(run), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "  m1 · weight · layers 0–1   0.749\n" in out and "  lambda                     1.419\n" in out
    assert not COMPACT.search(out), out


def test_search_dry_run_lists_the_space_by_labels(monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).parents[1])  # the example's paths are relative to the checkout
    assert main(["search", "examples/search_nsga2.yml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("config OK: ties over 3 models, 12 searched numbers")
    assert lines[1:3] == ["  addition · weight · layers 0–1   [0, 1.5]",
                          "  addition · weight · layers 2–3   [0, 1.5]"]
    assert lines[-1] == "  reverse · density · layers 2–3   [0.1, 1]" and len(lines) == 13
    assert not COMPACT.search("\n".join(lines))


# ------------------------------------------------------------------------------- export progress
def _fixture_run(tmp_path: Path) -> Path:
    """finished-cmaes with its model paths pointing at this checkout's fixture models."""
    run = tmp_path / "runs" / "finished-cmaes"
    shutil.copytree(FIXTURES / "runs" / "finished-cmaes", run)
    models = str(FIXTURES / "runs" / "models")
    for name in ("trials.jsonl", "resolved.json", "summary.json", "config.yaml"):
        p = run / name
        p.write_text(p.read_text().replace("/work/main/tests/fixtures/runs/models", models))
    return run


def _tensor_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return len(list(f.keys()))


def test_export_reports_each_tensor_to_its_bar_in_order(tmp_path, monkeypatch, capsys):
    import mergelab.cli.progress as progress

    seen: list[tuple[int, int]] = []
    opened: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def recording_bar(description, unit="tensors", *, quiet=False):
        opened.append((description, quiet))
        yield lambda done, total: seen.append((done, total))

    monkeypatch.setattr(progress, "count_bar", recording_bar)
    run, out = _fixture_run(tmp_path), tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    n = _tensor_count(out)
    assert n > 3 and opened == [("export", False)]
    assert seen == [(i, n) for i in range(1, n + 1)]  # one call per tensor, counting up to the total


def test_export_off_a_terminal_prints_one_clean_line_and_quiet_none(tmp_path, capsys):
    run = _fixture_run(tmp_path)
    assert main(["export", str(run), str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    best = json.loads((run / "summary.json").read_text())["best"]
    assert cap.out == f"trial 7 (score {best['value']:.6g}) written to {tmp_path / 'a'}\n"  # no bar on stdout
    n = _tensor_count(tmp_path / "a")
    assert "\r" not in cap.err and "\x1b" not in cap.err  # no redraws, no cursor or colour codes
    (line,) = cap.err.splitlines()  # only the bar's final state
    assert re.fullmatch(rf"export ━+ {n}/{n} tensors ETA 0:00:00", line.strip()), line
    assert main(["export", str(run), str(tmp_path / "b"), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.startswith("trial 7 ")


def test_a_failed_export_leaves_its_error_without_a_half_bar(capsys):
    from mergelab.cli.progress import count_bar

    with pytest.raises(MergelabError), count_bar("export") as update:
        update(1, 4)
        raise MergelabError("the engine refused tensor 2")
    assert capsys.readouterr().err.strip() == ""  # (rich ends its stopped display with a newline)


# ------------------------------------------------------------------------------- the demo's files
def test_warm_start_is_written_inside_the_run_and_a_new_run_accepts_it(tmp_path):
    from mergelab.cli.demo_cmd import write_warm_start

    run = tmp_path / "runs" / "w"
    warm = write_warm_start(run, {"merge_method": "ties", "models": []})
    assert warm == run / WARM_START_FILE and yaml.safe_load(warm.read_text())["merge_method"] == "ties"
    RunDir.check_new(run)  # a directory holding only its warm start is still a new run
    (run / "other.txt").write_text("x")
    with pytest.raises(MergelabError, match="already exists and is not empty"):
        RunDir.check_new(run)
    with pytest.raises(MergelabError, match="already exists and is not empty"):
        write_warm_start(run, {})
    # a link planted at the file's name is replaced, its target untouched
    run2, target = tmp_path / "runs" / "v", tmp_path / "precious.txt"
    target.write_text("keep")
    run2.mkdir()
    (run2 / WARM_START_FILE).symlink_to(target)
    write_warm_start(run2, {"merge_method": "ties"})
    assert target.read_text() == "keep" and not (run2 / WARM_START_FILE).is_symlink()
    # RUN itself a link: refused before anything is written
    (tmp_path / "runs" / "l").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(MergelabError, match="is a link or a file"):
        write_warm_start(tmp_path / "runs" / "l", {})
    assert not (tmp_path / "elsewhere").exists()


def test_a_refused_demo_run_leaves_nothing(tmp_path, monkeypatch):
    from mergelab.tui import launch

    def refuse(text, path):
        raise MergelabError("search config: refused for the test")

    monkeypatch.setattr(launch, "create_run", refuse)
    assert main(["demo", "--headless", "--trials", "1", "--run", str(tmp_path / "runs" / "d")]) == 2
    assert os.listdir(tmp_path / "runs") == []


def test_side_files_of_a_run_include_a_staged_config_a_killed_create_left(tmp_path):
    from mergelab.tui.launch import legacy_side_files

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    staged, warm = tmp_path / "runs" / ".r.search.yml", tmp_path / "runs" / ".r.warm_start.yml"
    staged.write_text("x")
    (tmp_path / "runs" / ".rr.search.yml").write_text("another run's")
    assert legacy_side_files(run) == [staged]
    warm.symlink_to(tmp_path / "elsewhere.yml")
    assert legacy_side_files(run) == [staged]  # a link is no file of the run


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_demo_run_lives_in_its_directory_and_deleting_it_leaves_nothing(tmp_path, capsys):
    from mergelab.cli.demo_cmd import equal_weight_recipe
    from mergelab.tui.app import MergelabApp
    from test_tui_browser import FROZEN, SMALL, browser, rows, until

    runs = tmp_path / "runs"
    run = runs / "demo-x"
    assert main(["demo", "--headless", "--trials", "1", "--layer-groups", "1", "--val-limit", "2",
                 "--limit", "2", "--run", str(run)]) == 0
    cap = capsys.readouterr()
    assert "searched merge" in cap.out
    n = _tensor_count(run / "best" / "model")
    assert re.search(rf"^export ━+ {n}/{n} tensors ETA", cap.err, re.M), cap.err  # the export's bar
    assert os.listdir(runs) == ["demo-x"]  # nothing named after the run beside it
    warm = run / WARM_START_FILE
    assert yaml.safe_load(warm.read_text()) == equal_weight_recipe()
    assert RunDir(run).resolved()["warm_start"] == str(warm.resolve())
    first = RunDir(run).trials()[0]
    assert first["number"] == 0 and first["recipe"]["models"][0]["parameters"]["density"] == 0.5
    app = MergelabApp(runs_dirs=[runs], clock=lambda: FROZEN)
    async with app.run_test(size=SMALL) as pilot:
        screen = await browser(pilot)
        assert [r[0] for r in rows(screen)] == ["demo-x"]
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#delete")
        await until(pilot, lambda: len(rows(screen)) == 0)
    assert os.listdir(runs) == []
