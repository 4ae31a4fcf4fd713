"""Merge operators against hand-computed results on small tensors, plus determinism and the
precomputed-delta path (which must be bit-identical to the plain one)."""
from __future__ import annotations

import math

import pytest
import torch

import operators
from mergelab.errors import MergelabError
from operators import MergeInputs, get_operator, operator_names
from operators.sparsify import sorted_magnitudes, top_k_mask
from operators.table import operator_table_markdown

T = torch.tensor


def run(op, base, models, model_params, params=None, *, base_index=None, seed=0, name="w", pre=False,
        rng=None):
    """Call operator `op` the way the engine does: defaults filled, optional precompute."""
    spec = get_operator(op)
    g = {p.name: p.default for p in spec.params if p.scope == "global"}
    g.update(params or {})
    md = {p.name: p.default for p in spec.params if p.scope == "model"}
    mps = [{**md, **mp} for mp in model_params]
    deltas = sorted_abs = None
    if pre and base is not None:
        deltas = [None if i == base_index else m - base for i, m in enumerate(models)]
        sorted_abs = [None if d is None else sorted_magnitudes(d) for d in deltas]
    inp = MergeInputs(
        name=name, base=base, models=list(models), model_params=mps, params=g, seed=seed,
        base_index=base_index, deltas=deltas, sorted_abs=sorted_abs, rng=rng,
    )
    out = spec.fn(inp)
    assert out.dtype == torch.float32 and out.shape == models[0].shape
    return out


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- registry -------------------------------------------------------------------------------

REQUIRED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "tsv",
}


def test_registry_has_every_operator_with_documented_parameters():
    assert REQUIRED <= set(operator_names())
    for name in REQUIRED:
        spec = get_operator(name)
        assert spec.summary and spec.paper
        for p in spec.params:
            assert p.help, (name, p.name)
            assert p.scope in ("model", "global")
            if not p.required:
                assert p.check(p.default) is None, (name, p.name)
    # mergekit's defaults
    d = lambda op, p: get_operator(op).param(p).default  # noqa: E731
    assert d("ties", "normalize") is True and d("ties", "rescale") is False
    assert d("dare_ties", "normalize") is False and d("dare_ties", "rescale") is True
    assert d("dare_linear", "rescale") is True and d("task_arithmetic", "normalize") is False
    assert d("della", "normalize") is True and d("della_linear", "normalize") is False
    assert d("breadcrumbs", "gamma") == 0.01 and d("della", "epsilon") == 0.15
    assert d("ties", "density") == 1.0 and d("ties", "lambda") == 1.0
    assert d("linear", "normalize") is True
    assert get_operator("ties").param("weight").required
    assert get_operator("slerp").param("t").required


def test_parameter_ranges():
    density = get_operator("ties").param("density")
    assert density.check(0) is not None and density.check(1.5) is not None
    assert density.check(1) is None and density.check(0.01) is None
    weight = get_operator("linear").param("weight")
    assert weight.check(-0.5) is None and weight.check(float("inf")) is not None
    t = get_operator("slerp").param("t")
    assert t.check(0) is None and t.check(1) is None and t.check(1.2) is not None
    eps = get_operator("della").param("epsilon")
    assert eps.check(0.5) is not None and eps.check(0.0) is None


def test_operator_table_lists_every_operator():
    table = operator_table_markdown()
    lines = table.strip().splitlines()
    assert lines[0] == "| name | parameters | what it computes | reference |"
    for name in REQUIRED:
        row = next(line for line in lines if line.startswith(f"| `{name}` |"))
        assert "arXiv" in row or name == "slerp"
    assert "`density` (per model, default 1, (0, 1])" in table


# ---- linear -------------------------------------------------------------------------------

def test_linear_weights_one_zero_returns_first_model_exactly():
    a, b = rand(5, 7, seed=1), rand(5, 7, seed=2)
    assert torch.equal(run("linear", None, [a, b], [{"weight": 1.0}, {"weight": 0.0}]), a)


def test_linear_normalize_true_and_false():
    a, b = T([1.0, 2.0]), T([10.0, 20.0])
    mps = [{"weight": 2.0}, {"weight": 1.0}]
    assert torch.equal(run("linear", None, [a, b], mps, {"normalize": False}), T([12.0, 24.0]))
    assert torch.equal(run("linear", None, [a, b], mps), T([4.0, 8.0]))


def test_linear_zero_weight_sum_is_a_user_error():
    a, b = T([1.0]), T([2.0])
    with pytest.raises(MergelabError, match="sum to 0"):
        run("linear", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])


# ---- task arithmetic ----------------------------------------------------------------------

def test_task_arithmetic_lambda_zero_returns_base():
    base = rand(4, 6, seed=3)
    models = [rand(4, 6, seed=4), rand(4, 6, seed=5)]
    out = run("task_arithmetic", base, models, [{"weight": 0.7}, {"weight": 1.3}], {"lambda": 0.0})
    assert torch.equal(out, base)


def test_task_arithmetic_by_hand():
    base = T([1.0, 1.0, 1.0])
    m1, m2 = T([2.0, 0.0, 1.0]), T([1.0, 3.0, 1.0])
    # τ1 = [1, -1, 0], τ2 = [0, 2, 0]; 1·τ1 + 0.5·τ2 = [1, 0, 0]; λ = 2
    out = run("task_arithmetic", base, [m1, m2], [{"weight": 1.0}, {"weight": 0.5}], {"lambda": 2.0})
    assert torch.equal(out, T([3.0, 1.0, 1.0]))
    # normalize divides by Σw = 1.5
    out = run("task_arithmetic", base, [m1, m2], [{"weight": 1.0}, {"weight": 0.5}], {"normalize": True})
    assert torch.allclose(out, T([1 + 1 / 1.5, 1.0, 1.0]))


def test_base_listed_in_models_is_skipped_like_mergekit():
    base = rand(3, 4, seed=6)
    m1, m2 = rand(3, 4, seed=7), rand(3, 4, seed=8)
    mps = [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.7}]
    for op in ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs"):
        plain = run(op, base, [m1, m2], mps, name="x")
        listed = run(op, base, [m1, base, m2], [mps[0], {"weight": 99.0}, mps[1]], base_index=1, name="x")
        assert torch.equal(plain, listed), op


def test_no_model_besides_base_returns_base():
    base = rand(3, seed=9)
    out = run("ties", base, [base], [{"weight": 1.0}], base_index=0)
    assert torch.equal(out, base)


# ---- TIES ---------------------------------------------------------------------------------

def test_ties_two_by_three_by_hand():
    base = torch.ones(2, 3)
    taus = [
        T([[0.9, -0.1, 0.5], [-0.4, 0.2, 0.05]]),
        T([[-0.3, 0.8, 0.6], [0.1, -0.7, 0.02]]),
        T([[0.2, -0.6, -0.7], [0.5, 0.3, 0.01]]),
    ]
    models = [base + t for t in taus]
    mps = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    # k = int(0.5·6) = 3 per model. Trimmed, weighted:
    #   w1τ1 = [[0.9, 0, 0.5], [-0.4, 0, 0]]
    #   w2τ2 = [[0, 0.4, 0.3], [0, -0.35, 0]]
    #   w3τ3 = [[0, -0.6, -0.7], [0.5, 0, 0]]
    # Σ = [[0.9, -0.2, 0.1], [0.1, -0.35, 0]] → signs [[+, -, +], [+, -, + (0 counts +)]]
    # disjoint mean: (0,0) 0.9/1; (0,1) -0.6/1; (0,2) (0.5+0.3)/(1+0.5); (1,0) 0.5/1;
    #                (1,1) -0.35/0.5; (1,2) nothing agrees → 0
    expected = base + T([[0.9, -0.6, 0.8 / 1.5], [0.5, -0.7, 0.0]])
    out = run("ties", base, models, mps)
    # the models are base + τ in float32, so τ comes back within an ulp of 1
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert out[1, 2] == 1.0  # no agreeing model: exactly the base
    # λ scales the merged task vector
    out2 = run("ties", base, models, mps, {"lambda": 2.0})
    assert torch.allclose(out2, base + 2 * (expected - base), atol=2e-6, rtol=0)


def test_ties_threshold_ties_are_broken_by_flat_index():
    base = torch.zeros(6)
    tau = T([3.0, 1.0, 1.0, 1.0, 0.5, -1.0])
    for pre in (False, True):
        out = run("ties", base, [tau], [{"weight": 1.0, "density": 0.5}], pre=pre)
        # k = 3: 3.0, then the first two of the four |1.0| entries by position
        assert torch.equal(out, T([3.0, 1.0, 1.0, 0.0, 0.0, 0.0])), pre


def test_ties_keep_count_follows_mergekit():
    tau = torch.arange(1.0, 101.0)  # distinct magnitudes 1..100
    base = torch.zeros(100)
    kept = lambda d: int((run("ties", base, [tau], [{"weight": 1.0, "density": d}]) != 0).sum())  # noqa: E731
    assert kept(0.57) == int(0.57 * 100) == 56  # int() of the float product, not round()
    assert kept(0.001) == 1  # max(1, ...): never empty
    assert kept(1.0) == 100


def test_top_k_mask_linear_pass_matches_a_stable_sort():
    x = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(3)).float()
    order = torch.sort(x, descending=True, stable=True).indices
    for k in (0, 1, 7, 333, 999, 1000):
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(top_k_mask(x, k), expected), k
        assert torch.equal(top_k_mask(x, k, sorted_magnitudes(x)), expected), k


# ---- DARE ---------------------------------------------------------------------------------

def test_dare_with_density_one_equals_task_arithmetic():
    base = rand(8, 9, seed=10)
    models = [rand(8, 9, seed=11), rand(8, 9, seed=12)]
    mps = [{"weight": 0.6, "density": 1.0}, {"weight": 0.9, "density": 1.0}]
    ta = run("task_arithmetic", base, models, mps, {"lambda": 1.2})
    assert torch.equal(run("dare_linear", base, models, mps, {"lambda": 1.2}), ta)
    ties = run("ties", base, models, mps, {"normalize": False})
    assert torch.equal(run("dare_ties", base, models, mps), ties)


def test_dare_kept_fraction_and_mean():
    base = torch.zeros(512, 512)
    model = torch.ones(512, 512)
    n = model.numel()
    mp = [{"weight": 1.0, "density": 0.3}]
    # mergekit's rescale: survivors scaled to keep the L1 norm, so the mean stays exactly ~1
    out = run("dare_linear", base, [model], mp, seed=1)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005  # std of the fraction is 0.0009
    assert abs(out.mean().item() - 1.0) < 1e-5
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], n / (kept * n)), rtol=1e-5)
    # the paper's rescale: survivors multiplied by 1/density, the mean is 1 in expectation
    paper = run("dare_linear", base, [model], mp, {"rescale_inverse_density": True}, seed=1)
    assert torch.equal(paper != 0, out != 0)  # the same draws
    assert torch.allclose(paper[paper != 0], torch.tensor(1 / 0.3), rtol=1e-6)
    assert abs(paper.mean().item() - 1.0) < 0.02
    # no rescale: survivors keep their value, the mean is the kept fraction
    plain = run("dare_linear", base, [model], mp, {"rescale": False}, seed=1)
    assert torch.equal(plain, (out != 0).float())


def test_dare_is_deterministic_per_seed_and_tensor_name():
    base = rand(64, 64, seed=13)
    models = [rand(64, 64, seed=14), rand(64, 64, seed=15)]
    mps = [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    a = run("dare_ties", base, models, mps, seed=3, name="layers.0.q")
    b = run("dare_ties", base, models, mps, seed=3, name="layers.0.k")  # another tensor first
    a2 = run("dare_ties", base, models, mps, seed=3, name="layers.0.q")
    assert torch.equal(a, a2)
    assert not torch.equal(a != base, b != base)
    c = run("dare_ties", base, models, mps, seed=4, name="layers.0.q")
    assert not torch.equal(a, c)


# ---- the counter-based stream (default) and mergekit's stream ------------------------------

def _lowbias32(x: int) -> int:
    """An independent, pure-Python lowbias32 (unsigned 32-bit arithmetic)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_counter_stream_is_the_keyed_hash_of_the_element_index():
    from operators.draws import counter_bits

    key = 0x1234_5678_9ABC_DEF1
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    want = [_lowbias32(_lowbias32(i ^ k0) ^ k1) >> 8 for i in range(0, 300)]
    assert counter_bits(key, 0, 300).tolist() == want
    # any slice alone gives the stream's numbers at those positions
    assert counter_bits(key, 123, 300).tolist() == want[123:]
    # positions past 2**32 use another word of the key, so they do not repeat the first ones
    far = counter_bits(key, 1 << 32, (1 << 32) + 300)
    assert far.tolist() != want and int(far.min()) >= 0 and int(far.max()) < 1 << 24
    edge = counter_bits(key, (1 << 32) - 5, (1 << 32) + 5)  # a stretch across 2**32
    assert torch.equal(edge, torch.cat([counter_bits(key, (1 << 32) - 5, 1 << 32), far[:5]]))


def test_counter_stream_keep_fraction_and_threshold():
    from operators.draws import CounterStream, keep_threshold

    assert keep_threshold(0.5) == 1 << 23 and keep_threshold(1.0) == 1 << 24 and keep_threshold(0.0) == 0
    mask = CounterStream(7).keep_mask(torch.Size([400_000]), 0.3, "cpu")
    assert abs(mask.float().mean().item() - 0.3) < 0.003  # std 0.0007
    u = CounterStream(7).uniform(torch.Size([400_000]), "cpu")
    assert torch.equal(u < 0.3, mask)  # the same numbers as k / 2**24
    assert abs(u.mean().item() - 0.5) < 0.003


def test_exact_l1_is_independent_of_order_and_matches_the_integer_sum():
    from operators.draws import exact_l1

    t = rand(1000, 37, seed=21) * torch.logspace(-6, 2, 37)
    perm = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))
    a, b = exact_l1(t), exact_l1(t.reshape(-1)[perm])
    assert torch.equal(a.total, b.total) and torch.equal(a.scale, b.scale)
    scale = int(a.scale)
    # the definition: each |x| truncated to the 2**-scale grid, summed as integers
    want = sum(math.floor(abs(float(x)) * 2.0 ** scale) for x in t.reshape(-1).tolist())
    assert int(a.total) == want
    assert abs(float(a.value()) / float(t.abs().double().sum()) - 1) < 1e-12
    z = exact_l1(torch.zeros(10))
    assert int(z.total) == 0 and float(z.value()) == 0.0


def test_dare_counter_stream_is_thread_count_independent_and_rescales():
    base = rand(300, 301, seed=1)
    models = [base + 0.01 * rand(300, 301, seed=2), base + 0.01 * rand(300, 301, seed=3)]
    mps = [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run("dare_ties", base, models, mps, seed=5, name="x"))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    # one task vector, L1 rescale: the survivors' L1 norm equals the task vector's
    tau = models[0] - base
    out = run("dare_linear", torch.zeros_like(base), [tau], [{"weight": 1.0, "density": 0.3}], seed=5, name="x").double()
    assert abs((out != 0).double().mean().item() - 0.3) < 0.01
    assert abs(out.abs().sum().item() / tau.double().abs().sum().item() - 1) < 1e-6


def test_rng_option_selects_the_stream():
    base = rand(64, 64, seed=13)
    models = [rand(64, 64, seed=14), rand(64, 64, seed=15)]
    mps = [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    counter = run("dare_ties", base, models, mps, seed=3, name="q")
    assert torch.equal(counter, run("dare_ties", base, models, mps, seed=3, name="q", rng="counter"))
    mk = run("dare_ties", base, models, mps, seed=3, name="q", rng="mergekit")
    assert not torch.equal(counter, mk)
    # mergekit's stream: torch's CPU generator seeded per tensor, rows drawn in order
    from operators import tensor_seed
    from operators.sparsify import bernoulli_

    g = torch.Generator().manual_seed(tensor_seed(3, "q"))
    rows = [bernoulli_(m - base, mp["density"], g) for m, mp in zip(models, mps)]
    g2 = torch.Generator().manual_seed(tensor_seed(3, "q"))
    masks = [torch.rand(base.shape, generator=g2) < mp["density"] for mp in mps]
    assert all(torch.equal(r != 0, m & ((mo - base) != 0)) for r, m, mo in zip(rows, masks, models))


@pytest.mark.parametrize("op", ["dare_ties", "dare_linear", "della"])
def test_counter_stream_same_bits_on_cuda_and_cpu(op):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CPU-vs-CUDA equality runs where a GPU is present")
    base = rand(257, 129, seed=1)
    models = [base + 0.01 * rand(257, 129, seed=2), base + 0.01 * rand(257, 129, seed=3)]
    mps = [{"weight": 0.7, "density": 0.3, "epsilon": 0.1}, {"weight": 0.5, "density": 0.6, "epsilon": 0.1}]
    cpu = run(op, base, models, mps, seed=5, name="x")
    gpu = run(op, base.cuda(), [m.cuda() for m in models], mps, seed=5, name="x")
    assert torch.equal(cpu, gpu.cpu())


# ---- breadcrumbs and DELLA ------------------------------------------------------------------

def test_breadcrumbs_drops_outliers_then_smallest():
    tau = T([10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    base = torch.zeros(10)
    # target = 5, n_top = 1, n_bottom = 4: drop 10, keep the next five, drop the rest
    out = run("breadcrumbs", base, [tau], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(out, T([0.0, -9.0, 8.0, 7.0, -6.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    # target = 8, n_top = 3 would leave fewer than 8: the outlier cut shrinks to 2
    out = run("breadcrumbs", base, [tau], [{"weight": 1.0, "density": 0.8, "gamma": 0.3}])
    assert torch.equal(out, T([0.0, 0.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))


def test_della_keeps_large_entries_more_often():
    row = torch.arange(1.0, 20001.0).view(1, -1)  # magnitudes increase along the row
    base = torch.zeros_like(row)
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]
    out = run("della_linear", base, [row], mp, {"rescale": False})
    kept = (out != 0).float()[0]
    # keep probability rises linearly from 0.3 (smallest) to 0.7 (largest)
    assert abs(kept[:2000].mean().item() - 0.32) < 0.04
    assert abs(kept[-2000:].mean().item() - 0.68) < 0.04
    assert abs(kept.mean().item() - 0.5) < 0.02
    assert torch.equal(out[out != 0], row[out != 0])


def test_della_epsilon_must_keep_probabilities_inside_zero_one():
    base, m = torch.zeros(4, 4), torch.ones(4, 4)
    with pytest.raises(MergelabError, match="density - epsilon > 0"):
        run("della", base, [m], [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}])
    assert operators.check_params("della", [{"density": 0.9, "epsilon": 0.15}], {}) is not None
    assert operators.check_params("della", [{"density": 1.0, "epsilon": 0.15}], {}) is None


def test_della_single_entry_rows_do_not_fail():
    out = run("della", torch.zeros(3, 1), [torch.ones(3, 1)], [{"weight": 1.0, "density": 0.5}], name="b")
    assert set(out.flatten().tolist()) <= {0.0, 1.0, 1.5, 3.0}


# ---- slerp --------------------------------------------------------------------------------

def test_slerp_endpoints_are_exact():
    a, b = rand(6, 5, seed=16), rand(6, 5, seed=17)
    assert torch.equal(run("slerp", a, [b], [{}], {"t": 0.0}), a)
    assert torch.equal(run("slerp", a, [b], [{}], {"t": 1.0}), b)
    # base listed among the models: the base is still t = 0, wherever it is
    assert torch.equal(run("slerp", a, [b, a], [{}, {}], {"t": 0.0}, base_index=1), a)


def test_slerp_half_way_on_orthogonal_vectors():
    v0, v1 = T([2.0, 0.0]), T([0.0, 3.0])
    out = run("slerp", v0, [v1], [{}], {"t": 0.5})
    # θ = π/2: both coefficients are sin(π/4)/sin(π/2) = √2/2, applied to the unnormalized vectors
    h = math.sqrt(0.5)
    assert torch.allclose(out, T([2 * h, 3 * h]), atol=1e-6)


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    v0 = T([1.0, 2.0, 3.0])
    for v1 in (T([2.0, 4.0, 6.001]), T([-2.0, -4.0, -6.0])):
        out = run("slerp", v0, [v1], [{}], {"t": 0.25})
        assert torch.allclose(out, 0.75 * v0 + 0.25 * v1, atol=1e-6)


def test_slerp_needs_exactly_one_other_model():
    a = T([1.0, 0.0])
    with pytest.raises(MergelabError, match="exactly one other model"):
        run("slerp", a, [a, a], [{}, {}], {"t": 0.5})


# ---- model_stock --------------------------------------------------------------------------

def test_model_stock_by_hand():
    base = T([1.0, 1.0])
    m1, m2 = T([2.0, 1.0]), T([2.0, 2.0])
    # τ = [1, 0] and [1, 1]: cosθ = 1/√2, t = 2c/(1+c) = 2(√2 − 1); mean = [2, 1.5]
    t = 2 * (math.sqrt(2) - 1)
    out = run("model_stock", base, [m1, m2], [{}, {}])
    assert torch.allclose(out, T([1 + t, 1 + 0.5 * t]), atol=1e-6)
    # opposed task vectors: 1 + (N−1)cosθ = 0, the base is kept
    out = run("model_stock", base, [T([2.0, 1.0]), T([0.0, 1.0])], [{}, {}])
    assert torch.equal(out, base)


def test_model_stock_filter_wise_uses_one_angle_per_row():
    base = torch.zeros(2, 2)
    m1 = T([[1.0, 0.0], [1.0, 0.0]])
    m2 = T([[1.0, 1.0], [0.0, 1.0]])
    out = run("model_stock", base, [m1, m2], [{}, {}], {"filter_wise": True})
    t = 2 * (math.sqrt(2) - 1)  # row 0: cos = 1/√2; row 1: orthogonal, t = 0
    assert torch.allclose(out, T([[t, 0.5 * t], [0.0, 0.0]]), atol=1e-6)


def test_model_stock_needs_two_models_besides_base():
    with pytest.raises(MergelabError, match="at least two models"):
        run("model_stock", T([0.0]), [T([1.0])], [{}])


# ---- precomputed task vectors ---------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(REQUIRED))
def test_precomputed_path_is_bit_identical(op):
    base = rand(33, 17, seed=20)
    models = [base + 0.1 * rand(33, 17, seed=21 + i) for i in range(3)]
    # a few exact ties in magnitude to exercise the threshold tie rule
    models[0][0, :5] = base[0, :5] + 0.05
    if op == "slerp":
        cases = [([base, models[0]], [{}, {}], {"t": 0.3}, 0)]
    elif op == "linear":
        cases = [(models, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}, None)]
    else:
        mps = [{"weight": 0.5, "density": 0.3}, {"weight": 0.9, "density": 0.6}, {"weight": -0.2, "density": 0.9}]
        mps = [{**mp, "epsilon": 0.05} for mp in mps] if op.startswith("della") else mps
        cases = [([base] + models, [{}] + mps, {}, 0)]
    for ms, mps, params, bi in cases:
        snapshot = [base.clone()] + [m.clone() for m in ms]
        plain = run(op, base, ms, mps, params, base_index=bi, name="layer.3.w", seed=5)
        pre = run(op, base, ms, mps, params, base_index=bi, name="layer.3.w", seed=5, pre=True)
        assert torch.equal(plain, pre)
        # operators work in their own buffers: the inputs are untouched
        assert all(torch.equal(a, b) for a, b in zip(snapshot, [base] + ms))


@pytest.mark.parametrize("n,start", [(1, 0), (5000, 0), (70_001, 123_457), (300, (1 << 32) - 100)])
def test_compiled_counter_mask_and_sums_equal_the_torch_stream(n, start):
    from mergelab.kernels import jit_core
    from mergelab.kernels import counter_jit
    from operators.draws import CounterStream, exact_l1, fixed_scale

    if not jit_core.AVAILABLE:
        pytest.skip("numba (the `fast` extra) is not installed: the compiled pass is optional")
    a = (rand(n, seed=n) * torch.logspace(-5, 1, n)).abs()
    stream = CounterStream(0xDEADBEEF_12345678, position=start)
    want = stream.keep_mask(torch.Size([n]), 0.37, "cpu")
    norms = exact_l1(a)
    mask = torch.empty(n, dtype=torch.bool)
    total, after = counter_jit.mask_l1(a, stream.key, start, 0.37, fixed_scale(a.amax(), n), mask)
    assert torch.equal(mask, want)
    assert total == int(norms.total) and after == int(norms.masked(want))
    empty = torch.empty(0)
    assert counter_jit.mask_l1(empty, stream.key, start, 0.37, None, mask) == (0, 0) and torch.equal(mask, want)


# ---- tsv ------------------------------------------------------------------------------------

def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    return q


def test_tsv_of_task_vectors_in_orthogonal_subspaces_is_task_arithmetic():
    # each task vector of rank r = 6 / 2 = 3 in its own left and right subspace: nothing to decorrelate
    q, p = _orthogonal(6, 1), _orthogonal(6, 2)
    base = rand(6, 6, seed=3)
    d1 = q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ p[:, :3].T
    d2 = q[:, 3:] @ torch.diag(torch.tensor([1.5, 0.7, 0.2])) @ p[:, 3:].T
    out = run("tsv", base, [base + d1, base + d2], [{"weight": 0.5}, {"weight": 2.0}], {"lambda": 0.8})
    assert torch.allclose(out, base + 0.8 * (0.5 * d1 + 2.0 * d2), atol=1e-5)


def test_tsv_decorrelates_overlapping_task_vectors():
    from operators.tsv import tsv_parts

    base = rand(8, 12, seed=4)
    shared = rand(8, 12, seed=5)
    deltas = [shared + 0.5 * rand(8, 12, seed=6 + i) for i in range(3)]  # strongly overlapping
    parts = tsv_parts(deltas)
    r = 8 // 3
    for i, m in enumerate(parts):
        assert torch.linalg.matrix_rank(m).item() == r  # each task keeps its top r directions
        s_kept = torch.linalg.svdvals(deltas[i])[:r]
        assert torch.allclose(torch.linalg.svdvals(m)[:r], s_kept, rtol=1e-4)  # with their strengths
        for j in range(i + 1, 3):  # and the tasks' parts share no left or right direction any more
            assert torch.linalg.norm(m.T @ parts[j]) < 1e-4 * torch.linalg.norm(m) * torch.linalg.norm(parts[j])
            assert torch.linalg.norm(m @ parts[j].T) < 1e-4 * torch.linalg.norm(m) * torch.linalg.norm(parts[j])
    # the merge is base + λ Σ wᵢ Mᵢ; task arithmetic would have added the shared part three times
    out = run("tsv", base, [base + d for d in deltas], [{"weight": 1.0}] * 3, name="model.layers.0.mlp.up_proj.weight")
    assert torch.allclose(out, base + sum(parts), atol=1e-5)
    ta = base + sum(deltas)
    assert torch.linalg.norm(out - base) < 0.8 * torch.linalg.norm(ta - base)


def test_tsv_keeps_task_arithmetic_for_vectors_and_vocabulary_tables():
    base, a, b = rand(5, seed=7), rand(5, seed=8), rand(5, seed=9)
    out = run("tsv", base, [a, b], [{"weight": 0.3}, {"weight": 1.2}], {"lambda": 1.5})
    assert torch.allclose(out, base + 1.5 * (0.3 * (a - base) + 1.2 * (b - base)), atol=1e-6)
    E, A, B = rand(20, 4, seed=10), rand(20, 4, seed=11), rand(20, 4, seed=12)
    out = run("tsv", E, [A, B], [{}, {}], name="model.embed_tokens.weight")
    assert torch.allclose(out, A + B - E, atol=1e-6)


def test_tsv_ignores_the_null_directions_of_a_low_rank_or_unchanged_task():
    # a rank-1 task vector next to an unchanged model (a LoRA fine-tune, a frozen layer): the
    # SVD's directions with singular value 0 are arbitrary and must not move the real one
    from operators.tsv import tsv_parts

    u, v = rand(6, seed=20), rand(5, seed=21)
    low = torch.outer(u, v) * 0.1
    parts = tsv_parts([low, torch.zeros(6, 5)])
    assert torch.allclose(parts[0], low, atol=1e-6) and torch.count_nonzero(parts[1]) == 0
    assert all(torch.count_nonzero(p) == 0 for p in tsv_parts([torch.zeros(6, 5), torch.zeros(6, 5)]))
