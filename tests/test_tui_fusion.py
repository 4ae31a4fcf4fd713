"""The dashboard marks hybrid trials (search config `fusion:`): the state column, the trial's
recipe pane and the best-recipe caption say "⊕ fusion"; plain trials carry no mark."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mergelab.tui.app import MergelabApp
from mergelab.tui.widgets.heatmap import HeatMap
from mergelab.tui.widgets.trials_table import FUSION_MARK, TrialsTable

FIXTURES = Path(__file__).parent / "fixtures" / "tui"
FROZEN = 1_800_000_000.0
SIZE = (120, 40)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HYBRID = {7, 19}  # 19 is the fixture's best trial


def _fusion(n: int) -> dict:
    return {"weighting": "opt" if n == 19 else "sim", "tau": 0.5, "grid_step": 0.05,
            "members": ["merge", "/models/ft_math", "/models/ft_code"]}


def _hybrid_run(tmp_path: Path) -> Path:
    """The recorded ties search with trials 7 and 19 turned into hybrids, as the loop writes them."""
    run = tmp_path / "ties-search"
    shutil.copytree(FIXTURES / "ties-search", run)
    recs = [json.loads(l) for l in (run / "trials.jsonl").read_text().splitlines() if l.strip()]
    for r in recs:
        if r["number"] in HYBRID:
            r["fusion"] = _fusion(r["number"])
    (run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = json.loads((run / "summary.json").read_text())
    summary["best"]["fusion"] = _fusion(19)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


async def _loaded(pilot, timeout: float = 5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if getattr(pilot.app.screen, "loaded", False):
            await pilot.pause()
            return pilot.app.screen
        await pilot.pause(0.02)
    raise AssertionError("the dashboard did not load")


@pytest.mark.asyncio
async def test_fusion_trials_are_marked_in_table_recipe_pane_and_best_caption(tmp_path):
    run = _hybrid_run(tmp_path)
    app = MergelabApp(run, clock=lambda: FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _loaded(pilot)
        table = screen.query_one(TrialsTable)
        states = {int(k): table.get_row(str(k))[1].plain for k in screen.state.by_number}
        assert states[7] == f"COMPLETE {FUSION_MARK}" == "COMPLETE ⊕ fusion"
        assert states[19] == "COMPLETE ⊕ fusion"
        assert all(FUSION_MARK not in s for n, s in states.items() if n not in HYBRID)
        # the recipe pane of a hybrid says what the score measured
        table.focus()
        table.move_cursor(row=table.get_row_index("7"))
        await pilot.press("enter")
        await pilot.pause()
        shown = str(screen.query_one("#recipe").content)
        assert ("⊕ fusion: sim weights, tau 0.5000, over the merge, ft_math, ft_code "
                "(inference time: export writes the merge + fusion_recipe.yaml)") in shown
        table.move_cursor(row=table.get_row_index("8"))
        await pilot.press("enter")
        await pilot.pause()
        assert FUSION_MARK not in str(screen.query_one("#recipe").content)
        # the best is a hybrid: the heat map's caption says so
        assert screen.query_one(HeatMap).caption.endswith("method ties ⊕ fusion (opt)")
