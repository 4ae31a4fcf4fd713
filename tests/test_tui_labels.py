"""search/labels.py: the parameter labels every screen, the card and the Optuna study show."""
from __future__ import annotations

import json
from pathlib import Path

from search.labels import label_of, layer_span, param_label, param_labels, short_model_names
from search.space import ParamDef

FIX = Path(__file__).parent / "fixtures" / "tui"


def test_short_model_names_are_last_parts_lengthened_only_where_they_clash():
    refs = ["mergelab/demo/family/addition", "mergelab/demo/family/sort", "org/sort", "Qwen/Qwen2-0.5B"]
    assert short_model_names(refs) == ["addition", "family/sort", "org/sort", "Qwen2-0.5B"]
    assert short_model_names(["a/m/", "b/m"]) == ["a/m", "b/m"]
    assert short_model_names(["x/m", "x/m"]) == ["x/m#1", "x/m#2"]


def test_layer_span_follows_the_search_space_split():
    # 4 layers in 2 groups: 0-1, 2-3; 5 layers in 2 groups: 0-2, 3-4 (l * K // L)
    assert [layer_span(k, 4, 2) for k in range(2)] == [(0, 1), (2, 3)]
    assert [layer_span(k, 5, 2) for k in range(2)] == [(0, 2), (3, 4)]
    assert layer_span(2, 3, 3) == (2, 2)


def test_labels_of_a_run_directory_resolved_config():
    resolved = json.loads((FIX / "ties-search" / "resolved.json").read_text())
    labels = param_labels(resolved)
    assert labels["m0.weight.g0"] == "ft_math · weight · layers 0–1"
    assert labels["m2.density.g1"] == "ft_chat · density · layers 2–3"
    assert len(set(labels.values())) == len(labels) == len(resolved["params"])


def test_labels_of_every_kind_of_parameter():
    models = short_model_names(["fam/addition", "fam/sort"])
    kw = dict(models=models, num_layers=6, layer_groups=3, methods=["ties", "dare_ties"])
    assert param_label(ParamDef("m1.weight.mlp.g2", 0, 1, "model", "weight", 1, 2, "mlp"), **kw) == \
        "sort · weight · mlp · layers 4–5"
    assert param_label(ParamDef("m0.density.other.g0", 0, 1, "model", "density", 0, 0, "other"), **kw) == \
        "addition · density · other tensors · layers 0–1"
    assert param_label(ParamDef("m0.weight.io", 0, 1, "model", "weight", 0, None, "io"), **kw) == \
        "addition · weight · embeddings & head"
    assert param_label(ParamDef("m0.weight", 0, 1, "model", "weight", 0), **kw) == "addition · weight"
    assert param_label(ParamDef("lambda", 0, 1, "global", "lambda"), **kw) == "lambda"
    assert param_label(ParamDef("method", 0, 2, "method"), **kw) == "method (ties / dare_ties)"
    assert param_label(ParamDef("source.g1", 0, 3, "source", group=1), **kw) == "layer source · layers 2–3"
    assert param_label(ParamDef("fusion.tau", 0.1, 5, "fusion"), **kw) == "fusion · tau"


def test_compact_names_alone_still_read_as_labels():
    resolved = {"models": ["fam/addition", "fam/sort"], "num_layers": 4, "layer_groups": 2}
    assert label_of("m1.weight.g1", {}, resolved) == "sort · weight · layers 2–3"
    assert label_of("m0.weight.self_attn.g0", {}, resolved) == "addition · weight · self_attn · layers 0–1"
    assert label_of("m0.weight", {}, resolved) == "addition · weight"
    assert label_of("lambda", {}, resolved) == "lambda"
    assert label_of("m0.weight.g0", {"m0.weight.g0": "given"}) == "given"
    assert label_of("m0.weight.g0", {}) == "m0.weight.g0"  # nothing to read it against


def test_labels_of_a_space_object():
    from search.space import Space

    sp = Space(base_model="b", models=["x/a", "y/a"], methods=["ties"], num_layers=2, layer_groups=2,
               filters=[], io_names=[], io_group=False, layer_sources=False,
               params=[ParamDef("m0.weight.g1", 0, 1, "model", "weight", 0, 1),
                       ParamDef("m1.weight.g1", 0, 1, "model", "weight", 1, 1)])
    assert param_labels(sp) == {"m0.weight.g1": "x/a · weight · layer 1", "m1.weight.g1": "y/a · weight · layer 1"}
