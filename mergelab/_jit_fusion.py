"""Compiled loops (numba, optional) for logit fusion's prompt cross-entropies and PackLLM-opt's
grid line search; mergelab.fusion uses them on the CPU when numba is installed (`mergelab[fast]`).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import numpy as np
import torch

# Why: a torch evaluation of the fused cross-entropy at one weighting makes ~7 passes over the
# [prompt rows, V] logits, and opt's Fibonacci search needs ~7 evaluations per added model. Here a
# row is read once per model, and every grid point of a line search comes out of one read: along
# a line the fused logits are μ·a + (1−μ)·b, so exp of the shifted logits at μ = 1 − i·h is
# exp(α)·exp(h·δ)^i (α, β the rows shifted by their maxima, δ = β − α): two exponentials per
# element, then one multiply-add per grid point.
#
# The exponential is Cephes' expf (Cody–Waite reduction, degree-6 polynomial, ≤ 2 ulp) written so
# that LLVM vectorizes it (numba's np.exp is a scalar libm call here, ~9x slower). Values differ
# from torch's in the last bits; mergelab.fusion compares only numbers computed by these loops
# with each other (never a torch loss against a compiled one).

# An optional extra, like mergelab._jit: numba is imported on the first compiled call only, and
# MERGELAB_JIT=0 turns the compiled loops off (the torch code computes the same quantities).
AVAILABLE = importlib.util.find_spec("numba") is not None and os.environ.get("MERGELAB_JIT", "1") != "0"

_BLOCK = 1024  # elements per block: a block's work arrays stay in L1 across the grid points

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_C1 = _F(0.693359375)  # ln 2 split in two (Cody–Waite): C1 exact in a few bits, C2 the rest
_C2 = _F(-2.12194440e-4)
_P0 = _F(1.9875691500e-4)
_P1 = _F(1.3981999507e-3)
_P2 = _F(8.3334519073e-3)
_P3 = _F(4.1665795894e-2)
_P4 = _F(1.6666665459e-1)
_P5 = _F(5.0000001201e-1)
_LO = _F(-87.0)  # exp(-87) is near the smallest normal float32; below, terms are dropped
_HI = _F(88.0)
_ONE = _F(1.0)
_HALF = _F(0.5)
_ZERO = _F(0.0)
# The grid terms are scaled by e^_SHIFT so that, at a μ where the fused row's maximum sits up to
# _SAFE_GAP below the chord of the two rows' maxima, its largest term is still ≥ 1 while the
# terms lost to underflow stay below 1e-9 of it; no sum can overflow (V·e^60 ≪ 3e38). A row
# whose bound on that gap is larger (logit ranges over ~80 apart in the two models) is
# computed point by point in float64 instead.
_SHIFT = 60.0
_SAFE_GAP = 40.0


def _exp_block(x, out, bits, n):
    """out[j] = exp(x[j]) for j < n (float32; 0 below -87, arguments above 88 taken as 88).

    x may be out. Below -87 the result is 0, not e^-87: a chain multiplies it by large factors.
    """
    for j in range(n):
        xj = x[j]
        v = min(max(xj, _LO), _HI)
        k = np.floor(v * _LOG2E + _HALF)
        r = v - k * _C1
        r = r - k * _C2
        p = _P0
        p = p * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        out[j] = (p * r * r + r + _ONE) if xj >= _LO else _ZERO
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)  # 2^k as float32 bits
    scale = bits.view(np.float32)
    for j in range(n):
        out[j] = out[j] * scale[j]


def _block_sum(x, n):
    acc = _ZERO
    for j in range(n):
        acc += x[j]
    return acc


def _mix(arrs, wrow, r, z):
    """z = Σ_k w_k · logits_k[r], models with weight 0 skipped (so a one-hot weight copies)."""
    first = True
    for k in range(len(arrs)):
        w = wrow[k]
        if w == _ZERO:
            continue
        x = arrs[k][r]
        if first:
            for j in range(z.shape[0]):
                z[j] = x[j] * w
            first = False
        else:
            for j in range(z.shape[0]):
                z[j] += x[j] * w
    if first:
        for j in range(z.shape[0]):
            z[j] = _ZERO


_LANES = 64  # independent running maxima: a max reduction vectorizes only when split this way


def _row_max(x):
    """max(x) for NaN-free x: _LANES running maxima, merged at the end."""
    n = x.shape[0]
    m = x[0]
    if n < _LANES:
        for j in range(1, n):
            m = x[j] if x[j] > m else m
        return m
    acc = np.empty(_LANES, np.float32)
    for l in range(_LANES):
        acc[l] = x[l]
    full = n // _LANES * _LANES
    for j in range(_LANES, full, _LANES):
        for l in range(_LANES):
            v = x[j + l]
            acc[l] = v if v > acc[l] else acc[l]
    for l in range(_LANES):
        m = acc[l] if acc[l] > m else m
    for j in range(full, n):
        m = x[j] if x[j] > m else m
    return m


def _first_of(x, m):
    """The first index of the value m (present in x): a blockwise search."""
    n = x.shape[0]
    full = n // _LANES * _LANES
    for j in range(0, full, _LANES):
        hit = 0
        for l in range(_LANES):
            hit |= x[j + l] == m
        if hit:
            for l in range(_LANES):
                if x[j + l] == m:
                    return j + l
    for j in range(full, n):
        if x[j] == m:
            return j
    return 0


def _max_min_max(a, b):
    """(max a, min a, max b) for NaN-free rows of one length, in one read of each (the
    running extrema of _row_max, for three reductions at once)."""
    n = a.shape[0]
    amax = a[0]
    amin = a[0]
    bmax = b[0]
    if n < _LANES:
        for j in range(1, n):
            amax = a[j] if a[j] > amax else amax
            amin = a[j] if a[j] < amin else amin
            bmax = b[j] if b[j] > bmax else bmax
        return amax, amin, bmax
    hi = np.empty(_LANES, np.float32)
    lo = np.empty(_LANES, np.float32)
    hb = np.empty(_LANES, np.float32)
    for l in range(_LANES):
        hi[l] = a[l]
        lo[l] = a[l]
        hb[l] = b[l]
    full = n // _LANES * _LANES
    for j in range(_LANES, full, _LANES):
        for l in range(_LANES):
            va = a[j + l]
            vb = b[j + l]
            hi[l] = va if va > hi[l] else hi[l]
            lo[l] = va if va < lo[l] else lo[l]
            hb[l] = vb if vb > hb[l] else hb[l]
    for l in range(_LANES):
        amax = hi[l] if hi[l] > amax else amax
        amin = lo[l] if lo[l] < amin else amin
        bmax = hb[l] if hb[l] > bmax else bmax
    for j in range(full, n):
        amax = a[j] if a[j] > amax else amax
        amin = a[j] if a[j] < amin else amin
        bmax = b[j] if b[j] > bmax else bmax
    return amax, amin, bmax


def _one_hot(wrow):
    """k when wrow is the k-th unit vector (the row is then model k's logits as they are), else -1."""
    at = -1
    for k in range(wrow.shape[0]):
        if wrow[k] == _ONE and at == -1:
            at = k
        elif wrow[k] != _ZERO:
            return -1
    return at


def _lse_ce(z, y, tmp, bits):
    """logsumexp(z) − z[y] in float64, z shifted by its maximum."""
    vocab = z.shape[0]
    m = _row_max(z)
    s = 0.0
    for b0 in range(0, vocab, _BLOCK):
        n = min(_BLOCK, vocab - b0)
        for j in range(n):
            tmp[j] = z[b0 + j] - m
        _exp_block(tmp, tmp, bits, n)
        s += _block_sum(tmp, n)
    return float(m) + math.log(s) - float(z[y])


def _fused_ce(arrs, weights, rows, ys, exs, out):
    """out[c, e] += CE of row rows[i] under weighting c of its example e = exs[i] (target ys[i]).

    weights [C, B, K]: the C weightings share each row's reads. A one-hot weighting reads the
    model's row as it is; 1·x == x, so this is the value the mixing loop would give, and a
    single model's ℓ equals its one-hot fusion's exactly."""
    vocab = arrs[0].shape[1]
    z = np.empty(vocab, np.float32)
    tmp = np.empty(_BLOCK, np.float32)
    bits = np.empty(_BLOCK, np.int32)
    for i in range(rows.shape[0]):
        e = exs[i]
        for c in range(weights.shape[0]):
            k = _one_hot(weights[c, e])
            if k >= 0:
                out[c, e] += _lse_ce(arrs[k][rows[i]], ys[i], tmp, bits)
            else:
                _mix(arrs, weights[c, e], rows[i], z)
                out[c, e] += _lse_ce(z, ys[i], tmp, bits)


def _grid_row_f64(a, b, ma, mb, alpha_y, beta_y, h, n_uni, n_cols, out_row):
    """Every grid point directly, in float64 (rows whose logits are too far apart for the chains)."""
    vocab = a.shape[0]
    for c in range(n_cols):
        mu = 1.0 - c * h if c <= n_uni else 0.0
        m = -np.inf
        for j in range(vocab):
            m = max(m, mu * (float(a[j]) - float(ma)) + (1.0 - mu) * (float(b[j]) - float(mb)))
        s = 0.0
        for j in range(vocab):
            s += math.exp(mu * (float(a[j]) - float(ma)) + (1.0 - mu) * (float(b[j]) - float(mb)) - m)
        out_row[c] += m + math.log(s) - (mu * alpha_y + (1.0 - mu) * beta_y)


def _chain(t, q, q2, n, c0, step, count, sums):
    """sums[c0 + m·step] += Σ_j t·q^(m + 1) for m < count, t advanced in place, two grid points
    a loop: with q2 = q·q (independent products, twice the throughput of t·q·q) when q2 is
    given (the caller's guarantee that q·q cannot overflow where t is not 0), else in turn."""
    m = 0
    while m + 1 < count:
        acc1 = _ZERO
        acc2 = _ZERO
        if q2.shape[0] > 0:
            for j in range(n):
                v1 = t[j] * q[j]
                v2 = t[j] * q2[j]
                t[j] = v2
                acc1 += v1
                acc2 += v2
        else:
            for j in range(n):
                v1 = t[j] * q[j]
                v2 = v1 * q[j]
                t[j] = v2
                acc1 += v1
                acc2 += v2
        sums[c0 + m * step] += acc1
        sums[c0 + (m + 1) * step] += acc2
        m += 2
    if m < count:
        acc1 = _ZERO
        for j in range(n):
            v1 = t[j] * q[j]
            t[j] = v1
            acc1 += v1
        sums[c0 + m * step] += acc1


def _grid_ce(arrs, wcur, nxt, rows, ys, exs, h, n_uni, mu_n, extra0, out):
    """out[e, i] += CE of row rows[i] fused as μ_i·(Σ wcur·logits) + (1−μ_i)·logits[nxt[e]].

    μ_i = 1 − i·h for i = 0..n_uni (μ_n the last); with extra0 a last column holds μ = 0.
    Terms are exp(α + i·h·δ + SHIFT) = A·Q^i, a chain of products from μ = 1; when the row's
    logits span too much for one chain, the lower half of the grid is a chain from μ_n instead
    (β-based), so no term is ever a large factor times an underflowed one.
    """
    vocab = arrs[0].shape[1]
    n_cols = n_uni + 1 + (1 if extra0 else 0)
    zbuf = np.empty(vocab, np.float32)
    ta = np.empty(_BLOCK, np.float32)
    tq = np.empty(_BLOCK, np.float32)
    tq2 = np.empty(_BLOCK, np.float32)
    te = np.empty(_BLOCK, np.float32)
    no_q2 = np.empty(0, np.float32)
    bits = np.empty(_BLOCK, np.int32)
    sums = np.empty(n_cols, np.float64)
    h32 = np.float32(h)
    mun32 = np.float32(mu_n)
    shift32 = np.float32(_SHIFT)
    for i in range(rows.shape[0]):
        r, e, y = rows[i], exs[i], ys[i]
        k = _one_hot(wcur[e])
        if k >= 0:
            a = arrs[k][r]
        else:
            _mix(arrs, wcur[e], r, zbuf)
            a = zbuf
        b = arrs[nxt[e]][r]
        ma, amin, mb = _max_min_max(a, b)
        ia, ib = _first_of(a, ma), _first_of(b, mb)
        alpha_y = float(a[y]) - float(ma)
        beta_y = float(b[y]) - float(mb)
        delta_y = beta_y - alpha_y
        # The fused row's maximum sits below the chord μ·ma + (1−μ)·mb by at most
        # min(μ·A1, (1−μ)·B1), A1 and B1 each model's top token under the other model.
        a1 = float(ma) - float(a[ib])
        b1 = float(mb) - float(b[ia])
        gap = a1 * b1 / (a1 + b1) if a1 + b1 > 0.0 else 0.0
        if gap > _SAFE_GAP:
            _grid_row_f64(a, b, ma, mb, alpha_y, beta_y, h, n_uni, n_cols, out[e])
            continue
        # One chain from μ = 1 serves the whole grid when no α is so low that exp(α + SHIFT)
        # underflows (its later powers would matter) and Q·Q cannot overflow.
        one_chain = float(ma) - float(amin) < min(140.0, 40.0 / h)
        half = n_uni if one_chain else n_uni // 2  # the α chain covers 0..half, the β chain the rest
        for c in range(n_cols):
            sums[c] = 0.0
        for b0 in range(0, vocab, _BLOCK):
            n = min(_BLOCK, vocab - b0)
            for j in range(n):
                al = a[b0 + j] - ma
                d = (b[b0 + j] - mb) - al
                ta[j] = al + shift32
                tq[j] = h32 * d
            _exp_block(ta, ta, bits, n)
            _exp_block(tq, tq, bits, n)
            sums[0] += _block_sum(ta, n)
            if one_chain:
                for j in range(n):
                    tq2[j] = tq[j] * tq[j]
                _chain(ta, tq, tq2, n, 1, 1, half, sums)
            else:
                _chain(ta, tq, no_q2, n, 1, 1, half, sums)
                # the β chain starts at μ_n and runs towards larger μ (smaller c)
                for j in range(n):
                    be = b[b0 + j] - mb
                    d = be - (a[b0 + j] - ma)
                    ta[j] = be - mun32 * d + shift32
                    tq[j] = -(h32 * d)
                _exp_block(ta, ta, bits, n)
                _exp_block(tq, tq, bits, n)
                sums[n_uni] += _block_sum(ta, n)
                _chain(ta, tq, no_q2, n, n_uni - 1, -1, n_uni - 1 - half, sums)
            if extra0:
                for j in range(n):
                    te[j] = b[b0 + j] - mb
                _exp_block(te, te, bits, n)
                sums[n_uni + 1] += _block_sum(te, n)
        for c in range(n_uni + 1):
            out[e, c] += math.log(sums[c]) - _SHIFT - (alpha_y + c * h * delta_y)
        if extra0:
            out[e, n_uni + 1] += math.log(sums[n_uni + 1]) - beta_y


@functools.cache
def _compiled() -> tuple:
    """(fused CE, grid CE), compiled on first use (and cached on disk by numba)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed (or MERGELAB_JIT=0); check _jit_fusion.AVAILABLE first")
    import numba

    # reassoc lets the sums vectorize, contract fuses multiply-adds; no nnan/ninf, so -inf
    # logits (masked tokens) keep their meaning.
    opts = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy",
                fastmath={"reassoc", "contract", "nsz", "arcp"})
    g = globals()
    for name in ("_exp_block", "_block_sum", "_mix", "_row_max", "_first_of", "_max_min_max", "_one_hot",
                 "_lse_ce", "_grid_row_f64", "_chain"):
        g[name] = numba.njit(inline="always", **opts)(g[name])
    return numba.njit(**opts)(_fused_ce), numba.njit(**opts)(_grid_ce)


def _weighted_sum(arrs, weights, rows_per_example, out):
    """out[r] = Σ_k w[e, k] · arrs[k][r] (e the example of row r), the k-th term added by a
    fused multiply-add as torch's addcmul_ does it, block by block so that out stays in L1."""
    vocab = out.shape[1]
    for r in range(out.shape[0]):
        e = r // rows_per_example
        for b0 in range(0, vocab, _BLOCK):
            n = min(_BLOCK, vocab - b0)
            o = out[r, b0 : b0 + n]  # slices: the inner loops vectorize (indexing out[r, j] does not)
            x = arrs[0][r, b0 : b0 + n]
            w = weights[e, 0]
            for j in range(n):
                o[j] = x[j] * w
            for k in range(1, len(arrs)):
                x = arrs[k][r, b0 : b0 + n]
                w = weights[e, k]
                for j in range(n):
                    o[j] = _fma(x[j], w, o[j])


@functools.cache
def _compiled_sum():
    """The weighted-sum loop, or None where it would not reproduce torch's sum bit for bit.

    fuse_logits' torch form (mul, then addcmul_ per model) is the reference; its CPU kernels
    use fused multiply-adds where the hardware has them, so the loop does too, and a probe
    checks the match once (a machine whose torch rounds differently keeps the torch form).
    """
    if not AVAILABLE:
        return None
    import numba
    from numba.core.extending import intrinsic

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen

    globals()["_fma"] = fma
    # No fastmath: each product and sum rounds as written (no reassociation, no contraction).
    fn = numba.njit(cache=True, nogil=True, boundscheck=False)(_weighted_sum)
    gen = torch.Generator().manual_seed(0)
    probe = [torch.randn(6, 3000, generator=gen) * 4 for _ in range(3)]
    w = torch.rand(2, 3, generator=gen)
    want = torch.mul(probe[0].view(2, 3, -1), w[:, :1, None])
    for k in (1, 2):
        want.addcmul_(probe[k].view(2, 3, -1), w[:, k : k + 1, None])
    got = torch.empty(6, 3000)
    fn(tuple(t.numpy() for t in probe), w.numpy(), 3, got.numpy())
    return fn if torch.equal(got.view(2, 3, -1), want) else None


def weighted_sum(logits: list[torch.Tensor], weights: torch.Tensor, out: torch.Tensor) -> bool:
    """out = Σ_k weights[:, k] · logits[k] for K float32 [B, ..., V] C-order CPU tensors (out may
    be logits[0]), one pass instead of K; False (nothing done) where the loop is not usable."""
    if (not AVAILABLE or out.dim() < 2 or tuple(weights.shape) != (out.shape[0], len(logits))
            or weights.device.type != "cpu" or not usable([out] + list(logits), flat=False)):
        return False
    fn = _compiled_sum()
    if fn is None:
        return False
    if out.numel() == 0:
        return True
    vocab, batch = out.shape[-1], out.shape[0]
    fn(tuple(t.reshape(-1, vocab).numpy() for t in logits),
       weights.to(torch.float32).contiguous().numpy(), out.numel() // (batch * vocab),
       out.view(-1, vocab).numpy())
    return True


def usable(logits: list[torch.Tensor], flat: bool = True) -> bool:
    """True when the compiled loops can read these [N, V] logits directly (CPU, float32, C order;
    any shape of the same size as the first when not flat)."""
    return AVAILABLE and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and (t.dim() == 2 if flat else t.shape == logits[0].shape)
        and t.is_contiguous()
        for t in logits
    )


def fused_ce_sums(logits: list[torch.Tensor], weights: torch.Tensor, rows: torch.Tensor,
                  ys: torch.Tensor, exs: torch.Tensor, batch: int) -> torch.Tensor:
    """[C, batch] float64: Σ over the rows of each example of the fused cross-entropy of its
    target, for each of C weightings [C, batch, K].

    logits: K float32 [N, V]; rows, ys, exs [n]: the row predicting each target, the target id,
    the example."""
    out = np.zeros((weights.shape[0], batch), np.float64)
    _compiled()[0](tuple(t.numpy() for t in logits), weights.to(torch.float32).contiguous().numpy(),
                   rows.numpy(), ys.numpy(), exs.numpy(), out)
    return torch.from_numpy(out)


def grid_ce_sums(logits: list[torch.Tensor], w_cur: torch.Tensor, nxt: torch.Tensor, rows: torch.Tensor,
                 ys: torch.Tensor, exs: torch.Tensor, batch: int, h: float, n_uni: int, extra0: bool
                 ) -> torch.Tensor:
    """[batch, n_uni + 1 (+1)] float64: per-example CE sums at μ = 1 − i·h (i = 0..n_uni), and at
    μ = 0 in a last column when extra0, of the fusion μ·(Σ w_cur·logits) + (1 − μ)·logits[nxt]."""
    out = np.zeros((batch, n_uni + 1 + (1 if extra0 else 0)), np.float64)
    mu_n = max(0.0, 1.0 - n_uni * h)
    _compiled()[1](tuple(t.numpy() for t in logits), w_cur.to(torch.float32).contiguous().numpy(),
                   nxt.numpy(), rows.numpy(), ys.numpy(), exs.numpy(), float(h), int(n_uni),
                   float(mu_n), bool(extra0), out)
    return torch.from_numpy(out)
