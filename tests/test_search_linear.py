"""A linear search over fine-tunes lists the base with weight 0 (mergekit averages an unlisted
base_model in), so the candidate is the weighted average of the searched models only."""
from __future__ import annotations

import torch

from mergelab.trial import TrialMerger
from search.config import parse_search_config
from search.validate import validate_config

from conftest import load_dir


def test_linear_candidate_averages_only_the_searched_models(tiny_family, tmp_path):
    b, a, c = (str(tiny_family[k]) for k in ("base", "a", "b"))
    cfg = parse_search_config({
        "base_model": b, "models": [a, c], "method": "linear", "space": {"weight": [0, 1]},
        "eval": {"scorers": [{"name": "x", "type": "perplexity", "data": str(tmp_path / "t.txt")}]},
        "budget": {"trials": 2}}, "test config")
    cfg, space = validate_config(cfg, check_eval=False)
    rec = space.recipe({p.name: (0.25 if p.name.startswith("m0") else 0.75) for p in space.params})
    assert rec["models"][-1] == {"model": b, "parameters": {"weight": 0.0}}
    sd = TrialMerger(b, [a, c]).state_dict(rec)
    A, C = load_dir(tiny_family["a"]), load_dir(tiny_family["b"])
    for k in A:
        torch.testing.assert_close(sd[k], 0.25 * A[k] + 0.75 * C[k], rtol=0, atol=1e-6)
