"""Compiled task-vector merges (task arithmetic, TIES, DARE's merge step): base + λ·mix(wᵢ·
sparsify(τᵢ)) in one pass over the elements with the rows inside, rounded through the output
dtype. `_kernel` takes any mix of rows (all kept, cut by a threshold, masked; divisions and
factors); the uniform cases have their own loops, which vectorize: every row masked
(`_masked_kernel`), every row cut by its top-k threshold (`_cut_kernel` per piece between the
tie cutoffs, `_cut_idx_kernel` in one call, `_cut16_kernel` from 16-bit sources as stored).
See `jit_core` for why these equal the torch kernels bit for bit."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core


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


class Compiled(NamedTuple):
    """This module's compiled loops, by name (each the numba version of the `_..._kernel` above)."""

    kernel: Any
    masked: Any
    cut: Any
    cut_idx: Any
    cut16: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    h = jit_core.helpers()
    globals().update(_round=h.round, _elect=h.elect, _wid=h.wid, _wide=h.wide)
    jit = h.jit
    return Compiled(kernel=jit(_kernel), masked=jit(_masked_kernel), cut=jit(_cut_kernel),
                    cut_idx=jit(_cut_idx_kernel), cut16=jit(_cut16_kernel))


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
        compiled().masked(xs, ms, tuple(f32(v) for v in fac), w, *tail)
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
        compiled().cut(tuple(x[a:b] for x in xs), t, w, *flags, base_np[a:b], rm, out_np[a:b])
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
    compiled().kernel(
        arrs, mks, np.asarray(mode, np.int8), np.asarray(thr, f32), np.asarray(cut, np.int64),
        np.asarray([1.0 if v is None else v for v in div], f32), np.asarray([v is not None for v in div]),
        np.asarray([1.0 if v is None else float(v) for v in fac], f32), np.asarray([v is not None for v in fac]),
        np.asarray(weights, f32), bool(consensus), bool(normalize),
        f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
        base.numpy(), int(s), int(e), out.numpy(),
    )
    return out


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
        compiled().cut_idx(xs, strict, below, tuple(int(c) for c in cut), w, *flags, base, int(rmode), out)
        return
    uniform_pass([torch.from_numpy(x) for x in xs], None, [float(v) for v in thr], cut, [1.0] * len(xs), weights,
                 consensus, normalize, lin_div, lam, torch.from_numpy(base), 0, out.shape[0], rmode,
                 torch.from_numpy(out))


def cut16_pass(ms: tuple, b: np.ndarray, thr: list, cut: list[int], weights: list[float], consensus: bool,
               normalize: bool, lin_div: torch.Tensor | None, lam: float, rmode: int, out: np.ndarray) -> None:
    """`cut_pass` from the 16-bit sources as stored (`bits16` views of one format: `ms` the rows'
    models, `b` the base): τ widened and subtracted in the loop, the same values, a third of the
    bytes of float32 task vectors and base."""
    f32 = np.float32
    strict = tuple(f32(v) for v in thr)
    below = tuple(np.nextafter(v, f32(-np.inf)) for v in strict)
    compiled().cut16(ms, b, strict, below, tuple(int(c) for c in cut), tuple(f32(v) for v in weights),
                     bool(consensus), bool(normalize), f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam),
                     bool(f32(lam) != f32(1.0)), int(rmode), out)
