"""Tests of the PackLLM logit fusion: weight formulas, vocabulary checks, generation, recipes, CLI."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.fusion import (
    FusedLogitModel,
    fuse_logits,
    fusion_weights,
    is_fusion_recipe,
    load_fusion,
    log_perplexities,
    opt_weights,
    prompt_target_mask,
    sim_weights,
    top1_weights,
    validate_fusion_recipe,
)

CHARS = list("0123456789+=,>-abcdefgh ")


# -- helpers ---------------------------------------------------------------------------------------
def _char_tokenizer(path, chars=CHARS):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return fast


def _tiny_llama(vocab_size, seed, path=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so argmax ties cannot happen
        model.lm_head.weight.mul_(20)
    if path is not None:
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two tiny random Llamas sharing a char tokenizer, saved as model directories."""
    root = tmp_path_factory.mktemp("fam")
    tok = _char_tokenizer(root / "a")
    _char_tokenizer(root / "b")
    a = _tiny_llama(len(tok), 1, root / "a")
    b = _tiny_llama(len(tok), 2, root / "b")
    return root, tok, a, b


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# The compiled loops (numba, optional) and the torch code compute the same weights; opt's tests
# run on both paths.
from mergelab import _jit_fusion  # noqa: E402

PATHS = [
    pytest.param(True, id="compiled", marks=pytest.mark.skipif(not _jit_fusion.AVAILABLE, reason="numba not installed")),
    pytest.param(False, id="torch"),
]


@pytest.fixture
def compiled(request, monkeypatch):
    monkeypatch.setattr(_jit_fusion, "AVAILABLE", request.param)
    return request.param


def _ce(logits, ids, target):
    """Reference per-example mean cross-entropy, written independently of the module."""
    out = []
    for b in range(ids.shape[0]):
        ts = [t for t in range(ids.shape[1]) if target[b, t]]
        lp = torch.log_softmax(logits[b].double(), -1)
        out.append(-sum(lp[t - 1, ids[b, t]].item() for t in ts) / len(ts))
    return torch.tensor(out, dtype=torch.float64)


# -- formulas --------------------------------------------------------------------------------------
def test_prompt_target_mask_counts_real_prompt_tokens_after_the_first():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = prompt_target_mask(mask, torch.tensor([3, 1]))
    assert got.tolist() == [[False, False, False, True, True, False], [False] * 6]


def test_equal_log_perplexities_give_equal_weights_and_hand_values():
    ids = torch.tensor([[0, 1, 2, 3]])
    target = torch.tensor([[False, True, True, True]])
    flat = torch.zeros(1, 4, 4)  # uniform prediction over 4 tokens: ℓ = log 4
    ell = log_perplexities([flat, flat.clone(), flat.clone()], ids, target)
    assert torch.allclose(ell, torch.full((1, 3), math.log(4)), atol=1e-6)
    assert torch.allclose(sim_weights(ell), torch.full((1, 3), 1 / 3))
    # ℓ = (1, 2): softmax(−1, −2) = (1/(1+e^-1), e^-1/(1+e^-1))
    w = sim_weights(torch.tensor([[1.0, 2.0]]))
    assert w[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)
    w2 = sim_weights(torch.tensor([[1.0, 2.0]]), tau=2.0)
    assert w2[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-6)


def test_tau_limits_pick_the_best_model_or_uniform():
    ell = torch.tensor([[2.0, 1.5, 3.0], [0.2, 0.1, 0.3]])
    assert torch.equal(sim_weights(ell, tau=1e-4), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(sim_weights(ell, tau=1e6), torch.full((2, 3), 1 / 3), atol=1e-6)
    assert torch.equal(top1_weights(ell), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
def test_opt_finds_the_grid_optimum_on_a_hand_case(compiled):
    # Target 0 then target 1 (V = 2). A is confident on the first, B on the second, so the fused
    # cross-entropy softplus(−3μ) + softplus(−(1−μ)) is minimised inside (0, 1).
    ids = torch.tensor([[1, 0, 1]])
    target = torch.tensor([[False, True, True]])
    a = torch.tensor([[[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    sp = torch.nn.functional.softplus
    grid = [i / 20 for i in range(21)]
    best = min(grid, key=lambda m: (sp(torch.tensor(-3 * m)) + sp(torch.tensor(-(1 - m)))).item())
    # ℓ_A = (softplus(−3) + log 2)/2 < ℓ_B = (log 2 + softplus(−1))/2: A leads, μ weighs A
    w = opt_weights([a, b], ids, target, grid_step=0.05)
    # f'(μ) = −3σ(−3μ) + σ(μ − 1) changes sign between 0.55 and 0.65: the grid optimum is 0.6
    assert best == 0.6
    assert w[0].tolist() == pytest.approx([0.6, 0.4], abs=1e-6)


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
def test_opt_is_never_worse_than_best_single_model_or_sim(compiled):
    gen = torch.Generator().manual_seed(0)
    for case in range(12):
        k, b, t, v = 2 + case % 3, 3, 7, 11
        logits = [torch.randn(b, t, v, generator=gen) * (1 + 2 * torch.rand(1, generator=gen)) for _ in range(k)]
        ids = torch.randint(0, v, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, :2] = 0  # one left-padded row
        target = prompt_target_mask(mask, torch.tensor([5, 7, 4]))
        singles = torch.stack([_ce(lg, ids, target) for lg in logits], 1)
        w_opt = opt_weights(logits, ids, target, grid_step=0.05)
        w_sim = sim_weights(log_perplexities(logits, ids, target))
        opt_ce = _ce(fuse_logits(logits, w_opt), ids, target)
        sim_ce = _ce(fuse_logits(logits, w_sim), ids, target)
        assert torch.allclose(w_opt.sum(1), torch.ones(b))
        assert (opt_ce <= singles.min(1).values + 1e-9).all(), case
        assert (opt_ce <= sim_ce + 1e-5).all(), case


def _opt_by_full_scan(logits, ids, target, grid):
    """Reference PackLLM-opt: the greedy with every grid value tried, in float64 (no search)."""
    k = len(logits)
    singles = torch.stack([_ce(lg, ids, target) for lg in logits], 1)
    out = []
    for b in range(ids.shape[0]):
        order = sorted(range(k), key=lambda i: singles[b, i].item())
        w = torch.zeros(k, dtype=torch.float64)
        w[order[0]] = 1.0
        for nxt in order[1:]:
            e = torch.zeros(k, dtype=torch.float64)
            e[nxt] = 1.0
            losses = []
            for mu in grid:
                cand = mu * w + (1 - mu) * e
                fused = sum(cand[i] * logits[i][b : b + 1].double() for i in range(k))
                losses.append(_ce(fused, ids[b : b + 1], target[b : b + 1])[0].item())
            best = min(range(len(grid)), key=lambda i: (losses[i], i))  # first minimum: larger μ
            w = grid[best] * w + (1 - grid[best]) * e
        out.append(w)
    return torch.stack(out)


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
@pytest.mark.parametrize("step", [0.05, 0.1, 0.07, 0.3, 1.0])
def test_opt_search_picks_the_same_grid_point_as_the_full_scan(step, compiled):
    # The Fibonacci search over μ (torch) and the one-pass grid evaluation (compiled) must land
    # where trying all grid values in float64 does (f is convex).
    from mergelab.fusion import _grid

    gen = torch.Generator().manual_seed(7)
    for case in range(4):
        k, b, t, v = 2 + case % 3, 4, 9, 13
        logits = [torch.randn(b, t, v, generator=gen) * (0.5 + 3 * torch.rand(1, generator=gen)) for _ in range(k)]
        ids = torch.randint(0, v, (b, t), generator=gen)
        target = prompt_target_mask(torch.ones(b, t), torch.tensor([9, 7, 5, 9]))
        want = _opt_by_full_scan(logits, ids, target, _grid(step))
        # sim can only win where the greedy's CE is above sim's; compare before that guard.
        w_sim = sim_weights(log_perplexities(logits, ids, target))
        greedy_ce = _ce(fuse_logits(logits, want.float()), ids, target)
        sim_ce = _ce(fuse_logits(logits, w_sim), ids, target)
        got = opt_weights(logits, ids, target, grid_step=step)
        for r in range(b):
            expected = w_sim[r] if sim_ce[r] < greedy_ce[r] - 1e-6 else want[r].float()
            assert got[r].tolist() == pytest.approx(expected.tolist(), abs=1e-6), (step, case, r)


def _grid_sums_float64(a, b, rows, ys, exs, batch, mus):
    """Reference for the compiled grid: per-example CE sums of μ·a + (1−μ)·b, in float64."""
    out = torch.zeros(batch, len(mus), dtype=torch.float64)
    for c, mu in enumerate(mus):
        z = mu * a.double() + (1 - mu) * b.double()
        ce = torch.logsumexp(z[rows], -1) - z[rows, ys]
        out[:, c].index_add_(0, exs, ce)
    return out


@pytest.mark.skipif(not _jit_fusion.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("case", ["one chain", "two chains", "float64 rows"])
@pytest.mark.parametrize("step", [0.05, 0.07, 0.3, 1.0])
def test_compiled_grid_equals_a_direct_float64_evaluation(case, step):
    # V = 2500: several 1024-blocks and a tail that is not a multiple of the 64 lanes.
    from mergelab.fusion import _grid

    gen = torch.Generator().manual_seed(11)
    n_rows, v, batch = 12, 2500, 3
    a, b, c = (torch.randn(n_rows, v, generator=gen) * 3 for _ in range(3))
    if case == "two chains":
        # a puts 50 tokens ~300 below its top (exp underflows from μ = 1), which b likes: at μ = 0
        # they carry real mass, so the grid's lower half needs the chain that starts from b.
        a[:, 100:150] -= 300.0
        b[:, 100:150] += 5.0
    elif case == "float64 rows":
        # each model's top token is ~400 below under the other: the fused maximum is far below
        # the chord of the two maxima, beyond what float32 products can carry
        a[:, 0] += 200.0
        a[:, 1] -= 200.0
        b[:, 1] += 200.0
        b[:, 0] -= 200.0
    rows = torch.arange(n_rows - 1)
    ys = torch.randint(0, v, (n_rows - 1,), generator=gen)
    ys[:3] = torch.tensor([0, 1, 120])
    exs = rows % batch
    # step k = 1 of a greedy: the current fusion is model 0 (a) alone, model 1 (b) joins; then
    # a two-model mix against model 2
    grid = _grid(step)
    n_uni = int(math.floor(1 / step + 1e-9))
    extra0 = round(1 - n_uni * step, 12) > 0
    got = _jit_fusion.grid_ce_sums([a, b, c], torch.tensor([[1.0, 0.0, 0.0]] * batch),
                                   torch.ones(batch, dtype=torch.long), rows, ys, exs, batch, step, n_uni, extra0)
    want = _grid_sums_float64(a, b, rows, ys, exs, batch, grid)
    assert got.shape == want.shape == (batch, len(grid))
    assert torch.allclose(got, want, rtol=2e-6, atol=2e-4), (got - want).abs().max()
    w = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    got = _jit_fusion.grid_ce_sums([a, b, c], w, torch.full((batch,), 2), rows, ys, exs, batch, step, n_uni, extra0)
    mixed = w[:, :1, None] * a[None] + w[:, 1:2, None] * b[None]  # [batch, rows, V]
    want = torch.stack([_grid_sums_float64(mixed[e], c, rows, ys, exs, batch, grid)[e] for e in range(batch)])
    assert torch.allclose(got, want, rtol=2e-6, atol=2e-4), (got - want).abs().max()


@pytest.mark.skipif(not _jit_fusion.AVAILABLE, reason="numba not installed")
def test_compiled_fused_ce_equals_a_direct_float64_evaluation():
    gen = torch.Generator().manual_seed(5)
    n_rows, v, batch = 9, 2500, 3
    logits = [torch.randn(n_rows, v, generator=gen) * 4 for _ in range(3)]
    logits[2][:, 7] = float("-inf")  # a masked token: exp(-inf) = 0, no NaN
    rows, ys, exs = torch.arange(n_rows), torch.randint(0, v, (n_rows,), generator=gen), torch.arange(n_rows) % batch
    w = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    ws = torch.stack([w, torch.eye(3)])  # two weightings in one call: mixes and one-hots
    got = _jit_fusion.fused_ce_sums(logits, ws, rows, ys, exs, batch)
    want = torch.zeros(2, batch, dtype=torch.float64)
    for c in range(2):
        for i in range(n_rows):
            e = int(exs[i])
            z = sum(ws[c, e, k].double() * logits[k][i].double() for k in range(3) if ws[c, e, k] != 0)
            want[c, e] += torch.logsumexp(z, -1) - z[ys[i]]
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5), (got - want).abs().max()
    # a one-hot weighting gives exactly the model's ℓ, whatever the other weightings of the call
    alone = _jit_fusion.fused_ce_sums([logits[1]], torch.ones(1, batch, 1), rows, ys, exs, batch)
    assert got[0, 1].item() == alone[0, 1].item() and got[1, 1].item() == alone[0, 1].item()
    # fused logits summed into a member's own buffer: the same values as into a new tensor
    fresh = fuse_logits([lg[None] for lg in logits[:2]], w[:1, :2])
    own = logits[0][None].clone()
    assert torch.equal(fuse_logits([own, logits[1][None]], w[:1, :2], out=own), fresh)


@pytest.mark.skipif(not _jit_fusion.AVAILABLE, reason="numba not installed")
def test_compiled_weighted_sum_equals_the_torch_sum_bit_for_bit(monkeypatch):
    # The one-pass sum (fuse_logits on CPU float32) against the K-pass torch form it replaces:
    # mul, then addcmul_ per model. V = 2500 spans blocks and a partial one; three rows per
    # example ([B, T, V]); in place into the first model's logits; a [B, V] slice of positions.
    gen = torch.Generator().manual_seed(13)
    logits = [torch.randn(2, 3, 2500, generator=gen) * s for s in (2.0, 5.0, 1.0)]
    w = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])

    def torch_form(lgs):
        out = torch.mul(lgs[0], w[:, 0].view(-1, *[1] * (lgs[0].dim() - 1)))
        for k in (1, 2):
            out.addcmul_(lgs[k], w[:, k].view(-1, *[1] * (lgs[k].dim() - 1)))
        return out

    want = torch_form(logits)
    assert _jit_fusion.weighted_sum(logits, w, torch.empty(2, 3, 2500))  # the compiled path is taken
    assert torch.equal(fuse_logits(logits, w), want)
    own = logits[0].clone()
    assert torch.equal(fuse_logits([own] + logits[1:], w, out=own), want)
    last = [lg[:, -1] for lg in logits]
    assert torch.equal(fuse_logits(last, w), torch_form(last))
    monkeypatch.setattr(_jit_fusion, "AVAILABLE", False)
    assert not _jit_fusion.weighted_sum(logits, w, torch.empty(2, 3, 2500))
    assert torch.equal(fuse_logits(logits, w), want)


@pytest.mark.skipif(not _jit_fusion.AVAILABLE, reason="numba not installed")
def test_compiled_and_torch_paths_give_the_same_weights(monkeypatch):
    # A vocabulary of 2500 (several blocks of the compiled loops, several chunks of the torch
    # path's workspace); ℓ agrees to float32 rounding, the weights of every mode exactly or so.
    gen = torch.Generator().manual_seed(21)
    k, b, t, v = 3, 3, 40, 2500
    logits = [torch.randn(b, t, v, generator=gen) * s for s in (2.0, 3.0, 2.5)]
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :10] = 0
    target = prompt_target_mask(mask, torch.tensor([30, 40, 25]))
    got = {}
    for compiled in (True, False):
        monkeypatch.setattr(_jit_fusion, "AVAILABLE", compiled)
        got[compiled] = {m: fusion_weights(m, logits, ids, target) for m in ("sim", "opt", "uniform", "top1")}
    for m in ("sim", "opt", "uniform", "top1"):
        fast, plain = got[True][m], got[False][m]
        assert torch.allclose(fast.log_ppl, plain.log_ppl, rtol=1e-6, atol=1e-6), m
        assert torch.allclose(fast.weights, plain.weights, atol=1e-5), m
    ref = torch.stack([_ce(lg, ids, target) for lg in logits], 1)
    assert torch.allclose(got[True]["sim"].log_ppl.double(), ref, atol=1e-5)


def test_weights_are_per_example_and_batch_invariant():
    gen = torch.Generator().manual_seed(3)
    v = 6
    ids = torch.randint(0, v, (2, 5), generator=gen)
    good = torch.full((2, 5, v), -4.0)
    good[torch.arange(2)[:, None], torch.arange(4)[None, :], ids[:, 1:]] = 4.0  # predicts every next token
    a, b = good.clone(), good.clone()
    a[1] = 0.0  # A knows example 0 only, B example 1 only
    b[0] = 0.0
    target = prompt_target_mask(torch.ones(2, 5), torch.tensor([5, 5]))
    fw = fusion_weights("sim", [a, b], ids, target)
    # ℓ_good = log(1 + 5e^−8), ℓ_flat = log 6: the expert of each example gets σ(ℓ_flat − ℓ_good)
    expert = 1 / (1 + math.exp(-(math.log(6) - math.log(1 + 5 * math.exp(-8)))))
    assert fw.weights.tolist() == [pytest.approx([expert, 1 - expert], abs=1e-6),
                                   pytest.approx([1 - expert, expert], abs=1e-6)]
    for mode in ("sim", "opt", "top1", "uniform"):
        whole = fusion_weights(mode, [a, b], ids, target).weights
        for r in range(2):
            alone = fusion_weights(mode, [a[r : r + 1], b[r : r + 1]], ids[r : r + 1], target[r : r + 1])
            assert torch.allclose(whole[r], alone.weights[0], atol=1e-6), mode
    assert fusion_weights("uniform", [a, b], ids, target).weights.tolist() == [[0.5, 0.5]] * 2


def test_prompt_without_targets_gets_uniform_weights():
    ids = torch.tensor([[3, 1, 2]])
    a = torch.randn(1, 3, 5)
    target = prompt_target_mask(torch.ones(1, 3), torch.tensor([1]))
    for mode in ("sim", "opt", "top1"):
        assert fusion_weights(mode, [a, a * 3], ids, target).weights.tolist() == [[0.5, 0.5]]


# -- models ----------------------------------------------------------------------------------------
def test_fused_model_implements_the_protocol_and_weights_come_from_the_prompt(family):
    from mergelab.eval.protocol import LogitModel

    _, tok, a, b = family
    fused = FusedLogitModel([a, b], weighting="sim")
    assert isinstance(fused, LogitModel)
    assert fused.vocab_size == len(tok)
    ids1, mask1 = _left_pad([[1, 5, 6, 7, 8, 9], [1, 6, 7, 8]])
    ids2 = ids1.clone()
    ids2[0, -2:] = torch.tensor([20, 21])  # change row 0's continuation only
    pl = torch.tensor([4, 3])
    out1 = fused.logits(ids1, mask1, pl)
    w1 = fused.last_weights.weights.clone()
    fused.logits(ids2, mask1, pl)
    assert torch.equal(fused.last_weights.weights, w1)  # continuation not looked at
    pos = (mask1.cumsum(-1) - 1).clamp(min=0)
    la = a(input_ids=ids1, attention_mask=mask1, position_ids=pos).logits
    lb = b(input_ids=ids1, attention_mask=mask1, position_ids=pos).logits
    target = prompt_target_mask(mask1, pl)
    ell = torch.stack([_ce(la, ids1, target), _ce(lb, ids1, target)], 1).float()
    expect_w = torch.softmax(-ell, -1)
    assert torch.allclose(w1, expect_w, atol=1e-5)
    expect = w1[:, 0, None, None] * la + w1[:, 1, None, None] * lb
    assert torch.allclose(out1, expect, atol=1e-5)
    # without prompt_lengths, the first half of each text weights it
    fused.logits(ids1, mask1)
    half = fused.last_weights.scored_tokens.tolist()
    assert half == [2, 1]  # floor(6/2) = 3 prompt tokens -> 2 targets; floor(4/2) = 2 -> 1


def test_identical_tokenizers_pass_and_different_ones_fail(family, tmp_path):
    root, tok, a, b = family
    FusedLogitModel([a, b], tokenizers=[tok, tok], names=["A", "B"])
    other_chars = CHARS.copy()
    other_chars[13] = "x"  # id 4 + 13 = 17: '>' in A, 'x' in B
    other = _char_tokenizer(tmp_path / "other", other_chars)
    with pytest.raises(MergelabError, match=r"id 17 is '>' in A but 'x' in B"):
        FusedLogitModel([a, b], tokenizers=[tok, other], names=["A", "B"])
    shorter = _char_tokenizer(tmp_path / "short", CHARS[:-1])
    with pytest.raises(MergelabError, match=r"id 27 is ' ' in A but missing in B"):
        FusedLogitModel([a, b], tokenizers=[tok, shorter], names=["A", "B"])


def test_padding_rows_only_difference_is_accepted(family):
    _, tok, a, _ = family
    padded = _tiny_llama(len(tok) + 8, 5)
    state = {}
    for name, value in a.state_dict().items():
        rows = padded.state_dict()[name].shape[0]
        extra = torch.randn(rows - value.shape[0], *value.shape[1:]) if rows > value.shape[0] else value[:0]
        state[name] = torch.cat([value, extra])  # same weights, 8 random rows appended
    padded.load_state_dict(state)
    fused = FusedLogitModel([a, padded], weighting="uniform", tokenizers=[tok, tok])
    assert fused.vocab_size == len(tok)
    ids, mask = _left_pad([[1, 5, 6, 7]])
    out = fused.logits(ids, mask, torch.tensor([3]))
    assert out.shape == (1, 4, len(tok))
    assert torch.allclose(out, a(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    fewer = _tiny_llama(len(tok) - 1, 3)
    with pytest.raises(MergelabError, match="output rows"):
        FusedLogitModel([a, fewer], tokenizers=[tok, tok], names=["A", "C"])


def test_one_model_fusion_generates_like_the_model(family):
    _, _, a, _ = family
    ids, mask = _left_pad([[1, 5, 6, 7, 8], [1, 9, 4]])
    want = a.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
        eos_token_id=None,
    )[:, ids.shape[1] :].tolist()
    got = FusedLogitModel([a]).generate_greedy(ids, mask, max_new_tokens=8)
    assert got == want


def test_cached_generation_equals_uncached_fused_argmax(family):
    _, _, a, b = family
    ids, mask = _left_pad([[1, 5, 6, 7, 8], [1, 9, 4]])
    fused = FusedLogitModel([a, b], weighting="opt")
    got = fused.generate_greedy(ids, mask, max_new_tokens=6)
    prompt_len = mask.sum(-1)
    cur_ids, cur_mask, ref = ids, mask, [[], []]
    for _ in range(6):
        nxt = fused.logits(cur_ids, cur_mask, prompt_len)[:, -1].argmax(-1)
        for r in range(2):
            ref[r].append(int(nxt[r]))
        cur_ids = torch.cat([cur_ids, nxt[:, None]], 1)
        cur_mask = torch.cat([cur_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    assert got == ref
    # stop and eos end a row; the stopping token is kept, as transformers does
    eos = ref[0][2]
    out = fused.generate_greedy(ids, mask, 6, eos_token_id=eos, stop=lambda toks: len(toks) >= 4)
    assert out[0] == ref[0][: ref[0].index(eos) + 1]
    assert len(out[1]) == min(4, ref[1].index(eos) + 1 if eos in ref[1] else 4)


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
@pytest.mark.parametrize("weighting", ["sim", "uniform", "top1", "opt"])
def test_generation_weights_equal_the_all_logits_weights_and_free_prompt_logits(family, weighting, compiled):
    """sim, uniform and top1 take each model's ℓ as soon as its prompt logits exist and keep
    only their last position: the weights and tokens are those of the K-logit computation, and
    a model's [B, T, V] prompt logits are gone before the next model's prefill (opt, whose line
    search mixes them, keeps all K)."""
    import weakref

    from mergelab.fusion import _weights_from_losses

    _, _, a, b = family
    c = _tiny_llama(a.config.vocab_size, 3)
    ids, mask = _left_pad([[1, 5, 6, 7, 8, 9, 4], [1, 9, 4, 3], [6]])  # the last: no prompt target
    fused = FusedLogitModel([a, b, c], weighting=weighting, tau=0.7)
    alive_at_prefill, refs = [], []
    for m in fused.members:
        def prefill(input_ids, attention_mask, use_cache=True, _orig=m.prefill):
            alive_at_prefill.append(sum(r() is not None for r in refs))
            lg, st = _orig(input_ids, attention_mask, use_cache)
            # an array of our own under the tensor: it lives as long as any view of the logits
            arr = lg.numpy().copy()
            refs.append(weakref.ref(arr))
            return torch.from_numpy(arr), st
        m.prefill = prefill
    got = fused.generate_greedy(ids, mask, max_new_tokens=5)
    with torch.inference_mode():
        want_w = fused.weights(ids, mask)  # every model's logits at once, as `logits` computes them
    assert torch.equal(fused.last_weights.weights, want_w.weights)
    assert torch.equal(fused.last_weights.log_ppl, want_w.log_ppl)
    assert fused.last_weights.weights[2].tolist() == pytest.approx([1 / 3] * 3)  # no target: uniform
    # the tokens are the argmax of the fused logits, step by step, without a cache
    cur_ids, cur_mask, ref = ids, mask, [[], [], []]
    for _ in range(5):
        nxt = fused.logits(cur_ids, cur_mask, mask.sum(-1))[:, -1].argmax(-1)
        for r in range(3):
            ref[r].append(int(nxt[r]))
        cur_ids = torch.cat([cur_ids, nxt[:, None]], 1)
        cur_mask = torch.cat([cur_mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    assert got == ref
    assert alive_at_prefill[:3] == ([0, 1, 2] if weighting == "opt" else [0, 0, 0])
    if weighting != "opt":
        with pytest.raises(ValueError, match="opt weights need"):
            _weights_from_losses("opt", want_w.log_ppl, torch.ones(3, 2, dtype=torch.bool), 1.0)


def test_protocol_members_are_fused_without_a_cache(family):
    from mergelab.eval.models import HFLogitModel

    class Plain:  # a LogitModel with no `.model`: rescored at every step
        def __init__(self, inner):
            self.inner, self.device, self.vocab_size = inner, inner.device, inner.vocab_size

        def logits(self, input_ids, attention_mask, prompt_lengths=None):
            return self.inner.logits(input_ids, attention_mask)

    _, tok, a, b = family
    ids, mask = _left_pad([[1, 5, 6, 7, 8], [1, 9, 4]])
    ref = FusedLogitModel([a, b]).generate_greedy(ids, mask, 5)
    plain = FusedLogitModel([Plain(HFLogitModel(a, tok)), HFLogitModel(b, tok)])
    assert plain.generate_greedy(ids, mask, 5) == ref


# -- recipes ---------------------------------------------------------------------------------------
def test_fusion_recipe_validation_messages():
    ok = validate_fusion_recipe({"merge_method": "logit_fusion", "models": ["a", {"model": "b"}]})
    assert [m.model for m in ok.models] == ["a", "b"]
    assert (ok.parameters.weighting, ok.parameters.tau, ok.parameters.grid_step) == ("sim", 1.0, 0.05)
    bad = {"merge_method": "logit_fusion", "models": ["a"], "parameters": {"weighting": "best"}}
    with pytest.raises(MergelabError, match=r"parameters.weighting.*allowed values: sim, opt, uniform, top1"):
        validate_fusion_recipe(bad)
    with pytest.raises(MergelabError, match=r"parameters.tau.*greater than 0"):
        validate_fusion_recipe({"merge_method": "logit_fusion", "models": ["a"], "parameters": {"tau": 0}})
    with pytest.raises(MergelabError, match=r"`models`.*at least 1"):
        validate_fusion_recipe({"merge_method": "logit_fusion", "models": []})
    with pytest.raises(MergelabError, match=r"unknown field `parameters.temperature`"):
        validate_fusion_recipe({"merge_method": "logit_fusion", "models": ["a"], "parameters": {"temperature": 1}})
    assert is_fusion_recipe({"merge_method": "logit_fusion"})
    assert not is_fusion_recipe({"merge_method": "linear"}) and not is_fusion_recipe("x")
    with pytest.raises(MergelabError, match="tau must be a positive"):
        FusedLogitModel([torch.nn.Linear(1, 1)], tau=-1.0)


def test_fusion_recipe_loads_and_scores(family, tmp_path):
    root, tok, a, b = family
    recipe = tmp_path / "fuse.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "logit_fusion",
        "models": [{"model": str(root / "a")}, {"model": str(root / "b")}],
        "parameters": {"weighting": "opt", "tau": 0.5, "grid_step": 0.1},
    }))
    fused, tokenizer = load_fusion(recipe)
    assert (fused.weighting, fused.tau, fused.grid_step) == ("opt", 0.5, 0.1)
    assert fused.names == [str(root / "a"), str(root / "b")]
    assert tokenizer.get_vocab() == tok.get_vocab()
    ids, mask = _left_pad([[1, 5, 6, 7]])
    ref = FusedLogitModel([a, b], weighting="opt", tau=0.5, grid_step=0.1)
    assert torch.allclose(fused.logits(ids, mask, torch.tensor([3])), ref.logits(ids, mask, torch.tensor([3])), atol=1e-5)
    missing = {"merge_method": "logit_fusion", "models": [str(tmp_path / "nope")]}
    with pytest.raises(MergelabError, match=r"models\[0\].*was not found"):
        load_fusion(missing)


def test_fusion_recipe_with_a_merge_recipe_is_a_hybrid(family, tmp_path, monkeypatch):
    root, tok, a, b = family
    merge = tmp_path / "merge.yml"
    merge.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}},
                   {"model": str(root / "b"), "parameters": {"weight": 0.5}}],
    }))
    calls = []

    def fake_load_recipe_model(path, device="auto"):
        calls.append((path, str(device)))
        return b, tok

    monkeypatch.setitem(sys.modules, "mergelab.trial", types.SimpleNamespace(load_recipe_model=fake_load_recipe_model))
    recipe = tmp_path / "hybrid.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "logit_fusion", "models": [str(root / "a"), "merge.yml"]}))
    fused, _ = load_fusion(recipe)
    assert calls == [(str(merge), "cpu")]  # relative entry resolved from the recipe's folder
    assert fused.names == [str(root / "a"), "merge.yml"]
    nested = tmp_path / "nested.yml"
    nested.write_text(yaml.safe_dump({"merge_method": "logit_fusion", "models": ["hybrid.yml"]}))
    with pytest.raises(MergelabError, match="nested fusions are not supported"):
        load_fusion(nested)


# -- CLI -------------------------------------------------------------------------------------------
def test_fuse_command_generates_and_prints_weights(family):
    from click.testing import CliRunner

    from mergelab.cli.fuse_cmd import fuse

    root, tok, a, b = family
    res = CliRunner().invoke(
        fuse, ["--models", str(root / "a"), str(root / "b"), "--weights", "top1", "--prompt", "12+3=",
               "--max-new-tokens", "5", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    enc = tok("12+3=", return_tensors="pt")
    fused = FusedLogitModel([a, b], weighting="top1")
    new = fused.generate_greedy(enc["input_ids"], enc["attention_mask"], 5, eos_token_id=tok.eos_token_id)
    w = fused.last_weights.weights[0].tolist()
    assert f"{root / 'a'}" in res.output and f"{w[0]:.3f}" in res.output and f"{w[1]:.3f}" in res.output
    assert res.output.rstrip().endswith(tok.decode(new[0], skip_special_tokens=True).rstrip())
    bad = CliRunner().invoke(fuse, ["--prompt", "x"])
    assert bad.exit_code != 0 and "--models" in str(bad.exception or bad.output)
