"""examples/ runs as documented: the recipe merges the bundled family (and its dry run passes),
each search config passes the real validator (`mergelab search --dry-run`), the eval spec scores
a model; and the LICENSE file is the license pyproject declares."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from conftest import load_dir
from mergelab.cli import main

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
SEARCHES = sorted(EXAMPLES.glob("search_*.yml"))


@pytest.fixture
def at_root(monkeypatch):
    """The examples name the bundled family relative to the repository root, as the README runs them."""
    monkeypatch.chdir(ROOT)


def _dirs_at_root() -> set[str]:
    return {p.name for p in ROOT.iterdir()}


def test_every_optimizer_mode_has_an_example():
    assert [p.stem.removeprefix("search_") for p in SEARCHES] == ["cmaes", "nsga2", "pycma", "random", "tpe"]


@pytest.mark.parametrize("config", SEARCHES, ids=lambda p: p.stem)
def test_search_configs_pass_the_validator(config, at_root, capsys):
    before = _dirs_at_root()
    assert main(["search", str(config.relative_to(ROOT)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    optimizer = config.stem.removeprefix("search_")
    assert out.startswith("config OK:") and f"optimizer {optimizer}," in out
    assert _dirs_at_root() == before  # a dry run creates no run directory


def test_recipe_merges_the_bundled_family(at_root, tmp_path, capsys):
    recipe = "examples/merge_ties.yml"
    assert main(["merge", recipe, str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "ties, 3 models, base mergelab/demo/family/base" in capsys.readouterr().out
    assert main(["merge", recipe, str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    tensors = load_dir(out)
    base = load_dir(ROOT / "mergelab" / "demo" / "family" / "base")
    assert set(tensors) == set(base) and all(tensors[k].shape == base[k].shape for k in base)
    # the merge moved the weights away from the base, and the recipe written beside them is the example's
    assert any(not tensors[k].float().equal(base[k].float()) for k in base)
    assert "filter: self_attn" in (out / "mergelab_recipe.yaml").read_text()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_eval_spec_scores_a_model(at_root, tmp_path, capsys):
    result = tmp_path / "e.json"
    assert main(["eval", "mergelab/demo/family/addition", "--eval", "examples/eval_skills.yml",
                 "--limit", "2", "--device", "cpu", "--json", str(result)]) == 0
    data = json.loads(result.read_text())
    assert set(data["scores"]) == {"addition", "addition_mc", "sort_ppl"}
    assert data["combined"] == pytest.approx(data["scores"]["addition"] + 0.5 * data["scores"]["addition_mc"]
                                             + 0.1 * data["scores"]["sort_ppl"])


def test_license_file_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004", text)
    assert "END OF TERMS AND CONDITIONS" in text
