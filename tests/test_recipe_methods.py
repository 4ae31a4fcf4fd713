"""The mergekit methods added for shared Hub recipes (sce, nuslerp, multislerp, karcher), checked
against hand-computed values; and the dtypes written into every recipe mergelab writes."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_llama
from mergelab.engine import merge_to_dir
from mergelab.errors import MergelabError
from mergelab.recipe import load_recipe
from operators import MergeInputs, get_operator


def _run(method, models, model_params, params=None, base=None, base_index=None):
    spec = get_operator(method)
    p = {s.name: s.default for s in spec.params if s.scope == "global"}
    p.update(params or {})
    mps = [{**{s.name: s.default for s in spec.params if s.scope == "model"}, **mp} for mp in model_params]
    return spec.fn(MergeInputs("model.layers.0.w", base, models, mps, p, base_index=base_index))


E0, E1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_nuslerp_orthogonal_midpoint_and_weights():
    out = _run("nuslerp", [E0, 3 * E1], [{"weight": 1.0}, {"weight": 1.0}])
    # Ω = π/2, t = 1/2: sin(π/4)/sin(π/2) on each unnormalized endpoint
    s = math.sin(math.pi / 4)
    assert torch.allclose(out, torch.tensor([s, 3 * s]), atol=1e-6)
    # t = w₂/(w₁+w₂) = 0.25 with a base: slerp of the task vectors, added to the base
    base = torch.tensor([5.0, 5.0])
    out = _run("nuslerp", [base + E0, base + E1], [{"weight": 3.0}, {"weight": 1.0}], base=base)
    th = math.pi / 2
    want = base + torch.tensor([math.sin(0.75 * th), math.sin(0.25 * th)])
    assert torch.allclose(out, want, atol=1e-6)


def test_nuslerp_row_wise_uses_columns():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    per_col = _run("nuslerp", [a, b], [{"weight": 1}, {"weight": 1}],
                   {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    s = math.sin(math.pi / 4)
    assert torch.allclose(per_col, torch.tensor([[s, 2 * s], [s, 2 * s]]), atol=1e-6)


def test_multislerp_two_orthogonal_and_single():
    out = _run("multislerp", [E0, E1], [{"weight": 1.0}, {"weight": 1.0}])
    # tangent vectors cancel; the result is the mean direction times the mean norm (1)
    assert torch.allclose(out, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    x = torch.tensor([2.0, -1.0])
    assert torch.equal(_run("multislerp", [x], [{"weight": 0.3}]), x)


def test_karcher_orthogonal_pair_and_base_counted():
    out = _run("karcher", [E0, 2 * E1], [{}, {}])
    # the Karcher mean of two orthogonal directions is their bisector; scale = mean norm 1.5
    assert torch.allclose(out, 1.5 * torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-5)
    # an unlisted base is one more input (mergekit's karcher ignores the base role)
    three = _run("karcher", [E0, E1], [{}, {}], base=-E0)
    assert torch.allclose(three, _run("karcher", [E0, E1, -E0], [{}, {}, {}]))


def test_sce_weights_by_mean_square_and_erases_minority_sign():
    base = torch.zeros(4)
    t1 = torch.tensor([2.0, 2.0, -2.0, 0.0])  # mean square 3
    t2 = torch.tensor([1.0, -1.0, -1.0, 1.0])  # mean square 1
    out = _run("sce", [base + t1, base + t2], [{}, {}], base=base)
    w1, w2 = 0.75, 0.25
    # entry 1: signs disagree, the sum (+1) elects +, so only model 1 counts
    want = torch.tensor([(w1 * 2 + w2 * 1) / (w1 + w2), 2.0, (w1 * -2 + w2 * -1) / (w1 + w2), 1.0])
    assert torch.allclose(out, want, atol=1e-6)


def test_sce_select_topk_keeps_highest_variance():
    base = torch.zeros(4)
    t1 = torch.tensor([4.0, 1.0, 1.0, 0.5])
    t2 = torch.tensor([0.0, 1.0, 1.0, 0.5])
    out = _run("sce", [t1, t2], [{}, {}], {"select_topk": 0.5}, base=base)
    # variance is non-zero at entry 0 only: k = int(1 · 0.5) = 0 keeps nothing
    assert torch.equal(out, base)
    out = _run("sce", [t1, torch.tensor([0.0, 3.0, 1.0, 0.5])], [{}, {}], {"select_topk": 1.0}, base=base)
    assert out[0] > 0 and out[1] > 0


@pytest.mark.parametrize("recipe, phrase", [
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "exactly 2"),
    ({"merge_method": "nuslerp", "models": [{"model": "a"}, {"model": "b"}]}, "needs `weight`"),
    ({"merge_method": "sce", "models": [{"model": "a"}]}, "needs `base_model`"),
    ({"merge_method": "karcher", "models": [{"model": "a"}], "parameters": {"max_iter": 0}}, "max_iter"),
])
def test_method_validation(recipe, phrase):
    with pytest.raises(MergelabError, match=phrase):
        load_recipe(recipe)


def test_nuslerp_base_does_not_count_as_model():
    r = load_recipe({"merge_method": "nuslerp", "base_model": "z", "models": [
        {"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]})
    assert r.all_refs() == ["z", "a", "b"]


def test_written_recipe_pins_compute_and_output_dtype(tmp_path):
    base = make_llama(tmp_path / "base", 0, dtype=torch.bfloat16)
    a = make_llama(tmp_path / "a", 1, base=base, dtype=torch.bfloat16)
    merge_to_dir({"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(a)}],
                  "parameters": {"weight": 1.0}}, tmp_path / "out", device="cpu")
    written = load_recipe(tmp_path / "out" / "mergelab_recipe.yaml")
    assert (written.dtype, written.out_dtype) == ("float32", "bfloat16")
    merge_to_dir({"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(a)}],
                  "parameters": {"weight": 1.0}, "dtype": "float16"}, tmp_path / "half", device="cpu")
    written = load_recipe(tmp_path / "half" / "mergelab_recipe.yaml")
    assert (written.dtype, written.out_dtype) == ("float32", "float16")  # computed in float32, written as asked
