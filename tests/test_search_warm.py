"""Warm starts for the CMA-ES optimizers: the evolution's mean starts at the recipe (not only one
enqueued trial at it), pycma included; the values are fixed in the study when the run first starts,
so a resume neither re-reads the recipe nor trusts an edited value."""
from __future__ import annotations

import json

import optuna
import pytest
import yaml

from mergelab.errors import MergelabError
from search.loop import WARM_START_ATTR, prepare_run, run_search
from search.recovery import set_budget_trials
from search.storage import open_storage
from search.synthetic import sphere

from test_search import _config, _params_seq, world  # noqa: F401  (world: the fixture)

# weight 0.15 of [0, 1.5], density 0.28 of [0.2, 1], lambda 0.65 of [0.5, 2]: 0.1 of each range
WARM = {"weight": 0.15, "density": 0.28, "lambda": 0.65}
SPACE = {"weight": [0, 1.5], "density": [0.2, 1.0], "lambda": [0.5, 2.0]}


def _warm_recipe(world, tmp_path):
    p = tmp_path / "warm.yaml"
    p.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(world / "base"), "parameters": {"lambda": WARM["lambda"]},
        "models": [{"model": str(world / m), "parameters": {"weight": WARM["weight"], "density": WARM["density"]}}
                   for m in ("m1", "m2")]}))
    return p


def _study(rd) -> optuna.Study:
    return optuna.load_study(study_name=rd.study_name(), storage=open_storage(rd.storage_url(), False))


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1] if name.startswith("m") else name.split(".")[0]


def _unit(params: dict) -> list[float]:
    return [(v - SPACE[_kind(k)][0]) / (SPACE[_kind(k)][1] - SPACE[_kind(k)][0]) for k, v in params.items()]


@pytest.mark.parametrize("opt", ["pycma", "cmaes"])
def test_warm_start_moves_the_cma_mean_to_the_recipe(world, tmp_path, opt):
    popsize = 6
    runs = {}
    for label, over in (("cold", {}), ("warm", {"warm_start": str(_warm_recipe(world, tmp_path))})):
        cfg = _config(world, tmp_path, optimizer={"name": opt, "popsize": popsize}, space=SPACE, budget={"trials": popsize + 1},
                      **over)
        rd = prepare_run(cfg, tmp_path / f"{opt}-{label}")
        run_search(rd, sphere)
        runs[label] = rd
    warm = _params_seq(runs["warm"])
    # trial 0 is the recipe itself, marked as the warm start
    assert set(map(_kind, warm[0])) == set(WARM)
    assert warm[0] == pytest.approx({k: WARM[_kind(k)] for k in warm[0]}, abs=1e-12)
    assert _study(runs["warm"]).trials[0].user_attrs.get("warm_start") is True
    # the rest of the first generation is drawn around the recipe (0.1 of each range), not around
    # the middle (0.5) where the cold run draws it
    def spread_centre(seq):
        us = [u for p in seq for u in _unit(p)]
        return sum(us) / len(us)

    first_gen = slice(1, popsize) if opt == "pycma" else slice(1, popsize + 1)
    assert spread_centre(warm[first_gen]) < 0.3
    assert spread_centre(_params_seq(runs["cold"])[0:popsize]) > 0.35


def test_warm_start_is_kept_in_the_study_and_a_resume_does_not_reread_the_recipe(world, tmp_path):
    recipe = _warm_recipe(world, tmp_path)
    whole = prepare_run(_config(world, tmp_path, optimizer={"name": "pycma", "popsize": 4}, space=SPACE, budget={"trials": 9},
                                warm_start=str(recipe)), tmp_path / "whole")
    run_search(whole, sphere)
    rd = prepare_run(_config(world, tmp_path, optimizer={"name": "pycma", "popsize": 4}, space=SPACE, budget={"trials": 3},
                             warm_start=str(recipe)), tmp_path / "part")
    run_search(rd, sphere)
    recipe.unlink()  # gone (or moved, or on another machine) by the time the run is resumed
    set_budget_trials(rd, 9)
    run_search(rd, sphere)
    assert _params_seq(rd) == _params_seq(whole)  # the same evolution, from the same start


def test_an_edited_warm_start_in_the_study_is_refused(world, tmp_path):
    rd = prepare_run(_config(world, tmp_path, optimizer={"name": "pycma", "popsize": 3}, space=SPACE, budget={"trials": 2},
                             warm_start=str(_warm_recipe(world, tmp_path))), tmp_path / "run")
    run_search(rd, sphere)
    study = _study(rd)
    stored = study.user_attrs[WARM_START_ATTR]
    assert set(stored) == set(_params_seq(rd)[0])
    study.set_user_attr(WARM_START_ATTR, {**stored, "../../etc": 1.0})
    set_budget_trials(rd, 4)
    with pytest.raises(MergelabError, match=rf"warm start \(user attribute `{WARM_START_ATTR}`\) that is not a value"):
        run_search(rd, sphere)
    assert rd.summary()["trials_done"] == 2
    assert json.loads(json.dumps(stored)) == stored
