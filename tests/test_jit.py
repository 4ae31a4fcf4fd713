"""The compiled loops (mergelab/kernels/jit_*.py and mt19937.py, numba) give the torch kernels' float32
values bit for bit, for every switch it handles, across block, slice and span boundaries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.kernels import (cached, jit_core, jit_dare, jit_dare16, jit_linear, jit_taskvec, jit_topk, mt19937,
                              taskvec_torch)
from mergelab.kernels import inputs as kinputs
from mergelab.trial import TrialMerger
from operators import get_operator

from conftest import make_llama


@pytest.fixture(autouse=True)
def compiled_on(monkeypatch):
    """These tests exercise the compiled loops themselves (numba is in the dev extra), also when
    the suite runs with MERGELAB_JIT=0; a test that compares both paths sets AVAILABLE itself."""
    monkeypatch.setattr(jit_core, "AVAILABLE", True)


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

    def counted(real):
        def call(*a, **k):
            calls.append(1)
            return real(*a, **k)
        return call

    with monkeypatch.context() as m:
        m.setattr(jit_core, "AVAILABLE", jit)
        m.setattr(jit_taskvec, "task_vector_pass", counted(jit_taskvec.task_vector_pass))
        m.setattr(jit_taskvec, "uniform_pass", counted(jit_taskvec.uniform_pass))
        m.setattr(jit_dare, "dare_pass", counted(jit_dare.dare_pass))
        m.setattr(jit_taskvec, "cut_pass", counted(jit_taskvec.cut_pass))
        m.setattr(jit_taskvec, "CUT_ONE_CALL", 4096)  # tensors on both sides: one call, and pieces
        # small slices and spans, so boundaries fall inside every tensor
        m.setattr(kinputs, "CHUNK", 640)
        m.setattr(cached, "_JIT_SPAN", 4 * 640)
        tm = TrialMerger(str(fam[0]), [str(p) for p in fam[1:]], cache="fast")
        return tm.state_dict(recipe), len(calls)


@pytest.mark.parametrize("method,weights,densities,params", CASES)
def test_compact_cache_equals_fast_cache_bit_for_bit(wide_family, monkeypatch, method, weights, densities,
                                                     params):
    # the compact cache (sources as stored, derivations per candidate) gives the fast tier's values
    r = _recipe(wide_family, method, weights, densities, params)
    fast_out, _ = _merge(wide_family, r, True, monkeypatch)
    monkeypatch.setattr(kinputs, "CHUNK", 640)
    tm = TrialMerger(str(wide_family[0]), [str(p) for p in wide_family[1:]], cache="compact")
    got = tm.state_dict(r)
    assert set(tm._tiers.values()) == {"stored"} and not tm._deltas and not tm._order
    for k in fast_out:
        assert torch.equal(got[k].view(torch.int32), fast_out[k].view(torch.int32)), k


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
    jit_taskvec.task_vector_pass(tau, [None] * 3, [0, 0, 0], [0.0] * 3, [0] * 3, [None] * 3, [None] * 3,
                                 [1.0, 2.0, 1.0], True, True, None, 1.0, base, 0, 4, out)
    # entry 0: w·τ = 1, 4, -4 -> total 1 (+): rows 0, 1 agree -> (1 + 4) / (1 + 2)
    # entry 1: -1, 2, 1 -> +: rows 1, 2 -> (2 + 1) / (2 + 1) = 1
    # entry 2: 0.5, -2, -1 -> -: rows 1, 2 -> (-2 - 1) / 3 = -1
    # entry 3: all zero -> nothing agrees, divisor 0 -> 1, mixed 0
    assert out.tolist() == pytest.approx([10 + 5 / 3, 11.0, 9.0, 10.0], abs=0, rel=1e-7)
    # the threshold rule: keep |τ| > 0.75, or == 0.75 up to flat index 1 (mode 1, cutoff 1)
    t = [torch.tensor([0.75, 0.75, 0.5, -2.0])]
    jit_taskvec.task_vector_pass(t, [None], [1], [0.75], [1], [None], [None], [1.0], False, False, None,
                                 1.0, torch.zeros(4), 0, 4, out)
    assert out.tolist() == [0.75, 0.75, 0.0, -2.0]
    jit_taskvec.task_vector_pass(t, [None], [1], [0.75], [0], [None], [None], [1.0], False, False, None,
                                 1.0, torch.zeros(4), 0, 4, out)
    assert out.tolist() == [0.75, 0.0, 0.0, -2.0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _awkward(n: int, seed: int) -> torch.Tensor:
    """Random task-vector-like values with exact zeros, negative zeros, repeated magnitudes (ties),
    float16-subnormal-sized and float16-overflowing entries; n not a multiple of any slice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::13] = 0.015625  # one magnitude, both signs: ties at a threshold
    x[6::13] = -0.015625
    x[9::17] = torch.randn(len(x[9::17]), generator=g) * 3e-6  # float16 subnormals
    x[10::101] = 70000.0  # past float16's largest finite value
    return x


N_ODD = 2 * 65536 + 2048 * 3 + 37  # spans several slices and blocks, ends in a partial vector


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_pass_equals_weighted_sum_then_cast(out_dtype, normalize):
    from operators.linear import weighted_sum_

    xs = [_awkward(N_ODD, s) for s in (1, 2, 3)]
    w = torch.tensor([0.3, -0.25, 0.45])
    ref = weighted_sum_(torch.empty(N_ODD), xs, w, normalize).to(out_dtype).float()
    out = torch.full((N_ODD,), 123.0)
    jit_linear.linear_pass(xs, w.numpy(), normalize, float(w.sum(dim=0)), jit_core.round_mode(out_dtype), out)
    assert torch.equal(_bits(out), _bits(ref))
    # one model: the pass is 0 + x·w (/ w)
    one = weighted_sum_(torch.empty(N_ODD), xs[:1], w[:1], normalize).to(out_dtype).float()
    jit_linear.linear_pass(xs[:1], w[:1].numpy(), normalize, float(w[0]), jit_core.round_mode(out_dtype), out)
    assert torch.equal(_bits(out), _bits(one))


def test_output_rounding_hand_computed():
    # float16 has 10 mantissa bits: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 (ties to even:
    # 1), 1 + 3·2^-11 halfway between 1 + 2^-10 and 1 + 2^-9 (even: up); 65519 rounds to 65504
    # and 65520 overflows; subnormals are steps of 2^-24: 2^-25 ties to 0, 3·2^-25 to 2^-23
    vals = [1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 2**-25, 3 * 2**-25, -0.0, -(1 + 2**-11)]
    # (-0.0 comes out +0.0: the pass starts its sum at +0, as weighted_sum_ does)
    want = [1.0, 1 + 2**-9, 65504.0, float("inf"), 0.0, 2**-23, 0.0, -1.0]
    x = torch.tensor(vals)
    out = torch.empty(len(vals))
    jit_linear.linear_pass([x], np.ones(1, np.float32), False, 1.0, jit_core.ROUND_F16, out)
    assert out.tolist() == want
    assert torch.equal(_bits(out), _bits(torch.tensor(want)))
    assert torch.equal(_bits(out), _bits((0.0 + torch.tensor(vals)).to(torch.float16).float()))
    # a negative value rounding to zero keeps its sign
    jit_linear.linear_pass([torch.tensor([-(2**-26)])], np.ones(1, np.float32), False, 1.0, jit_core.ROUND_F16, out[:1])
    assert _bits(out[:1]).item() == _bits(torch.tensor([-0.0])).item()
    # bfloat16 keeps 7 mantissa bits: 1 + 2^-8 ties to 1, 1 + 3·2^-8 to 1 + 2^-6
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -3.0])
    out = torch.empty(3)
    jit_linear.linear_pass([x], np.ones(1, np.float32), False, 1.0, jit_core.ROUND_BF16, out)
    assert out.tolist() == [1.0, 1 + 2**-6, -3.0]


def _tv_reference(method, deltas, rows, weights, params, base):
    """The torch kernels' result for already-built rows (taskvec_torch.Row), as float32."""
    from operators.task_vectors import combine_, task_weights

    n = base.numel()
    stack = torch.empty(len(rows), n)
    ws = kinputs.Workspace()
    for k, (row, x) in enumerate(zip(rows, deltas)):
        row.apply_(x.clone(), stack[k], 0, n, ws)
    w = task_weights([{"weight": v} for v in weights], list(range(len(rows))), stack)
    return combine_(method, stack, w, base.clone(), params)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method_name", ["ties", "dare_ties", "dare_linear"])
def test_uniform_passes_equal_torch_kernels(method_name, out_dtype, monkeypatch):
    method = get_operator(method_name).task_vector
    deltas = [_awkward(N_ODD, s) for s in (4, 5, 6)]
    base = _awkward(N_ODD, 7) + 0.5
    weights = [0.6, -0.4, 1.3]
    params = {"normalize": method_name != "dare_linear", "lambda": 0.7}
    rows = []
    g = torch.Generator().manual_seed(3)
    for i, x in enumerate(deltas):
        if method_name == "ties":
            a = x.abs()
            order = torch.sort(a, descending=True, stable=True).indices
            k = int((0.3 + 0.2 * i) * N_ODD)
            c = int(order[k - 1])
            rows.append(taskvec_torch.Row(i, rule=kinputs.CutRule(a[c], c)))
        else:
            mask = torch.rand(N_ODD, generator=g) < 0.4 + 0.2 * i
            factor = torch.tensor(1.7 + i, dtype=torch.float32) if i != 1 else None
            rows.append(taskvec_torch.Row(i, mask=mask, factor=factor))
    ref = _tv_reference(method, deltas, rows, weights, params, base).to(out_dtype).float()
    lin_div = None
    if not method.consensus:
        from operators.task_vectors import plain_divisor, task_weights

        lin_div = plain_divisor(task_weights([{"weight": v} for v in weights], [0, 1, 2], torch.empty(3, 1)))
    cut = [r.rule.cutoff for r in rows] if method_name == "ties" else None
    thr = [float(r.rule.threshold) for r in rows] if method_name == "ties" else None
    masks = None if method_name == "ties" else [r.mask for r in rows]
    fac = [1.0 if r.factor is None else float(r.factor) for r in rows]
    out = torch.empty(N_ODD)
    # whole tensor, and in two spans split at an odd place (indices relative to each span)
    jit_taskvec.uniform_pass(deltas, masks, thr, cut, fac, weights, method.consensus, params["normalize"], lin_div,
                             params["lambda"], base, 0, N_ODD, jit_core.round_mode(out_dtype), out)
    assert torch.equal(_bits(out), _bits(ref))
    split = 65536 + 1001
    out2 = torch.empty(N_ODD)
    for s, e in ((0, split), (split, N_ODD)):
        jit_taskvec.uniform_pass(deltas, masks, thr, cut, fac, weights, method.consensus, params["normalize"],
                                 lin_div, params["lambda"], base, s, e, jit_core.round_mode(out_dtype), out2[s:e])
    assert torch.equal(_bits(out2), _bits(ref))
    if method_name == "ties":  # the whole-tensor pass: one call with the cutoffs inside, or pieces
        for limit in (N_ODD, 0):
            monkeypatch.setattr(jit_taskvec, "CUT_ONE_CALL", limit)
            out3 = torch.empty(N_ODD)
            jit_taskvec.cut_pass(tuple(x.numpy() for x in deltas), thr, cut, weights, method.consensus,
                                 params["normalize"], lin_div, params["lambda"], base.numpy(),
                                 jit_core.round_mode(out_dtype), out3.numpy())
            assert torch.equal(_bits(out3), _bits(ref)), limit


@pytest.mark.parametrize("limit", [100, 0])
def test_cut_pass_keeps_ties_up_to_the_cutoff_hand_computed(limit, monkeypatch):
    # one row, weight 1, no λ: the output is the kept entries. The top 3 of |x| are 3 and the
    # first two 2s in flat order (threshold 2, cutoff at flat index 2); the later 2s are dropped
    monkeypatch.setattr(jit_taskvec, "CUT_ONE_CALL", limit)
    x = np.array([3, -2, 2, 2, -2, 1, 0, 2], np.float32)
    base = np.full(8, 10, np.float32)
    out = np.empty(8, np.float32)
    jit_taskvec.cut_pass((x,), [2.0], [2], [1.0], True, True, None, 1.0, base, jit_core.ROUND_NONE, out)
    assert out.tolist() == [13, 8, 12, 10, 10, 10, 10, 10]
    # two rows, weights 1 and 1, consensus with normalize: where both keep the same sign the mean,
    # where they disagree the elected sign's entry (the total's sign), where none keeps, the base
    y = np.array([1, 2, -4, 0, 0, 0, 0, 0], np.float32)  # top 2: -4 and 2 (threshold 2, cutoff 1)
    jit_taskvec.cut_pass((x, y), [2.0, 2.0], [2, 1], [1.0, 1.0], True, True, None, 1.0, base, jit_core.ROUND_NONE, out)
    # index 0: x keeps 3, y drops 1 -> 3; index 1: -2 and 2, total 0 -> positive sign elected, 2;
    # index 2: 2 and -4, total -2 -> -4
    assert out.tolist() == [13, 12, 6, 10, 10, 10, 10, 10]


@pytest.mark.parametrize("n", [1, 5, 8, 31, 32, 33, 100, 4096 + 40, 8 * 4 * 16 * 16 + 8 * 3 + 5, N_ODD, 600_007])
def test_dare_mask_l1_equals_mask_then_torch_sum(n):
    from operators.sparsify import l1_norm_of_abs

    g = torch.Generator().manual_seed(n)
    tau = _awkward(n, n + 1) * torch.rand(n, generator=g).pow(6) * 100  # wide range: the order shows
    u = torch.rand(n, generator=g)
    for density in (0.05, 0.5, 0.97):
        mask = torch.ones(n, dtype=torch.bool)
        got = jit_dare.dare_mask_l1(u, tau, density, mask)
        want_mask = u < density
        want = l1_norm_of_abs(tau.abs().mul_(want_mask))
        if jit_dare.sum_lanes() is None:  # a torch whose sum order the pass cannot reproduce
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.item() == want.item(), (n, density)
        assert torch.equal(mask, want_mask)
    # the summation order matters: a plain sequential float32 sum differs on the largest case
    if n == 600_007 and jit_dare.sum_lanes() is not None:
        seq = np.cumsum(tau.abs().mul_(u < 0.5).numpy(), dtype=np.float32)[-1]  # left to right
        assert seq != jit_dare.dare_mask_l1(u, tau, 0.5, torch.empty(n, dtype=torch.bool)).item()


@pytest.mark.parametrize("n", [2, 17, 1000, N_ODD])
def test_top_k_cut_is_the_exact_kth_largest_and_its_tie_cutoff(n):
    from operators import sparsify as sp

    # float16-rounded magnitudes: many exact ties, zeros (from 0 and -0) and one repeated value
    a = _awkward(n, n).half().float().abs()
    for k in sorted({1, 2, n // 3 + 1, n // 2, n - 1} - {0, n}):
        thr, cut = jit_topk.top_k_cut(a, k)
        want = torch.kthvalue(a, n - k + 1).values
        assert thr.item() == want.item() == sp.kth_largest(a, k)[0].item()
        mask = (a > thr) | ((a == thr) & (torch.arange(n) <= cut))
        assert int(mask.sum()) == k
        assert torch.equal(mask, sp.top_k_mask(a, k))


def test_disk_ties_with_and_without_compiled_loop_bit_for_bit(wide_family, tmp_path, monkeypatch):
    from mergelab.engine import merge_to_dir

    from conftest import load_dir

    r = _recipe(wide_family, "ties", (0.6, -0.4, 1.3), (0.2, 0.9, 0.45), {"lambda": 0.7})
    r["dtype"] = "float16"
    out = {}
    calls = []
    real = jit_topk.top_k_cut

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for jit in (False, True):
        with monkeypatch.context() as m:
            m.setattr(jit_core, "AVAILABLE", jit)
            m.setattr(jit_topk, "top_k_cut", counted)
            m.setattr(kinputs, "CHUNK", 640)  # slice boundaries inside every tensor
            merge_to_dir(r, tmp_path / f"out{jit}")
        out[jit] = load_dir(tmp_path / f"out{jit}")
        assert (len(calls) > 0) == jit  # the compiled selection ran only when asked
    assert out[True].keys() == out[False].keys()
    for k in out[False]:
        assert torch.equal(out[True][k].view(torch.int16), out[False][k].view(torch.int16)), k


@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_linear_pass_over_16_bit_sources_equals_float32_sources(src_dtype, out_dtype):
    from operators.linear import weighted_sum_

    xs = [_awkward(N_ODD, s).to(src_dtype) for s in (11, 12, 13)]
    w = torch.tensor([0.5, 0.3, 0.2])
    ref = weighted_sum_(torch.empty(N_ODD), [x.float() for x in xs], w, True).to(out_dtype).float()
    out = torch.empty(N_ODD)
    jit_linear.linear_pass(xs, w.numpy(), True, float(w.sum(dim=0)), jit_core.round_mode(out_dtype), out)
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("seed", [0, 5489, 123456789, (1 << 62) + 4321])
def test_mt_stream_is_the_torch_generator_stream(seed):
    # the compiled mt19937 gives float32 uniform_'s numbers, continued across calls of any length
    # (a draw that ends inside the 624-word state, one that ends on its boundary, a long one)
    assert mt19937.mt_matches()
    g = torch.Generator().manual_seed(seed)
    s = mt19937.MTStream(seed)
    for n in (1, 622, 1, 624, 1248, 5, 100_003):
        want = torch.empty(n).uniform_(generator=g)
        got = s.uniform_into(torch.empty(n))
        assert torch.equal(_bits(got), _bits(want)), (seed, n)
    # masks continue the same stream; densities whose float32 rounding lies just below / above
    # a multiple of 2^-24 (the uniforms' grid), where comparing in float64 would differ
    for n, d in ((700, 0.5 + 0.3 / 2**24), (3000, 0.5 + 0.7 / 2**24), (625, 0.05), (77, 0.999)):
        want = torch.lt(torch.empty(n).uniform_(generator=g), d)
        got = s.mask_into(d, torch.empty(n, dtype=torch.bool))
        assert torch.equal(got, want), (seed, n, d)


def test_mt_stream_hand_checked_first_words():
    # mt19937 seeded with 5489 (the reference implementation's default): first outputs 3499211612
    # and 581869302; float32 uniform_ keeps the low 24 bits and scales by 2^-24
    s = mt19937.MTStream(5489)
    got = s.uniform_into(torch.empty(2))
    assert got.tolist() == [(3499211612 & 0xFFFFFF) / 2**24, (581869302 & 0xFFFFFF) / 2**24]


@pytest.mark.parametrize("n", [1, 3, 8, 33, 4096 + 40, 8 * 4 * 16 * 16 + 8 * 3 + 5, N_ODD, 600_007])
def test_l1_pair_equals_torch_sums_of_abs_and_masked_abs(n):
    from operators.sparsify import l1_norm_of_abs

    g = torch.Generator().manual_seed(n + 3)
    tau = _awkward(n, n + 2) * torch.rand(n, generator=g).pow(6) * 100  # wide range: the order shows
    mask = torch.rand(n, generator=g) < 0.4
    got = jit_dare.l1_pair(tau, mask)
    if jit_dare.sum_lanes() is None:
        assert got is None
        return
    before, after = got
    assert before.dtype == after.dtype == torch.float32
    assert before.item() == l1_norm_of_abs(tau.abs()).item()
    assert after.item() == l1_norm_of_abs(tau.abs().mul_(mask)).item()
    if n == 600_007:  # a plain left-to-right float32 sum differs: the order is torch's
        assert np.cumsum(tau.abs().numpy(), dtype=np.float32)[-1] != before.item()


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {}),  # L1 rescale: draws, both norms and the merge compiled
    ("dare_linear", {"rescale": False}),
    ("dare_ties", {"rescale_inverse_density": True, "lambda": 1.1}),
    ("ties", {"rescale": True}),  # TIES with L1 rescale: full masks, the compiled masked loop
])
def test_disk_dare_with_and_without_compiled_loops_bit_for_bit(wide_family, tmp_path, monkeypatch,
                                                               method, params):
    from mergelab.engine import merge_to_dir

    from conftest import load_dir

    r = _recipe(wide_family, method, (0.6, -0.4, 1.3), (0.2, 0.9, 0.45), params)
    r["dtype"] = "float16"
    r["rng"] = "mergekit"  # the compiled mt19937 draws serve mergekit's stream
    out = {}
    streams = []
    real = mt19937.MTStream

    class Counted(real):
        def __init__(self, seed):
            streams.append(seed)
            super().__init__(seed)

    for jit in (False, True):
        with monkeypatch.context() as m:
            m.setattr(jit_core, "AVAILABLE", jit)
            m.setattr(mt19937, "MTStream", Counted)
            m.setattr(kinputs, "CHUNK", 640)  # slice boundaries inside every tensor
            merge_to_dir(r, tmp_path / f"out{jit}")
        out[jit] = load_dir(tmp_path / f"out{jit}")
        assert (len(streams) > 0) == (jit and method != "ties")  # compiled draws only when asked
    for k in out[False]:
        assert torch.equal(out[True][k].view(torch.int16), out[False][k].view(torch.int16)), k


@pytest.mark.parametrize("n", [5, 1000, N_ODD])
@pytest.mark.parametrize("method_name", ["dare_ties", "dare_linear"])
def test_dare_pass_equals_masks_norms_then_uniform_pass(n, method_name):
    from operators.sparsify import l1_norm_of_abs
    from operators.task_vectors import plain_divisor, task_weights

    method = get_operator(method_name).task_vector
    g = torch.Generator().manual_seed(n)
    deltas = [_awkward(n, s) for s in (21, 22, 23)]
    deltas[2] = torch.randn(n, generator=g) * 1e-13  # ‖τ‖₁ below sparsify's epsilon: this row is not rescaled
    us = [torch.rand(n, generator=g) for _ in deltas]
    base = _awkward(n, 24) + 0.25
    densities, weights = (0.3, 0.55, 0.8), [0.6, -0.4, 1.3]
    l1 = [l1_norm_of_abs(d.abs()) for d in deltas]
    lin_div = None if method.consensus else plain_divisor(
        task_weights([{"weight": v} for v in weights], [0, 1, 2], torch.empty(3, 1)))
    masks = [u < d for u, d in zip(us, densities)]
    fac = []
    for x, m, b in zip(deltas, masks, l1):
        f = taskvec_torch.l1_ratio(b, l1_norm_of_abs(x.abs().mul_(m)))
        fac.append(1.0 if f is None else float(f))
    assert fac[2] == 1.0 and (n < 100 or fac[0] != 1.0)
    for out_dtype in (torch.float32, torch.float16):
        rmode = jit_core.round_mode(out_dtype)
        want = torch.empty(n)
        jit_taskvec.uniform_pass(deltas, masks, None, None, fac, weights, method.consensus, True, lin_div, 0.9, base,
                                 0, n, rmode, want)
        got = torch.empty(n)
        ms = tuple(np.empty(n, np.uint8) for _ in deltas)
        ok = jit_dare.dare_pass(tuple(u.numpy() for u in us), tuple(x.numpy() for x in deltas), list(densities),
                                tuple(np.float32(b.item()) for b in l1), ms, weights, method.consensus, True, lin_div,
                                0.9, base.numpy(), rmode, got.numpy())
        if jit_dare.sum_lanes() is None:
            assert not ok
            return
        assert ok and torch.equal(_bits(got), _bits(want)), out_dtype
        assert all(np.array_equal(m_got.astype(bool), m.numpy()) for m_got, m in zip(ms, masks))


@pytest.mark.parametrize("n", [1, 7, 8, 33, 65536 + 77, 3 * 65536, 600_007])
def test_l1_stream_fed_slice_by_slice_equals_the_whole_tensor_pair(n):
    # the cascade's state carried across slices of 64, 640 and 65,536 elements gives the sums of
    # l1_pair over the whole tensor, hence torch's
    from operators.sparsify import l1_norm_of_abs

    if jit_dare.sum_lanes() is None:
        pytest.skip("this torch's sum order is not reproduced: the streamed pass is not used")
    g = torch.Generator().manual_seed(n + 9)
    tau = _awkward(n, n + 4) * torch.rand(n, generator=g).pow(6) * 100
    mask = torch.rand(n, generator=g) < 0.55
    want = (l1_norm_of_abs(tau.abs()).item(), l1_norm_of_abs(tau.abs().mul_(mask)).item())
    for chunk in (64, 640, 65536):
        st = jit_dare.L1Stream(n)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            got = st.feed(tau[s:e], mask[s:e], s)
            assert (got is None) == (e < n)
        assert (got[0].item(), got[1].item()) == want, chunk


def test_mt_stream_copy_draws_the_same_numbers_independently():
    s = mt19937.MTStream(99)
    s.uniform_into(torch.empty(1000))  # inside the 624-word state
    c = s.copy()
    a = s.uniform_into(torch.empty(2000))
    b = c.uniform_into(torch.empty(2000))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(99)
    torch.empty(1000).uniform_(generator=g)
    assert torch.equal(a, torch.empty(2000).uniform_(generator=g))


@pytest.mark.parametrize("rng", ["mergekit", None])
def test_disk_dare_holds_no_whole_tensor_mask_or_task_vector(wide_family, tmp_path, monkeypatch, rng):
    # DARE with L1 rescale from disk: τ and the masks go slice by slice (norms streamed, masks
    # redrawn), so the workspace holds slices only, whatever the tensor size
    from mergelab import engine

    seen = []
    real = kinputs.Workspace

    class Watched(real):
        def __init__(self):
            super().__init__()
            seen.append(self)

    monkeypatch.setattr(kinputs, "Workspace", Watched)
    monkeypatch.setattr(kinputs, "CHUNK", 640)
    r = _recipe(wide_family, "dare_ties", (0.6, 0.4, 0.9), (0.5, 0.7, 0.3), {})
    if rng:
        r["rng"] = rng  # either stream: norms streamed, masks redrawn slice by slice
    engine.merge_to_dir(r, tmp_path / "out")
    bufs = seen[0]._bufs
    assert bufs and all(k == ("result", torch.float32) or t.numel() <= 3 * 640 for k, t in bufs.items()), \
        {k: t.numel() for k, t in bufs.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 31, 33, 100, 8 * 4 * 16 * 16 + 8 * 3 + 5, N_ODD])
def test_dare16_pass_equals_float32_dare_pass(dtype, n):
    # the 16-bit pass (sources as stored, 1-byte draw keys fixed up per density) against dare_pass
    # on the widened task vectors and the float32 draws: same masks, norms, factors, values
    from operators.sparsify import l1_norm_of_abs

    g = torch.Generator().manual_seed(n)
    b16 = (torch.randn(n, generator=g) * 0.5).to(dtype)
    m16 = [(b16.float() + _awkward(n, n + r)).to(dtype) for r in range(3)]
    us = [torch.rand(n, generator=g) for _ in range(3)]
    keys = [jit_dare16.DrawKeys(u) for u in us]
    base = b16.float()
    xs = tuple((m.float() - base).numpy() for m in m16)
    l1 = tuple(np.float32(l1_norm_of_abs(torch.abs(torch.from_numpy(x))).item()) for x in xs)
    masks = tuple(np.empty(n, np.uint8) for _ in range(3))
    # densities on either side of the draws' 2^-24 grid, tiny, zero, just below 1, repeated
    for dens, common in (
        ((0.5 + 0.3 / 2**24, 0.3, 0.9), dict(weights=[0.5, 0.7, 0.3], consensus=True, normalize=True,
                                             lin_div=None, lam=1.1)),
        ((1e-3, 0.5 + 0.7 / 2**24, 1 - 2**-25), dict(weights=[0.5, -0.7, 0.3], consensus=False, normalize=True,
                                                     lin_div=torch.tensor(0.1), lam=1.0)),
        ((1e-9, 0.0, 0.2), dict(weights=[1.0, 1.0, 1.0], consensus=True, normalize=False, lin_div=None, lam=0.5)),
        ((0.3, 0.3, 0.3), dict(weights=[0.2, 0.2, 0.6], consensus=True, normalize=True, lin_div=None, lam=1.0)),
    ):
        for rmode in (jit_core.ROUND_NONE, jit_core.ROUND_F16, jit_core.ROUND_BF16):
            want = np.empty(n, np.float32)
            got = np.empty(n, np.float32)
            assert jit_dare.dare_pass(tuple(u.numpy() for u in us), xs, list(dens), l1, masks, base=base.numpy(),
                                      rmode=rmode, out=want, **common)
            assert jit_dare16.dare16_pass(tuple(jit_core.bits16(m) for m in m16), jit_core.bits16(b16), keys,
                                          list(dens), [float(v) for v in l1], rmode=rmode, out=got, **common)
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (dens, rmode)
            for r, k in enumerate(keys):  # the fixed-up keys select exactly u < float32(density)
                assert np.array_equal(k.key < k.fix(dens[r]), masks[r].astype(bool))
    for u, k in zip(us, keys):  # restore gives back every key as k >> 16
        k.restore()
        assert np.array_equal(k.key, ((u.numpy() * 2**24).astype(np.int64) >> 16).astype(np.uint8))


def test_draw_keys_bucket_fix_by_hand():
    # draws k·2^-24 with k = 0x020005, 0x020009, 0x010000, 0x000003, 0x000001: keys 2, 2, 1, 0, 0
    k = np.array([0x020005, 0x020009, 0x010000, 0x000003, 0x000001])
    keys = jit_dare16.DrawKeys(torch.from_numpy((k / 2**24).astype(np.float32)))
    assert keys.key.tolist() == [2, 2, 1, 0, 0]
    assert keys.offs[:4].tolist() == [0, 2, 3, 5] and keys.pos[:5].tolist() == [3, 4, 2, 0, 1]
    t = keys.fix(0x020007 / 2**24)  # K = 0x020007: keeps k < K, the first of bucket 2 only
    assert t == 2 and keys.key.tolist() == [1, 2, 1, 0, 0]
    t = keys.fix(0x000002 / 2**24)  # bucket 0: only k = 1 kept; bucket 2's fix left (T = 1 reads it right)
    assert t == 1 and keys.key.tolist() == [1, 2, 1, 1, 0]
    t = keys.fix(0x010001 / 2**24)  # bucket 1 fixed (k = 0x010000 kept), bucket 0 made clean for T = 1
    assert t == 1 and keys.key.tolist() == [1, 2, 0, 0, 0]
    t = keys.fix(0x020009 / 2**24)  # bucket 2 from limit 7 to 9: no low bits in [7, 9), nothing written
    assert t == 2 and keys.key.tolist() == [1, 2, 0, 0, 0]
    assert jit_dare16.key_limit(0x000002 / 2**24) == 2 and jit_dare16.key_limit(1.0) == 2**24
    assert keys.fix(1.0) == 256 and keys.key.tolist() == [1, 2, 0, 0, 0]  # all kept, nothing fixed
    keys.restore()
    assert keys.key.tolist() == [2, 2, 1, 0, 0] and keys.fix(0.0) == 1 and keys.key.tolist() == [2, 2, 1, 1, 1]


def test_draw_keys_fix_sequences_select_exactly_u_below_t():
    # random thresholds, many on the buckets 0 and 1 and on a draw's own value, in sequence: after
    # every fix key < T is exactly u < float32(t), whatever earlier fixes left
    g = torch.Generator().manual_seed(11)
    k = torch.randint(0, 2**24, (5000,), generator=g)
    k[:600] = torch.randint(0, 2**17, (600,), generator=g)  # crowd the buckets 0 and 1
    u = (k.double() / 2**24).float()
    keys = jit_dare16.DrawKeys(u)
    rng = np.random.default_rng(3)
    for step in range(300):
        c = rng.integers(0, 4)
        t = (float(rng.integers(0, 2**17)) if c < 2 else float(k[rng.integers(0, len(k))]) + c - 2) / 2**24 \
            if c < 3 else float(rng.random())
        got = keys.key < keys.fix(t)
        assert np.array_equal(got, (u < np.float32(t)).numpy()), (step, t)
    keys.restore()
    assert np.array_equal(keys.key, (k >> 16).numpy().astype(np.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 33, 4096 + 40, N_ODD])
def test_cut16_pass_equals_float32_cut_pass(dtype, n):
    # TIES from the 16-bit sources as stored against cut_pass on the widened task vectors: thresholds
    # at real magnitudes with ties kept up to each row's cutoff, cutoffs on either side of the pieces
    g = torch.Generator().manual_seed(n)
    b16 = (torch.randn(n, generator=g) * 0.5).to(dtype)
    m16 = [(b16.float() + _awkward(n, n + r)).to(dtype) for r in range(3)]
    base = b16.float()
    xs = tuple((m.float() - base).numpy() for m in m16)
    for k_frac, common in ((0.5, dict(weights=[0.5, 0.7, 0.3], consensus=True, normalize=True, lin_div=None, lam=1.1)),
                           (0.2, dict(weights=[0.5, -0.7, 0.3], consensus=False, normalize=True,
                                      lin_div=torch.tensor(0.1), lam=1.0))):
        thr, cut = [], []
        for x in xs:
            t, c = jit_topk.top_k_cut(torch.from_numpy(np.abs(x)).contiguous(), max(1, int(k_frac * n))) if n > 1 \
                else (torch.tensor(0.0), 0)
            thr.append(float(t))
            cut.append(int(c))
        for rmode in (jit_core.ROUND_NONE, jit_core.ROUND_F16, jit_core.ROUND_BF16):
            want = np.empty(n, np.float32)
            got = np.empty(n, np.float32)
            jit_taskvec.cut_pass(xs, thr, cut, base=base.numpy(), rmode=rmode, out=want, **common)
            jit_taskvec.cut16_pass(tuple(jit_core.bits16(m) for m in m16), jit_core.bits16(b16), thr, cut,
                                   rmode=rmode, out=got, **common)
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (k_frac, rmode)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_disk_counter_dare_streamed_equals_torch_and_trial(wide_family, tmp_path, monkeypatch, method):
    # the counter stream from disk: compiled, slice by slice (grid from a first pass, masks redrawn)
    # against the torch kernels (whole mask, exact_l1) and against the trial merger
    from mergelab.engine import merge_to_dir

    from conftest import load_dir

    r = _recipe(wide_family, method, (0.6, -0.4, 1.3), (0.2, 0.9, 0.45), {"lambda": 1.1})
    r["dtype"] = "float16"
    out = {}
    for jit in (False, True):
        with monkeypatch.context() as m:
            m.setattr(jit_core, "AVAILABLE", jit)
            m.setattr(kinputs, "CHUNK", 640)
            merge_to_dir(r, tmp_path / f"out{jit}")
        out[jit] = load_dir(tmp_path / f"out{jit}")
    mem = TrialMerger(str(wide_family[0]), [str(p) for p in wide_family[1:]]).state_dict(r)
    for k in out[False]:
        assert torch.equal(out[True][k].view(torch.int16), out[False][k].view(torch.int16)), k
        assert torch.equal(mem[k].view(torch.int16), out[False][k].view(torch.int16)), k
