"""Compiled (numba, extra `fast`) loops for the merge kernels: linear and task-vector element passes
that write the output dtype's values, the fused DARE mask + L1 passes (whole or streamed slice by
slice, or in the trial merger from the 16-bit checkpoints as stored and 1-byte draw keys), torch's
CPU generator stream (mt19937) for DARE's draws, and the TIES top-k selection.

Why: the torch kernels in `_fast` make ~45 element-wise passes over each slice for a TIES
candidate against ~8 for a linear one; these loops make one, over the elements with the rows
inside, which the compiler vectorizes. They perform the same float32 operations in the same
order as the torch path (`_fast._Row.apply_` then `operators.task_vectors.combine_`,
`operators.linear.weighted_sum_` with addcmul_'s FMA where torch uses it, the output dtype's
round-to-nearest-even, torch's serial sum for the L1 norm, the generator's numbers in its
order), so results are equal bit for bit; tests/test_jit.py checks each against the torch path.
Where an equivalence depends on this machine's torch (FMA in addcmul_, the sum's vector width,
the generator's stream) a probe decides, and the torch path runs when the probe cannot match it.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any, NamedTuple

import numpy as np
import torch

# An optional extra: without numba the engine and the trial merger use the torch kernels (same
# values). Only looked up here: numba (~50 MB, ~0.3 s) is imported on the first compiled call, so
# a linear `mergelab merge`, which makes none, does not pay for it. MERGELAB_JIT=0 turns the
# compiled loops off (to compare, or to rule them out when debugging).
AVAILABLE = importlib.util.find_spec("numba") is not None and os.environ.get("MERGELAB_JIT", "1") != "0"

_BLOCK = 2048  # elements per inner block: every row's block stays in L1, loops vectorize

MODE_ALL, MODE_CUT, MODE_MASK = 0, 1, 2


def _kernel(deltas, masks, mode, thr, cut, div, has_div, fac, has_fac, w, consensus,
            normalize, lin_div, lam, has_lam, base, s, e, out):
    """out[j - s] for j in [s, e): base + λ·mix(w·sparsify(τ)) exactly as the torch kernels."""
    R = len(deltas)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    d = np.empty((R, _BLOCK), np.float32)
    total = np.empty(_BLOCK, np.float32)
    mixed = np.empty(_BLOCK, np.float32)
    divisor = np.empty(_BLOCK, np.float32)
    for b0 in range(s, e, _BLOCK):
        b1 = min(e, b0 + _BLOCK)
        n = b1 - b0
        for j in range(n):
            total[j] = zero
            mixed[j] = zero
            divisor[j] = zero
        for r in range(R):
            # one simple loop per step, with the per-row switches outside them, so each loop
            # vectorizes; the block stays in L1 across the steps
            x_r = deltas[r]
            md = mode[r]
            wr = w[r]
            if md == 1 and not has_div[r] and not has_fac[r]:  # TIES: all in one loop
                t, c = thr[r], cut[r] - b0
                for j in range(n):
                    x = x_r[b0 + j]
                    a = abs(x)
                    keep = (a > t) | ((a == t) & (j <= c))
                    v = (x if keep else zero) * wr
                    d[r, j] = v
                    total[j] += v
                continue
            if md == 2 and not has_div[r]:  # DARE with L1 rescale (or none): one loop
                m_r = masks[r]
                fc = fac[r] if has_fac[r] else one
                for j in range(n):
                    v = ((x_r[b0 + j] if m_r[b0 + j] != 0 else zero) * fc) * wr
                    d[r, j] = v
                    total[j] += v
                continue
            if md == 1:
                t, c = thr[r], cut[r] - b0
                for j in range(n):
                    x = x_r[b0 + j]
                    a = abs(x)
                    keep = (a > t) | ((a == t) & (j <= c))
                    d[r, j] = x if keep else zero
            elif md == 2:
                m_r = masks[r]
                for j in range(n):
                    d[r, j] = x_r[b0 + j] if m_r[b0 + j] != 0 else zero
            else:
                for j in range(n):
                    d[r, j] = x_r[b0 + j]
            if has_div[r]:
                dv = div[r]
                for j in range(n):
                    d[r, j] = d[r, j] / dv
            if has_fac[r]:
                fc = fac[r]
                for j in range(n):
                    d[r, j] = d[r, j] * fc
            for j in range(n):
                v = d[r, j] * wr
                d[r, j] = v
                total[j] += v
        if consensus:
            for r in range(R):
                wr = w[r]
                for j in range(n):
                    v = d[r, j]
                    pos = total[j] >= zero
                    agree = ((v > zero) & pos) | ((v < zero) & (not pos))
                    mixed[j] += v if agree else zero
                    divisor[j] += wr if agree else zero
            if normalize:
                for j in range(n):
                    q = divisor[j]
                    mixed[j] = mixed[j] / (one if q == zero else q)
        else:
            for j in range(n):
                mixed[j] = total[j]
            if normalize:
                for j in range(n):
                    mixed[j] = mixed[j] / lin_div
        if has_lam:
            for j in range(n):
                mixed[j] = mixed[j] * lam
        for j in range(n):
            out[b0 - s + j] = mixed[j] + base[b0 + j]


def _linear_kernel_16(xs, w, fused, normalize, div, rmode, out):
    """`_linear_kernel` over 16-bit sources as stored (`bits16` views: the array type picks
    float16 or bfloat16 at compile time), widened to float32 in the loop exactly as torch's
    .float() does: half the bytes read, and no format test in the loop."""
    _wide()
    R = len(xs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        acc = zero + _wid(xs[0][j]) * w[0]
        for r in range(1, R):
            x = _wid(xs[r][j])
            if fused:
                acc = _fma(x, w[r], acc)
            else:
                acc = acc + x * w[r]
        if normalize:
            acc = acc / div
        out[j] = _round(acc, rmode)


def _sub16_kernel(m, b, half, out):
    """out = θ − base over 16-bit bit patterns (float16 when `half`, else bfloat16), each widened to
    float32 exactly (as torch's .float()) and subtracted in float32."""
    for j in range(out.shape[0]):
        x = _h2f(m[j]) if half else _b2f(m[j])
        y = _h2f(b[j]) if half else _b2f(b[j])
        out[j] = x - y


def _dare_prepass(u, tau, density, mask, absm):
    """mask = u < density; absm = |τ|·mask (what `_fast._l1_factor` sums), in one pass."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(u.shape[0]):
        keep = u[j] < density
        mask[j] = keep
        absm[j] = abs(tau[j]) * (one if keep else zero)  # a product, as torch: NaN·0 stays NaN


# Output rounding of a float32 result: ROUND_NONE keeps it, ROUND_F16 / ROUND_BF16 round it to
# float16 / bfloat16 and write that value back as float32 (a float32 model parameter holding the
# output dtype's value, exactly `param.copy_(result.to(out_dtype))`).
ROUND_NONE, ROUND_F16, ROUND_BF16 = 0, 1, 2


def round_mode(out_dtype: torch.dtype) -> int | None:
    """The rounding the compiled loops apply for an output dtype, None when they cannot."""
    return {torch.float32: ROUND_NONE, torch.float16: ROUND_F16, torch.bfloat16: ROUND_BF16}.get(out_dtype)


def _round_py(v, rmode):
    """v (float32) rounded through the output dtype and back to float32, as torch's conversions
    round (to nearest, ties to even): float16 by the hardware conversion (LLVM's fptrunc to half,
    the instruction torch's vectorized conversion uses), bfloat16 by c10::BFloat16's integer
    rounding (NaN becomes the quiet NaN). Both are computed and one selected: without branches
    the element loops that call this stay vectorized."""
    h = _f16rt(v)
    bf = _bf16rt(v)
    return v if rmode == 0 else (h if rmode == 1 else bf)


def _linear_kernel(xs, w, fused, normalize, div, rmode, out):
    """out[j] = Σ wᵢ·xᵢ[j] (/ div), rounded through the output dtype, with the operations of
    operators.linear.weighted_sum_ (0 + x₀w₀, then + xᵢwᵢ in order, then / div; `fused`: each
    + xᵢwᵢ rounds once, as torch's addcmul_ does where it uses FMA). One loop over the elements
    with the rows inside (their count is a compile-time constant, so that loop unrolls and the
    element loop vectorizes, every input streamed once)."""
    R = len(xs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        acc = zero + xs[0][j] * w[0]
        for r in range(1, R):
            if fused:
                acc = _fma(xs[r][j], w[r], acc)
            else:
                acc = acc + xs[r][j] * w[r]
        if normalize:
            acc = acc / div
        out[j] = _round(acc, rmode)


def _elect_py(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam):
    """The combine step shared by the element-wise merge kernels: with consensus, the sum of the
    rows agreeing with the sign of the total (divided by their weights when normalizing, 1 where
    none agrees), else the total (divided by lin_div when normalizing); then times λ. Inlined
    into each kernel in numba's IR (like `_round`), so the element loop still vectorizes."""
    zero = np.float32(0.0)
    if consensus:
        pos = total >= zero
        mixed = p_sum if pos else n_sum
        divisor = p_w if pos else n_w
        if normalize:
            mixed = mixed / (np.float32(1.0) if divisor == zero else divisor)
    else:
        mixed = total
        if normalize:
            mixed = mixed / lin_div
    if has_lam:
        mixed = mixed * lam
    return mixed


def _masked_kernel(xs, masks, fac, w, consensus, normalize, lin_div, lam, has_lam, base, rmode, out):
    """out[j] = base + λ·mix(wᵢ·((τᵢ·mᵢ)·fᵢ)) rounded through the output dtype: `_kernel` with
    every row a full 0/1 mask and a factor (1 where there is none: ·1 is exact), the usual DARE
    and TIES-with-L1-rescale case. One loop over the elements with the rows inside (unrolled:
    their count is a compile-time constant), so the element loop vectorizes and every input is
    streamed once; the consensus step recomputes each row's value instead of storing it."""
    R = len(xs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        total = zero
        # the agreeing rows' sums for either elected sign, in row order (adding +0 for the
        # others, as the torch kernels add v·0): the election then picks one, with no second pass
        p_sum = zero
        n_sum = zero
        p_w = zero
        n_w = zero
        for r in range(R):
            v = ((xs[r][j] if masks[r][j] != 0 else zero) * fac[r]) * w[r]
            total += v
            p_sum += v if v > zero else zero
            n_sum += v if v < zero else zero
            p_w += w[r] if v > zero else zero
            n_w += w[r] if v < zero else zero
        mixed = _elect(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam)
        out[j] = _round(mixed + base[j], rmode)


def _cut_kernel(xs, thr, w, consensus, normalize, lin_div, lam, has_lam, base, rmode, out):
    """`_masked_kernel` with every row kept where |τ| > thr (TIES, no factor): the caller splits
    the tensor where a row's tie cutoff falls, and within a piece that keeps a row's ties it
    passes the float just below the threshold (|τ| > prev(t) ⟺ |τ| >= t), so the element loop
    holds no index comparison."""
    R = len(xs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        total = zero
        p_sum = zero  # as in _masked_kernel
        n_sum = zero
        p_w = zero
        n_w = zero
        for r in range(R):
            x = xs[r][j]
            v = (x if abs(x) > thr[r] else zero) * w[r]
            total += v
            p_sum += v if v > zero else zero
            n_sum += v if v < zero else zero
            p_w += w[r] if v > zero else zero
            n_w += w[r] if v < zero else zero
        mixed = _elect(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam)
        out[j] = _round(mixed + base[j], rmode)


def _cut_idx_kernel(xs, strict, below, cut, w, consensus, normalize, lin_div, lam, has_lam, base, rmode, out):
    """`_cut_kernel` over a whole tensor in one call: row r keeps |τ| > below[r] (that is, |τ| >=
    its threshold) at flat indices <= cut[r] and |τ| > strict[r] after, a select per element
    instead of one call per piece between the cutoffs."""
    R = len(xs)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        total = zero
        p_sum = zero  # as in _masked_kernel
        n_sum = zero
        p_w = zero
        n_w = zero
        for r in range(R):
            x = xs[r][j]
            t = below[r] if j <= cut[r] else strict[r]
            v = (x if abs(x) > t else zero) * w[r]
            total += v
            p_sum += v if v > zero else zero
            n_sum += v if v < zero else zero
            p_w += w[r] if v > zero else zero
            n_w += w[r] if v < zero else zero
        mixed = _elect(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam)
        out[j] = _round(mixed + base[j], rmode)


def _cut16_kernel(ms, b, strict, below, cut, w, consensus, normalize, lin_div, lam, has_lam, rmode, out):
    """`_cut_idx_kernel` from 16-bit sources as stored: τᵣ = θᵣ − base and the base widened exactly
    in the loop (`_wid`), row r kept where |τ| > below[r] at flat indices <= cut[r] and |τ| >
    strict[r] after, the same float32 operations after."""
    _wide()
    R = len(ms)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        bj = _wid(b[j])
        total = zero
        p_sum = zero  # as in _masked_kernel
        n_sum = zero
        p_w = zero
        n_w = zero
        for r in range(R):
            x = _wid(ms[r][j]) - bj
            t = below[r] if j <= cut[r] else strict[r]
            v = (x if abs(x) > t else zero) * w[r]
            total += v
            p_sum += v if v > zero else zero
            n_sum += v if v < zero else zero
            p_w += w[r] if v > zero else zero
            n_w += w[r] if v < zero else zero
        mixed = _elect(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam)
        out[j] = _round(mixed + bj, rmode)


def _ceil_log2_py(x):
    """c10's utils::CeilLog2: 1 up to 2, else the bit length of x - 1."""
    if x <= 2:
        return 1
    b = 0
    y = x - 1
    while y > 0:
        y >>= 1
        b += 1
    return b


def _cascade_py(u, tau, t, mask, acc, start, size, W):
    """torch's multi_row_sum over `size` groups of W consecutive values (|τ|·(u < t), the mask
    written on the way) starting at flat index `start`: W lane sums, each a 4-level cascade
    whose levels close every 2^p groups; returns with the level sums folded into acc[0]."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    p = max(4, _ceil_log2(size) // 4)
    step = 1 << p
    lmask = step - 1
    for lev in range(4):
        for lane in range(W):
            acc[lev, lane] = zero
    a0 = acc[0]
    full = (size // step) * step
    i = 0
    while i < size:
        # the groups up to the next carry point in one loop nest (no carry test per group):
        # slices indexed by non-negative counters, so the lane loop vectorizes
        nxt = min(size, (i // step + 1) * step)
        o = start + i * W
        cnt = (nxt - i) * W
        ub = u[o:o + cnt]
        tb = tau[o:o + cnt]
        mb = mask[o:o + cnt]
        for g in range(nxt - i):
            gw = g * W
            for lane in range(W):
                keep = ub[gw + lane] < t
                mb[gw + lane] = keep
                a0[lane] += abs(tb[gw + lane]) * (one if keep else zero)
        i = nxt
        if (i & lmask) == 0 and i <= full:  # a full step closed: carry up
            for lev in range(1, 4):
                for lane in range(W):
                    acc[lev, lane] += acc[lev - 1, lane]
                    acc[lev - 1, lane] = zero
                if (i & (lmask << (lev * p))) != 0:
                    break
    for lev in range(1, 4):
        for lane in range(W):
            acc[0, lane] += acc[lev, lane]


def _dare_mask_l1(u, tau, t, L, mask):
    """mask = u < t and Σ|τ|·mask summed in the order of torch's serial float32 sum over a flat
    tensor (aten SumKernel: vectors of L lanes read 4 at a time into a cascade of partial sums,
    then the leftover vectors, the leftover elements and the lanes, in that order), so the
    value equals l1_norm_of_abs(|τ|·mask) bit for bit, without writing |τ|·mask."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    n = u.shape[0]
    V = n // L
    if V == 0:  # shorter than one vector: the scalar row sum, 4 interleaved partial sums
        acc = np.zeros((4, 4), np.float32)
        size = n // 4
        _cascade(u, tau, t, mask, acc, 0, size, 4)
        s = acc[0, 0]
        for e in range(size * 4, n):
            keep = u[e] < t
            mask[e] = keep
            s += abs(tau[e]) * (one if keep else zero)
        for k in range(1, 4):
            s += acc[0, k]
        return zero + s
    W = 4 * L
    acc = np.zeros((4, W), np.float32)
    size = V // 4
    _cascade(u, tau, t, mask, acc, 0, size, W)
    for v in range(size * 4, V):  # leftover vectors, into the first partial sum
        o = v * L
        for lane in range(L):
            keep = u[o + lane] < t
            mask[o + lane] = keep
            acc[0, lane] += abs(tau[o + lane]) * (one if keep else zero)
    for k in range(1, 4):
        for lane in range(L):
            acc[0, lane] += acc[0, k * L + lane]
    s = zero
    for e in range(V * L, n):
        keep = u[e] < t
        mask[e] = keep
        s += abs(tau[e]) * (one if keep else zero)
    for lane in range(L):
        s += acc[0, lane]
    return zero + s


def _l1_stream_py(tau, mask, s, n, L, accb, acca, st):
    """(Σ|τ|, Σ|τ|·mask) in torch's serial float32 order, fed slice by slice: the slice
    [s, s + len(tau)) of a tensor of n >= L elements (s a multiple of W = 4L; every slice but the
    last ends on one). Its groups of W go into two running cascades as `_cascade_py` builds one
    (accb for |τ|, acca for |τ|·mask: (4, W), zero at first; st[0]: groups done); the last slice
    adds the leftovers and returns the two sums ((0, 0) before). `_l1_pair_py` is its one-slice use."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    V = n // L
    W = 4 * L
    size = V // 4
    p = max(4, _ceil_log2(size) // 4)
    step = 1 << p
    lmask = step - 1
    full = (size // step) * step
    e = s + tau.shape[0]
    b0 = accb[0]
    a0 = acca[0]
    i = st[0]
    gend = min(size, e // W)
    while i < gend:
        nxt = min(gend, (i // step + 1) * step)
        o = i * W - s
        cnt = (nxt - i) * W
        tb = tau[o:o + cnt]
        mb = mask[o:o + cnt]
        for g in range(nxt - i):
            gw = g * W
            for lane in range(W):
                x = abs(tb[gw + lane])
                b0[lane] += x
                a0[lane] += x * (one if mb[gw + lane] != 0 else zero)
        i = nxt
        if (i & lmask) == 0 and i <= full:
            for lev in range(1, 4):
                for lane in range(W):
                    accb[lev, lane] += accb[lev - 1, lane]
                    accb[lev - 1, lane] = zero
                    acca[lev, lane] += acca[lev - 1, lane]
                    acca[lev - 1, lane] = zero
                if (i & (lmask << (lev * p))) != 0:
                    break
    st[0] = i
    if e < n:
        return zero, zero
    for lev in range(1, 4):
        for lane in range(W):
            accb[0, lane] += accb[lev, lane]
            acca[0, lane] += acca[lev, lane]
    for v in range(size * 4, V):
        o = v * L - s
        for lane in range(L):
            x = abs(tau[o + lane])
            accb[0, lane] += x
            acca[0, lane] += x * (one if mask[o + lane] != 0 else zero)
    for k in range(1, 4):
        for lane in range(L):
            accb[0, lane] += accb[0, k * L + lane]
            acca[0, lane] += acca[0, k * L + lane]
    sb = zero
    sa = zero
    for j in range(V * L, n):
        x = abs(tau[j - s])
        sb += x
        sa += x * (one if mask[j - s] != 0 else zero)
    for lane in range(L):
        sb += accb[0, lane]
        sa += acca[0, lane]
    return zero + sb, zero + sa


def _l1_pair_py(tau, mask, L):
    """(Σ|τ|, Σ|τ|·mask), each summed in the order of torch's serial float32 sum (as in
    `_dare_mask_l1`): `l1_norm_of_abs(|τ|)` and `l1_norm_of_abs(|τ|·mask)` bit for bit, in one
    read of τ and the mask: `_l1_stream_py` fed the whole tensor as its one slice. Below L
    elements torch sums 4 lanes of single elements, which is that loop with L = 1."""
    n = tau.shape[0]
    if n < L:
        L = 1
    accb = np.zeros((4, 4 * L), np.float32)
    acca = np.zeros((4, 4 * L), np.float32)
    st = np.zeros(1, np.int64)
    return _l1_stream(tau, mask, 0, n, L, accb, acca, st)

# torch's CPU generator is an mt19937 engine seeded with the low 32 bits of the seed; float32
# uniform_ takes one 32-bit output per element, keeps its low 24 bits and scales by 2^-24 (exact).
# These loops reproduce that stream, so DARE's masks need no float buffer and no torch draw;
# `mt_matches` checks them against this torch before they are used.
_MT_N = 624


def _mt_seed_py(seed, st):
    """init_genrand: the state of mt19937 seeded with a 32-bit value."""
    st[0] = np.uint32(seed)
    for j in range(1, _MT_N):
        p = st[j - 1]
        st[j] = np.uint32(1812433253) * (p ^ (p >> np.uint32(30))) + np.uint32(j)


def _mt_twist_py(st):
    """The next 624 words of state (three loops: each reads only words it may read, so each
    vectorizes)."""
    up = np.uint32(0x80000000)
    lo = np.uint32(0x7FFFFFFF)
    a = np.uint32(0x9908B0DF)
    one = np.uint32(1)
    z = np.uint32(0)
    for i in range(227):
        y = (st[i] & up) | (st[i + 1] & lo)
        st[i] = st[i + 397] ^ (y >> one) ^ ((z - (y & one)) & a)
    for i in range(227, 623):
        y = (st[i] & up) | (st[i + 1] & lo)
        st[i] = st[i - 227] ^ (y >> one) ^ ((z - (y & one)) & a)
    y = (st[623] & up) | (st[0] & lo)
    st[623] = st[396] ^ (y >> one) ^ ((z - (y & one)) & a)


def _mt_temper_py(st, out):
    """The 624 outputs of the current state, tempered, as float32 integers below 2^24 (their low
    24 bits, exact in float32)."""
    for k in range(_MT_N):
        y = st[k]
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        out[k] = np.float32(y & np.uint32(0xFFFFFF))


def _mt_draw_py(st, pos, t, mask, u, want_u):
    """The next len(mask) (or len(u)) float32 uniforms of the stream whose state is `st`, next
    word at `pos` (624: twist first): mask = u < t (uint8 0/1), and with `want_u` the uniforms
    themselves into u. Returns the new position. A state's outputs are tempered in one loop and
    consumed in another: each vectorizes."""
    n = u.shape[0] if want_u else mask.shape[0]
    scale = np.float32(1.0 / 16777216.0)
    tmp = np.empty(_MT_N, np.float32)
    if pos < _MT_N:
        _mt_temper(st, tmp)
    j = 0
    p = pos
    while j < n:
        if p == _MT_N:
            _mt_twist(st)
            _mt_temper(st, tmp)
            p = 0
        m = min(_MT_N - p, n - j)
        tb = tmp[p:p + m]
        if want_u:
            ub = u[j:j + m]
            for k in range(m):
                ub[k] = tb[k] * scale
        else:
            mb = mask[j:j + m]
            for k in range(m):
                mb[k] = np.uint8(1) if tb[k] * scale < t else np.uint8(0)
        j += m
        p += m
    return p


def _dare_rows_py(us, xs, ts, L, ms, after):
    """`_dare_mask_l1` for every row of a tensor in one call: ms[r] = us[r] < ts[r] and
    after[r] = ‖xs[r]·ms[r]‖₁ in torch's serial order."""
    for r in range(len(xs)):
        after[r] = _mask_l1(us[r], xs[r], ts[r], L, ms[r])


def _cascade16_py(ms, b, ks, T, acc, start, size, W):
    """`_cascade_py` for every row of a tensor at once, from the 16-bit sources as stored: row r's
    τ = θᵣ − base (each widened exactly by `_wid`, whose float16 or bfloat16 form the arrays'
    integer type fixes at compile time), kept where its draw's key byte ks[r] < T[r] (`DrawKeys`
    makes that exactly u < t), |τ|·keep summed into acc[r] in torch's order. Between two carry
    points the rows are taken one after the other over the same few groups (the base's slice
    stays in L1), so the base is read from memory once for all rows; nothing is written."""
    _wide()
    one = np.float32(1.0)
    zero = np.float32(0.0)
    R = len(ms)
    p = max(4, _ceil_log2(size) // 4)
    step = 1 << p
    lmask = step - 1
    for r in range(R):
        for lev in range(4):
            for lane in range(W):
                acc[r, lev, lane] = zero
    full = (size // step) * step
    i = 0
    while i < size:
        nxt = min(size, (i // step + 1) * step)
        o = start + i * W
        cnt = (nxt - i) * W
        bb = b[o:o + cnt]
        for r in range(R):
            mb = ms[r][o:o + cnt]
            kb = ks[r][o:o + cnt]
            a0 = acc[r, 0]
            tr = T[r]
            for g in range(nxt - i):
                gw = g * W
                for lane in range(W):
                    x = _wid(mb[gw + lane]) - _wid(bb[gw + lane])
                    a0[lane] += abs(x) * (one if np.int32(kb[gw + lane]) < tr else zero)
        i = nxt
        if (i & lmask) == 0 and i <= full:  # a full step closed: carry up
            for r in range(R):
                for lev in range(1, 4):
                    for lane in range(W):
                        acc[r, lev, lane] += acc[r, lev - 1, lane]
                        acc[r, lev - 1, lane] = zero
                    if (i & (lmask << (lev * p))) != 0:
                        break
    for r in range(R):
        for lev in range(1, 4):
            for lane in range(W):
                acc[r, 0, lane] += acc[r, lev, lane]


def _dare16_rows_py(ms, b, ks, T, L, after):
    """`_dare_rows_py` from 16-bit sources and draw key bytes (`_cascade16_py`): after[r] =
    ‖τᵣ·maskᵣ‖₁ in torch's serial order (maskᵣ = ks[r] < T[r]), for every row in one pass."""
    _wide()
    one = np.float32(1.0)
    zero = np.float32(0.0)
    R = len(ms)
    n = b.shape[0]
    V = n // L
    W = 4 * L if V > 0 else 4  # shorter than one vector: the scalar row sum, 4 partial sums
    size = V // 4 if V > 0 else n // 4
    acc = np.zeros((R, 4, W), np.float32)
    _cascade16(ms, b, ks, T, acc, 0, size, W)
    for r in range(R):
        m = ms[r]
        k = ks[r]
        tr = T[r]
        if V == 0:
            s = acc[r, 0, 0]
            for e in range(size * 4, n):
                x = _wid(m[e]) - _wid(b[e])
                s += abs(x) * (one if np.int32(k[e]) < tr else zero)
            for q in range(1, 4):
                s += acc[r, 0, q]
            after[r] = zero + s
            continue
        for v in range(size * 4, V):  # leftover vectors, into the first partial sum
            o = v * L
            for lane in range(L):
                x = _wid(m[o + lane]) - _wid(b[o + lane])
                acc[r, 0, lane] += abs(x) * (one if np.int32(k[o + lane]) < tr else zero)
        for q in range(1, 4):
            for lane in range(L):
                acc[r, 0, lane] += acc[r, 0, q * L + lane]
        s = zero
        for e in range(V * L, n):
            x = _wid(m[e]) - _wid(b[e])
            s += abs(x) * (one if np.int32(k[e]) < tr else zero)
        for lane in range(L):
            s += acc[r, 0, lane]
        after[r] = zero + s


def _keys_build_py(u, key, offs, pos, low):
    """`DrawKeys` from float32 draws u = k·2^-24: key = k >> 16 (one byte), and the positions
    bucketed by key (offs: 257 bucket starts; pos: flat indices, ascending within a bucket; low:
    each listed position's k & 0xFFFF), by a counting sort."""
    scale = np.float32(16777216.0)
    n = u.shape[0]
    for q in range(257):
        offs[q] = 0
    for j in range(n):
        kk = np.int32(u[j] * scale)  # exact: a power-of-two scaling of an integer below 2^24
        key[j] = np.uint8(kk >> 16)
        offs[(kk >> 16) + 1] += 1
    for q in range(256):
        offs[q + 1] += offs[q]
    fill = offs[:256].copy()
    for j in range(n):
        kk = np.int32(u[j] * scale)
        q = kk >> 16
        at = fill[q]
        pos[at] = j
        low[at] = np.uint16(kk & 0xFFFF)
        fill[q] = at + 1


def _keys_set_py(key, offs, pos, low, q, kl_from, kl_to):
    """Move bucket q of `DrawKeys` from its fix for kl_from to its fix for kl_to (one sweep of the
    bucket, writing only the entries whose key changes; each write touches its own cache line).
    q >= 1: the entries with low < kl are q − 1, the others q (kl = 0: untouched). q = 0: the
    entries with low >= kl are 1, the others 0 (kl = 65536: untouched)."""
    lo = min(kl_from, kl_to)
    hi = max(kl_from, kl_to)
    if q >= 1:
        v = np.uint8(q - 1) if kl_to > kl_from else np.uint8(q)
    else:
        v = np.uint8(1) if kl_to < kl_from else np.uint8(0)
    for i in range(offs[q], offs[q + 1]):
        if lo <= low[i] < hi:
            key[pos[i]] = v


def _masked16_kernel(ms, b, ks, T, fac, w, consensus, normalize, lin_div, lam, has_lam, rmode, out):
    """`_masked_kernel` from 16-bit sources as stored and draw key bytes: τᵣ = θᵣ − base and the
    base widened exactly in the loop (`_wid`), row r kept where ks[r] < T[r], the same float32
    operations after."""
    _wide()
    R = len(ms)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        bj = _wid(b[j])
        total = zero
        p_sum = zero  # as in _masked_kernel
        n_sum = zero
        p_w = zero
        n_w = zero
        for r in range(R):
            x = _wid(ms[r][j]) - bj
            v = ((x if np.int32(ks[r][j]) < T[r] else zero) * fac[r]) * w[r]
            total += v
            p_sum += v if v > zero else zero
            n_sum += v if v < zero else zero
            p_w += w[r] if v > zero else zero
            n_w += w[r] if v < zero else zero
        mixed = _elect(total, p_sum, n_sum, p_w, n_w, consensus, normalize, lin_div, lam, has_lam)
        out[j] = _round(mixed + bj, rmode)


def _dare16_py(ms, b, ks, T, L, l1, eps, w, consensus, normalize, lin_div, lam, has_lam, rmode, out):
    """`dare16_pass`'s two passes in one call: the rows' ‖τᵣ·maskᵣ‖₁ (`_dare16_rows_py`), the
    L1 rescale factors l1[r] / after[r] (1 where either is below eps; inf/inf gives nan as torch's
    division does, unwarned), then the merge (`_masked16_kernel`)."""
    R = len(ms)
    after = np.empty(R, np.float32)
    _dare16_rows(ms, b, ks, T, L, after)
    fac = np.empty(R, np.float32)
    for r in range(R):
        fac[r] = np.float32(1.0) if l1[r] < eps or after[r] < eps else l1[r] / after[r]
    _masked16(ms, b, ks, T, fac, w, consensus, normalize, lin_div, lam, has_lam, rmode, out)


def _kth_largest_bits(bits, k):
    """The k-th largest of non-negative float32 values given as their bit patterns (which order
    like the values), by two 16-bit radix passes: (bit pattern, entries above it, entries equal)."""
    # four interleaved histograms: runs of equal buckets (common in float16-derived values) do
    # not wait on one counter's previous increment
    h4 = np.zeros((4, 65536), np.int32)
    n = bits.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        h4[0, bits[j] >> np.uint32(16)] += 1
        h4[1, bits[j + 1] >> np.uint32(16)] += 1
        h4[2, bits[j + 2] >> np.uint32(16)] += 1
        h4[3, bits[j + 3] >> np.uint32(16)] += 1
    for j in range(n4, n):
        h4[0, bits[j] >> np.uint32(16)] += 1
    hist = np.zeros(65536, np.int64)
    for b in range(65536):
        hist[b] = np.int64(h4[0, b]) + h4[1, b] + h4[2, b] + h4[3, b]
    above = 0
    hi = 65535
    while above + hist[hi] < k:
        above += hist[hi]
        hi -= 1
    hist[:] = 0
    top = np.uint32(hi)
    for j in range(n):  # few entries fall in the bucket: the branch is well predicted
        b = bits[j]
        if (b >> np.uint32(16)) == top:
            hist[b & np.uint32(0xFFFF)] += 1
    lo = 65535
    while above + hist[lo] < k:
        above += hist[lo]
        lo -= 1
    return (hi << 16) | lo, above, hist[lo]


def _nth_equal(bits, value, need):
    """The flat index of the need-th entry (1-based) whose bit pattern is `value`."""
    seen = 0
    v = np.uint32(value)
    for j in range(bits.shape[0]):
        if bits[j] == v:
            seen += 1
            if seen == need:
                return j
    return -1


class Compiled(NamedTuple):
    """The compiled loops, by name (each the numba version of the `_..._py` / `_..._kernel` function
    of the same role above)."""

    kernel: Any
    dare_prepass: Any
    linear: Any
    masked: Any
    cut: Any
    dare_mask_l1: Any
    kth_largest_bits: Any
    nth_equal: Any
    linear16: Any
    l1_pair: Any
    mt_seed: Any
    mt_draw: Any
    dare_rows: Any
    cut_idx: Any
    sub16: Any
    l1_stream: Any
    dare16_rows: Any
    masked16: Any
    keys_build: Any
    keys_set: Any
    cut16: Any
    dare16: Any


@functools.cache
def _compiled() -> "Compiled":
    """(element pass, DARE pre-pass, linear pass), compiled on first use (and cached on disk by
    numba)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed (or MERGELAB_JIT=0); check _jit.AVAILABLE before calling")
    import numba

    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def fma(typingctx, a, b, c):
        """a·b + c rounded once (llvm.fma.f32; vectorizes to the CPU's FMA instruction)."""
        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    @intrinsic
    def f16rt(typingctx, v):
        """float32 -> float16 -> float32 (IEEE round to nearest even; vcvtps2ph on x86)."""
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.float32), codegen

    @intrinsic
    def bf16rt(typingctx, v):
        """float32 -> bfloat16 -> float32 as c10::BFloat16 rounds, in 32-bit integer lanes."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            x = builder.bitcast(args[0], i32)
            bias = builder.add(builder.and_(builder.lshr(x, ir.Constant(i32, 16)), ir.Constant(i32, 1)),
                               ir.Constant(i32, 0x7FFF))
            r = builder.and_(builder.add(x, bias), ir.Constant(i32, 0xFFFF0000))
            nan = builder.fcmp_unordered("uno", args[0], args[0])
            r = builder.select(nan, ir.Constant(i32, 0x7FC00000), r)
            return builder.bitcast(r, ir.FloatType())

        return types.float32(types.float32), codegen

    @intrinsic
    def h2f(typingctx, v):
        """A float16 bit pattern (uint16) widened to float32 (vcvtph2ps on x86)."""
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    @intrinsic
    def b2f(typingctx, v):
        """A bfloat16 bit pattern (uint16) widened to float32 (the upper half of its bits)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

        return types.float32(types.uint16), codegen

    jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    # the kernels call these by their global names: they must exist before the kernels compile
    @intrinsic
    def wid(typingctx, v):
        """A 16-bit source element widened to float32 exactly: a float16 bit pattern when given as
        uint16, a bfloat16 one when given as int16 (so each format is its own compiled version,
        with no format test in the loop)."""
        if v not in (types.uint16, types.int16):
            return None
        half = v == types.uint16

        def codegen(context, builder, signature, args):
            if half:
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
            i32 = ir.IntType(32)
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

        return types.float32(v), codegen

    @intrinsic
    def wide_vectors(typingctx):
        """Let the calling function's loops use the CPU's widest vectors (512 bits with AVX-512;
        LLVM otherwise stops at 256 on CPUs it tunes that way): its LLVM function gets
        "prefer-vector-width"="512" (a hint: no effect where the CPU has no wider vectors).
        Element-wise code gives the same values at any width; the loops' sums keep their
        explicit lanes, which the width does not reorder."""
        def codegen(context, builder, signature, args):
            attrs = builder.function.attributes
            set.add(attrs, '"prefer-vector-width"="512"')  # a string attribute: no known-name check
            return context.get_dummy_value()

        return types.none(), codegen

    globals().update(_fma=fma, _f16rt=f16rt, _bf16rt=bf16rt, _h2f=h2f, _b2f=b2f, _wid=wid, _wide=wide_vectors)
    globals()["_round"] = numba.njit(inline="always")(_round_py)  # inlined in numba IR: vectorizes
    globals()["_elect"] = numba.njit(inline="always")(_elect_py)
    globals()["_ceil_log2"] = jit(_ceil_log2_py)
    globals()["_cascade"] = jit(_cascade_py)
    globals()["_l1_stream"] = jit(_l1_stream_py)
    globals()["_mask_l1"] = jit(_dare_mask_l1)
    globals()["_cascade16"] = jit(_cascade16_py)
    globals()["_dare16_rows"] = jit(_dare16_rows_py)
    globals()["_masked16"] = jit(_masked16_kernel)
    globals()["_mt_twist"] = jit(_mt_twist_py)
    globals()["_mt_temper"] = jit(_mt_temper_py)
    return Compiled(
        kernel=jit(_kernel), dare_prepass=jit(_dare_prepass), linear=jit(_linear_kernel), masked=jit(_masked_kernel),
        cut=jit(_cut_kernel), dare_mask_l1=jit(_dare_mask_l1), kth_largest_bits=jit(_kth_largest_bits),
        nth_equal=jit(_nth_equal), linear16=jit(_linear_kernel_16), l1_pair=jit(_l1_pair_py), mt_seed=jit(_mt_seed_py),
        mt_draw=jit(_mt_draw_py), dare_rows=jit(_dare_rows_py), cut_idx=jit(_cut_idx_kernel), sub16=jit(_sub16_kernel),
        l1_stream=jit(_l1_stream_py), dare16_rows=jit(_dare16_rows_py), masked16=jit(_masked16_kernel),
        keys_build=jit(_keys_build_py), keys_set=jit(_keys_set_py), cut16=jit(_cut16_kernel), dare16=jit(_dare16_py))


@functools.cache
def addcmul_fuses() -> bool | None:
    """Whether torch's addcmul_ on this machine rounds a + x·w once (FMA) or twice, found by
    probing both its vector body and its scalar tail; None when it does neither throughout (then
    the compiled linear pass is not used, and weighted_sum_ runs as before)."""
    g = torch.Generator().manual_seed(1)
    n = 16 * 8 + 13
    acc, x = torch.randn(n, generator=g), torch.randn(n, generator=g)
    w = torch.tensor([0.7310585975646973])
    got = acc.clone().addcmul_(x, w).numpy()
    a, xx, ww = acc.numpy().astype(np.float64), x.numpy().astype(np.float64), np.float64(w.item())
    fused = (a + xx * ww).astype(np.float32)  # x·w is exact in float64, one rounding to float32
    twice = acc.numpy() + (x.numpy() * w.numpy()[0])
    if (fused != twice).sum() < 4:  # the probe must tell the two apart
        return None
    if np.array_equal(got, fused):
        return True
    if np.array_equal(got, twice):
        return False
    return None


def linear_pass(xs: list[torch.Tensor], weights: np.ndarray, normalize: bool, divisor: float,
                rmode: int, out: torch.Tensor) -> torch.Tensor:
    """out = Σ wᵢ·xsᵢ (/ divisor) over flat float32 CPU tensors (or all float16, or all bfloat16:
    widened exactly in the loop, so the sources can be kept at half the bytes), rounded through the output
    dtype (`rmode`) and written into the flat float32 tensor `out` (a model parameter): the
    values of weighted_sum_ followed by `out.copy_(result.to(out_dtype))`, bit for bit.
    `weights` are float32; `divisor` is the float32 Σwᵢ that weighted_sum_ divides by."""
    w = tuple(np.float32(v) for v in weights)
    tail = (w, bool(addcmul_fuses()), bool(normalize), np.float32(divisor), int(rmode), out.numpy())
    if xs[0].dtype in (torch.float16, torch.bfloat16):  # 16-bit sources, widened in the loop
        _compiled().linear16(tuple(bits16(x) for x in xs), *tail)
    else:
        _compiled().linear(tuple(x.numpy() for x in xs), *tail)
    return out


def dare_prepass(u: torch.Tensor, tau: torch.Tensor, density: float, mask: torch.Tensor,
                 absm: torch.Tensor) -> None:
    """DARE's mask from cached draws and |τ|·mask for the L1 rescale, flat float32 CPU tensors
    (`mask` a bool tensor), equal to torch.lt(u, density) and |τ|.mul_(mask)."""
    _compiled().dare_prepass(u.numpy(), tau.numpy(), np.float32(density), mask.view(torch.uint8).numpy(), absm.numpy())


# The fused mask + L1 pass reproduces torch's serial sum for tensors up to this length: up to
# it the cascade's levels close every 16 groups (beyond, their spacing grows), which is the
# structure the probe below checks on this machine's torch.
L1_MAX = 1 << 25


@functools.cache
def sum_lanes() -> int | None:
    """The vector width (lanes) with which `_dare_mask_l1` reproduces this torch's serial float32
    sum, bit for bit, on probe lengths around every boundary of its algorithm; None when no width
    does (a torch whose sum kernel differs: the compiled pre-pass is then not used)."""
    from operators.sparsify import l1_norm_of_abs

    g = torch.Generator().manual_seed(5)
    lengths = (1, 3, 4, 7, 15, 16, 17, 63, 64, 65, 129, 1000, 4096 + 5, 65536 + 77, 300_001, 1_048_576 + 333)
    probes = []
    for n in lengths:
        tau = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(8) * 1e3  # wide range: order matters
        u = torch.rand(n, generator=g)
        ref = l1_norm_of_abs(tau.abs().mul_(u < 0.6))
        probes.append((u.numpy(), tau.numpy(), ref.item()))
    for lanes in (16, 8, 4):
        mask = np.empty(max(lengths), np.uint8)
        if all(_compiled().dare_mask_l1(u, tau, np.float32(0.6), lanes, mask[: len(u)]) == np.float32(ref)
               for u, tau, ref in probes):
            return lanes
    return None


def dare_mask_l1(u: torch.Tensor, tau: torch.Tensor, density: float, mask: torch.Tensor) -> torch.Tensor | None:
    """mask = u < density and ‖τ·mask‖₁ as `l1_norm_of_abs(|τ|.mul_(mask))` computes it, in one
    pass over flat float32 CPU tensors (`mask` a bool tensor), or None (nothing written) where the
    summation order cannot be reproduced (see `sum_lanes`, `L1_MAX`)."""
    lanes = sum_lanes() if u.numel() <= L1_MAX else None
    if lanes is None:
        return None
    v = _compiled().dare_mask_l1(u.numpy(), tau.numpy(), np.float32(density), lanes, mask.view(torch.uint8).numpy())
    return torch.tensor(v, dtype=torch.float32)


def top_k_cut(abs_flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The top-k rule of a flat float32 CPU tensor of magnitudes (1 <= k < n) as (threshold v,
    cutoff c): keep > v, and == v at flat indices <= c. v is the exact k-th largest value (what
    sparsify.kth_largest and torch.kthvalue give), found by a two-pass radix selection on the
    bit patterns; c is the flat index of the last tie kept (ties kept in flat order until k)."""
    bits = abs_flat.view(torch.int32).numpy().view(np.uint32)
    c = _compiled()
    value, above, equal = c.kth_largest_bits(bits, int(k))
    need = k - int(above)
    cut = abs_flat.numel() - 1 if need >= equal else int(c.nth_equal(bits, int(value), need))
    thr = torch.tensor([int(value)], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]
    return thr, cut


def uniform_pass(deltas: list[torch.Tensor], masks: list[torch.Tensor] | None, thr: list[float] | None,
                 cut: list[int] | None, fac: list[float], weights: list[float], consensus: bool,
                 normalize: bool, lin_div: torch.Tensor | None, lam: float, base: torch.Tensor,
                 s: int, e: int, rmode: int, out: torch.Tensor) -> torch.Tensor:
    """`task_vector_pass` over [s, e) for the two uniform cases, faster: every row masked (`masks`,
    with factors `fac`, 1.0 for none) or every row cut by a threshold (`thr`, `cut` as absolute
    flat indices), written into the float32 tensor `out` (length e - s) rounded through the
    output dtype (`rmode`)."""
    f32 = np.float32
    xs = tuple(t.numpy()[s:e] for t in deltas)
    # per-row scalars as tuples, not arrays: passed by value, they cannot alias `out`, so the
    # compiler keeps them in registers and the element loop vectorizes
    w = tuple(f32(v) for v in weights)
    tail = (bool(consensus), bool(normalize), f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam),
            bool(f32(lam) != f32(1.0)), base.numpy()[s:e], int(rmode), out.numpy())
    if masks is not None:
        ms = tuple(m.view(torch.uint8).numpy()[s:e] for m in masks)
        _compiled().masked(xs, ms, tuple(f32(v) for v in fac), w, *tail)
        return out
    # pieces between the rows' tie cutoffs: in each, a row keeps all or none of its ties
    m = e - s
    rel = [int(c) - s for c in cut]
    edges = sorted({0, m, *(min(max(c + 1, 0), m) for c in rel)})
    strict = tuple(f32(v) for v in thr)
    below = tuple(np.nextafter(f32(v), f32(-np.inf)) for v in thr)
    *flags, base_np, rm, out_np = tail
    for a, b in zip(edges[:-1], edges[1:]):
        if a == b:
            continue
        t = tuple(below[r] if a <= rel[r] else strict[r] for r in range(len(rel)))
        _compiled().cut(tuple(x[a:b] for x in xs), t, w, *flags, base_np[a:b], rm, out_np[a:b])
    return out


def task_vector_pass(deltas: list[torch.Tensor], masks: list[torch.Tensor | None], mode: list[int],
                     thr: list[float], cut: list[int], div: list[float | None],
                     fac: list[torch.Tensor | None], weights: list[float], consensus: bool,
                     normalize: bool, lin_div: torch.Tensor | None, lam: float,
                     base: torch.Tensor, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
    """Run the compiled loop over [s, e) of flat float32 CPU tensors into `out` (length e - s).

    Scalars are rounded to float32 first, as torch does with a Python number against a float32
    tensor; `lin_div` is the float32 Σwᵢ (|·| < 1e-8 → 1) that `combine_` divides by without
    consensus."""
    f32 = np.float32
    dummy = np.zeros(1, np.uint8)
    arrs = tuple(t.numpy() for t in deltas)
    mks = tuple(m.view(torch.uint8).numpy() if m is not None else dummy for m in masks)
    _compiled().kernel(
        arrs, mks, np.asarray(mode, np.int8), np.asarray(thr, f32), np.asarray(cut, np.int64),
        np.asarray([1.0 if v is None else v for v in div], f32), np.asarray([v is not None for v in div]),
        np.asarray([1.0 if v is None else float(v) for v in fac], f32), np.asarray([v is not None for v in fac]),
        np.asarray(weights, f32), bool(consensus), bool(normalize),
        f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
        base.numpy(), int(s), int(e), out.numpy(),
    )
    return out


def l1_pair(tau: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(‖τ‖₁, ‖τ·mask‖₁) as `l1_norm_of_abs(|τ|)` and `l1_norm_of_abs(|τ|.mul_(mask))` compute them,
    in one pass over a flat float32 CPU tensor and a bool mask, or None where the summation order
    cannot be reproduced (see `sum_lanes`, `L1_MAX`)."""
    lanes = sum_lanes() if tau.numel() <= L1_MAX else None
    if lanes is None:
        return None
    b, a = _compiled().l1_pair(tau.numpy(), mask.view(torch.uint8).numpy(), lanes)
    return torch.tensor(b, dtype=torch.float32), torch.tensor(a, dtype=torch.float32)


class L1Stream:
    """`l1_pair` of a tensor of n elements fed slice by slice in flat order (`feed`), so τ and its
    mask need never be whole: the same two sums, bit for bit. Slices start at multiples of 64
    elements and all but the last end on one. Use only where `sum_lanes()` is not None and
    n <= L1_MAX."""

    def __init__(self, n: int):
        self.n = n
        self.lanes = sum_lanes()
        w = 4 * self.lanes
        self._accb = np.zeros((4, w), np.float32)
        self._acca = np.zeros((4, w), np.float32)
        self._st = np.zeros(1, np.int64)
        self._parts: list | None = [] if n < self.lanes else None  # shorter than one vector: kept whole

    def feed(self, tau: torch.Tensor, mask: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Take the slice [s, s + len) of τ and its bool mask; with the last slice, return
        (‖τ‖₁, ‖τ·mask‖₁), else None."""
        e = s + tau.numel()
        if self._parts is not None:
            self._parts.append((tau.clone(), mask.clone()))
            if e < self.n:
                return None
            return l1_pair(torch.cat([t for t, _ in self._parts]), torch.cat([m for _, m in self._parts]))
        b, a = _compiled().l1_stream(tau.numpy(), mask.view(torch.uint8).numpy(), int(s), self.n, self.lanes,
                               self._accb, self._acca, self._st)
        if e < self.n:
            return None
        return torch.tensor(b, dtype=torch.float32), torch.tensor(a, dtype=torch.float32)


class MTStream:
    """The numbers a CPU `torch.Generator` seeded with `seed` gives to float32 `uniform_`, drawn by
    the compiled loop (element for element the same stream; see `mt_matches`)."""

    def __init__(self, seed: int):
        self.state = np.empty(_MT_N, np.uint32)
        _compiled().mt_seed(np.uint32(seed & 0xFFFFFFFF), self.state)
        self.pos = _MT_N

    def mask_into(self, density: float, mask: torch.Tensor) -> torch.Tensor:
        """mask (flat bool) = the next mask.numel() uniforms < density, as torch.lt(u, density)."""
        self.pos = int(_compiled().mt_draw(self.state, self.pos, np.float32(density), mask.view(torch.uint8).numpy(),
                                       _EMPTY_F32, False))
        return mask

    def copy(self) -> "MTStream":
        """An independent stream at this one's position (it draws the same numbers next)."""
        c = MTStream.__new__(MTStream)
        c.state = self.state.copy()
        c.pos = self.pos
        return c

    def uniform_into(self, out: torch.Tensor) -> torch.Tensor:
        """out (flat float32) = the next out.numel() uniforms, as out.uniform_(generator=g)."""
        self.pos = int(_compiled().mt_draw(self.state, self.pos, np.float32(0), _EMPTY_U8, out.numpy(), True))
        return out


_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_U8 = np.empty(0, np.uint8)


def mt_matches() -> bool:
    """Whether `MTStream` gives this torch's CPU generator stream and torch.lt's masks, probed on
    seeds above 32 bits, lengths around the 624-word state and densities whose float32 rounding
    falls on either side of the 2^-24 grid of the uniforms."""
    return AVAILABLE and _mt_probe()


@functools.cache
def _mt_probe() -> bool:
    for seed in (0, 5489, (1 << 62) + 987654321):
        g = torch.Generator()
        g.manual_seed(seed)
        s = MTStream(seed)
        for n, d in ((1, 0.5), (623, 0.6), (625, 0.5 + 0.3 / 2**24), (2000, 0.5 + 0.7 / 2**24), (1300, 0.1)):
            u = torch.empty(n).uniform_(generator=g)
            if n % 2:  # check both entry points; each continues the one stream
                got = s.uniform_into(torch.empty(n))
                if not torch.equal(got.view(torch.int32), u.view(torch.int32)):
                    return False
            else:
                if not torch.equal(s.mask_into(d, torch.empty(n, dtype=torch.bool)), torch.lt(u, d)):
                    return False
    return True


def mt_stream(seed: int) -> MTStream | None:
    """A compiled stream for `seed`, or None where the compiled loops are off or do not match."""
    return MTStream(seed) if mt_matches() else None


def dare_pass(us: tuple, xs: tuple, densities: list[float], l1: tuple, masks: tuple, weights: list[float],
              consensus: bool, normalize: bool, lin_div: torch.Tensor | None, lam: float, base: np.ndarray,
              rmode: int, out: np.ndarray) -> bool:
    """A whole DARE merge with L1 rescale from cached draws, in two compiled calls, over the numpy
    views of flat float32 CPU tensors (`us` the rows' uniforms, `xs` their task vectors, `l1` their
    ‖τ‖₁ as float32, `masks` uint8 workspaces): every row's mask and ‖τ·mask‖₁, the factors
    ‖τ‖₁ / ‖τ·mask‖₁ (no rescale where a norm is below sparsify's epsilon), then `_masked_kernel`
    into `out` rounded through the output dtype: `dare_mask_l1` per row then `uniform_pass`, value
    for value. False (nothing written) where the summation order cannot be reproduced."""
    n = out.shape[0]
    lanes = sum_lanes() if n <= L1_MAX else None
    if lanes is None:
        return False
    f32 = np.float32
    c = _compiled()
    after = np.empty(len(xs), f32)
    c.dare_rows(us, xs, tuple(f32(d) for d in densities), lanes, masks, after)
    eps = f32(_eps32())
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf/inf -> nan, as torch's division gives, unwarned
        fac = tuple(f32(1.0) if b < eps or a < eps else b / a for b, a in zip(l1, after))  # float32 division
    c.masked(xs, masks, fac, tuple(f32(v) for v in weights), bool(consensus), bool(normalize),
         f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
         base, int(rmode), out)
    return True


# Up to this many elements a TIES tensor takes one call of `_cut_idx_kernel` (no Python per
# piece); above it the pieces of `uniform_pass`, whose loop holds no index comparison (~15% faster).
CUT_ONE_CALL = 1 << 17


def cut_pass(xs: tuple, thr: list, cut: list[int], weights: list[float], consensus: bool, normalize: bool,
             lin_div: torch.Tensor | None, lam: float, base: np.ndarray, rmode: int, out: np.ndarray) -> None:
    """`uniform_pass`'s threshold case over a whole tensor given as numpy views (rows `xs`, `base`,
    `out`), each row keeping |τ| > thr[r] and |τ| == thr[r] at flat indices <= cut[r]."""
    f32 = np.float32
    w = tuple(f32(v) for v in weights)
    flags = (bool(consensus), bool(normalize), f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam),
             bool(f32(lam) != f32(1.0)))
    if out.shape[0] <= CUT_ONE_CALL:
        strict = tuple(f32(v) for v in thr)
        below = tuple(np.nextafter(v, f32(-np.inf)) for v in strict)
        _compiled().cut_idx(xs, strict, below, tuple(int(c) for c in cut), w, *flags, base, int(rmode), out)
        return
    uniform_pass([torch.from_numpy(x) for x in xs], None, [float(v) for v in thr], cut, [1.0] * len(xs), weights,
                 consensus, normalize, lin_div, lam, torch.from_numpy(base), 0, out.shape[0], rmode,
                 torch.from_numpy(out))


@functools.cache
def _eps32() -> float:
    from operators.sparsify import _RESCALE_EPS

    return float(np.float32(_RESCALE_EPS))


def sub16(m: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = m.float() − b.float() for flat float16 (or bfloat16) CPU tensors of one dtype, into
    the flat float32 tensor `out`, in one compiled pass."""
    _compiled().sub16(m.view(torch.int16).numpy().view(np.uint16), b.view(torch.int16).numpy().view(np.uint16),
                    m.dtype == torch.float16, out.numpy())
    return out


def bits16(t: torch.Tensor) -> np.ndarray:
    """A flat float16 / bfloat16 CPU tensor's bit patterns as the compiled 16-bit loops take them (a
    view, no copy): uint16 for float16, int16 for bfloat16; the integer type selects the widening."""
    v = t.view(torch.int16).numpy()
    return v.view(np.uint16) if t.dtype == torch.float16 else v


def key_limit(density: float) -> int:
    """K such that a draw u = k·2^-24 satisfies u < float32(density) exactly when k < K (the
    comparison `dare_pass` makes in float32)."""
    return math.ceil(float(np.float32(density)) * 2.0**24)  # exact: a float32 times a power of two


class DrawKeys:
    """One row's DARE draws for the 16-bit pass, one byte each: key = k >> 16 of the draw
    u = k·2^-24, and the positions bucketed by key with their k & 0xFFFF. For a density t,
    u < t exactly when k < K = ceil(t·2^24): every key below K >> 16 is kept, every key above
    dropped, and only bucket K >> 16 needs its low bits, so `fix` rewrites that bucket's keys
    (~n/256 bytes) for the candidate; the passes then read 1 byte per draw (a float32 draw is 4)
    and compare it with one threshold. A fixed bucket q holds q − 1 (or 1 for q = 0) where it
    differs from k >> 16, which only a threshold of q (or 1, for q <= 1) can tell apart: earlier
    candidates' buckets are left as they are and only those a threshold could misread are
    rewritten, so a candidate costs one bucket sweep per row, not an undo and a fix."""

    def __init__(self, u: torch.Tensor):
        n = u.numel()
        self.key = np.empty(n, np.uint8)
        self.offs = np.empty(257, np.int64)
        self.pos = np.empty(n, np.int32 if n < 2**31 else np.int64)
        self.low = np.empty(n, np.uint16)
        _compiled().keys_build(u.numpy(), self.key, self.offs, self.pos, self.low)
        self._fixed: dict[int, int] = {}  # bucket -> the low-bits limit its keys are fixed for

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.offs.nbytes + self.pos.nbytes + self.low.nbytes

    def _set(self, q: int, kl: int) -> None:
        clean = 65536 if q == 0 else 0  # the limit at which bucket q is k >> 16 throughout
        cur = self._fixed.get(q, clean)
        if cur != kl:
            _compiled().keys_set(self.key, self.offs, self.pos, self.low, q, cur, kl)
            if kl == clean:
                del self._fixed[q]
            else:
                self._fixed[q] = kl

    def fix(self, density: float) -> int:
        """Set the keys up for `density` and return the threshold T: key < T exactly where the
        draw is below float32(density)."""
        K = key_limit(density)
        kh, kl = K >> 16, K & 0xFFFF
        if kh >= 256:  # every draw kept: every key, fixed or not, is below 256
            return 256
        self._set(kh, kl)
        if kh <= 1:  # T = 1 also tells bucket 0's 1s and bucket 1's 0s from k >> 16: the other one clean
            self._set(1 - kh, 65536 if kh == 1 else 0)
        return max(kh, 1)

    def restore(self) -> None:
        """Every key back to k >> 16."""
        for q in list(self._fixed):
            self._set(q, 65536 if q == 0 else 0)


def dare16_pass(ms: tuple, b: np.ndarray, keys: list[DrawKeys], densities: list[float], l1: list[float],
                weights: list[float], consensus: bool, normalize: bool, lin_div: torch.Tensor | None, lam: float,
                rmode: int, out: np.ndarray) -> bool:
    """`dare_pass` from the 16-bit sources as stored (`bits16` views of one format: `ms` the rows'
    models, `b` the base) and the rows' draws as `DrawKeys`: the same masks, norms, factors and
    merged values, reading about a third of the bytes (the base once for all rows, no mask
    written). `l1` holds each row's ‖τ‖₁ (float32 values). False (nothing written) where the
    summation order cannot be reproduced."""
    n = out.shape[0]
    lanes = sum_lanes() if n <= L1_MAX else None
    if lanes is None:
        return False
    f32 = np.float32
    T = tuple(np.int32(k.fix(d)) for k, d in zip(keys, densities))
    _compiled().dare16(ms, b, tuple(k.key for k in keys), T, lanes, np.asarray(l1, f32), f32(_eps32()),
                    tuple(f32(v) for v in weights), bool(consensus), bool(normalize),
                    f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
                    int(rmode), out)
    return True


def cut16_pass(ms: tuple, b: np.ndarray, thr: list, cut: list[int], weights: list[float], consensus: bool,
               normalize: bool, lin_div: torch.Tensor | None, lam: float, rmode: int, out: np.ndarray) -> None:
    """`cut_pass` from the 16-bit sources as stored (`bits16` views of one format: `ms` the rows'
    models, `b` the base): τ widened and subtracted in the loop, the same values, a third of the
    bytes of float32 task vectors and base."""
    f32 = np.float32
    strict = tuple(f32(v) for v in thr)
    below = tuple(np.nextafter(v, f32(-np.inf)) for v in strict)
    _compiled().cut16(ms, b, strict, below, tuple(int(c) for c in cut), tuple(f32(v) for v in weights),
                    bool(consensus), bool(normalize), f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam),
                    bool(f32(lam) != f32(1.0)), int(rmode), out)
