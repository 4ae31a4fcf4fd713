"""The compiled task-vector loop (mergelab/_jit.py, numba) gives the torch kernels' float32 values
bit for bit, for every switch it handles, across block, slice and span boundaries."""
from __future__ import annotations

import pytest
import torch

import mergelab._fast as fast
from mergelab import _jit
from mergelab.trial import TrialMerger

from conftest import make_llama


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    # float32 checkpoints, tensors of 512 to 32,768 elements: several 2,048-element blocks each
    root = tmp_path_factory.mktemp("wide")
    kw = dict(hidden=64, vocab=512, dtype=torch.float32)
    base = make_llama(root / "base", 0, **kw)
    return [base] + [make_llama(root / f"ft{i}", i, base=base, scale=0.02, **kw) for i in (1, 2, 3)]


def _recipe(fam, method, weights, densities, params, n_models=3):
    models = []
    for k in range(n_models):
        p = {"weight": weights[k]}
        if method not in ("task_arithmetic",):
            p["density"] = densities[k]
        models.append({"model": str(fam[k + 1]), "parameters": p})
    return {"merge_method": method, "base_model": str(fam[0]), "models": models, "seed": 7,
            "parameters": params, "dtype": "float32"}


CASES = [
    ("ties", (0.6, 0.4, 0.9), (0.5, 0.7, 0.3), {"lambda": 1.0}),
    ("ties", (0.6, -0.4, 1.3), (0.2, 0.9, 0.45), {"lambda": 0.7, "normalize": False}),
    ("ties", (0.3, 0.3, 0.3), (0.5, 1.0, 0.05), {"lambda": 1.3, "rescale": True}),  # L1 rescale: masks
    ("task_arithmetic", (0.6, 0.4, -0.2), None, {"lambda": 0.9}),
    ("task_arithmetic", (0.5, -0.5, 0.0), None, {"normalize": True}),  # Σw = 0 -> divisor 1
    ("dare_ties", (0.6, 0.4, 0.9), (0.5, 0.7, 0.3), {}),  # L1 rescale (the default)
    ("dare_ties", (0.6, 0.4, 0.9), (0.5, 0.7, 0.3), {"rescale_inverse_density": True, "lambda": 1.1}),
    ("dare_linear", (0.6, 0.4, 0.9), (0.25, 0.66, 0.9), {"rescale": False}),
    ("dare_linear", (0.7, 0.2, 0.1), (0.3, 0.5, 0.8), {"normalize": True}),
]


def _merge(fam, recipe, jit: bool, monkeypatch) -> tuple[dict[str, torch.Tensor], int]:
    calls = []
    real = _jit.task_vector_pass

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(_jit, "AVAILABLE", jit)
        m.setattr(_jit, "task_vector_pass", counted)
        # small slices and spans, so boundaries fall inside every tensor
        m.setattr(fast, "CHUNK", 640)
        m.setattr(fast, "_JIT_SPAN", 4 * 640)
        tm = TrialMerger(str(fam[0]), [str(p) for p in fam[1:]])
        return tm.state_dict(recipe), len(calls)


@pytest.mark.parametrize("method,weights,densities,params", CASES)
def test_compiled_loop_equals_torch_kernels_bit_for_bit(wide_family, monkeypatch, method, weights,
                                                        densities, params):
    r = _recipe(wide_family, method, weights, densities, params)
    ref, ref_calls = _merge(wide_family, r, False, monkeypatch)
    got, calls = _merge(wide_family, r, True, monkeypatch)
    assert ref_calls == 0
    n_tensors = len(ref)
    # every tensor is merged by the compiled loop (norms are 64 elements: one span each)
    assert calls >= n_tensors
    for k in ref:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k].view(torch.int32), ref[k].view(torch.int32)), k


def test_direct_call_matches_hand_computed_ties():
    # one element per interesting case, 3 rows; weights 1, 2, 1; all kept (mode 0)
    tau = [torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([2.0, 1.0, -1.0, 0.0]),
           torch.tensor([-4.0, 1.0, -1.0, 0.0])]
    base = torch.tensor([10.0, 10.0, 10.0, 10.0])
    out = torch.empty(4)
    _jit.task_vector_pass(tau, [None] * 3, [0, 0, 0], [0.0] * 3, [0] * 3, [None] * 3, [None] * 3,
                          [1.0, 2.0, 1.0], True, True, None, 1.0, base, 0, 4, out)
    # entry 0: w·τ = 1, 4, -4 -> total 1 (+): rows 0, 1 agree -> (1 + 4) / (1 + 2)
    # entry 1: -1, 2, 1 -> +: rows 1, 2 -> (2 + 1) / (2 + 1) = 1
    # entry 2: 0.5, -2, -1 -> -: rows 1, 2 -> (-2 - 1) / 3 = -1
    # entry 3: all zero -> nothing agrees, divisor 0 -> 1, mixed 0
    assert out.tolist() == pytest.approx([10 + 5 / 3, 11.0, 9.0, 10.0], abs=0, rel=1e-7)
    # the threshold rule: keep |τ| > 0.75, or == 0.75 up to flat index 1 (mode 1, cutoff 1)
    t = [torch.tensor([0.75, 0.75, 0.5, -2.0])]
    _jit.task_vector_pass(t, [None], [1], [0.75], [1], [None], [None], [1.0], False, False, None,
                          1.0, torch.zeros(4), 0, 4, out)
    assert out.tolist() == [0.75, 0.75, 0.0, -2.0]
    _jit.task_vector_pass(t, [None], [1], [0.75], [0], [None], [None], [1.0], False, False, None,
                          1.0, torch.zeros(4), 0, 4, out)
    assert out.tolist() == [0.75, 0.0, 0.0, -2.0]
