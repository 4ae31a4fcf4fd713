"""One compiled loop for a task-vector candidate (sparsify each row, weight, elect signs, mix, add
the base), used by the trial merger when numba is installed (`mergelab[fast]`).

Why: the torch kernels in `_fast` make ~45 element-wise passes over each slice for a TIES
candidate against ~8 for a linear one; this loop makes one, in blocks the compiler vectorizes.
It performs the same float32 operations in the same order as `_fast._Row.apply_` followed by
`operators.task_vectors.combine_` (sums over the rows start at +0 and run in row order, as
torch's sum over dim 0 does), so its output is equal bit for bit; tests/test_jit.py checks that
against the torch path. Whole-tensor statistics (top-k cutoffs, DARE draws, L1 norms) are still
computed by `_fast` with torch; only the element pass is compiled.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

# An optional extra: without numba the trial merger uses the torch kernels (same values). Only
# looked up here: numba (~50 MB) is imported on the first compiled call, so `mergelab merge`,
# which never makes one, does not pay for it. MERGELAB_JIT=0 turns the compiled loop off (to
# compare, or to rule it out when debugging).
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


def _dare_prepass(u, tau, density, mask, absm):
    """mask = u < density; absm = |τ|·mask (what `_fast._l1_factor` sums), in one pass."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(u.shape[0]):
        keep = u[j] < density
        mask[j] = keep
        absm[j] = abs(tau[j]) * (one if keep else zero)  # a product, as torch: NaN·0 stays NaN


@functools.cache
def _compiled() -> tuple:
    """(element pass, DARE pre-pass), compiled on first use (and cached on disk by numba)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed (or MERGELAB_JIT=0); check _jit.AVAILABLE before calling")
    import numba

    jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    return jit(_kernel), jit(_dare_prepass)


def dare_prepass(u: torch.Tensor, tau: torch.Tensor, density: float, mask: torch.Tensor,
                 absm: torch.Tensor) -> None:
    """DARE's mask from cached draws and |τ|·mask for the L1 rescale, flat float32 CPU tensors
    (`mask` a bool tensor), equal to torch.lt(u, density) and |τ|.mul_(mask)."""
    _compiled()[1](u.numpy(), tau.numpy(), np.float32(density), mask.view(torch.uint8).numpy(), absm.numpy())


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
    _compiled()[0](
        arrs, mks, np.asarray(mode, np.int8), np.asarray(thr, f32), np.asarray(cut, np.int64),
        np.asarray([1.0 if v is None else v for v in div], f32), np.asarray([v is not None for v in div]),
        np.asarray([1.0 if v is None else float(v) for v in fac], f32), np.asarray([v is not None for v in fac]),
        np.asarray(weights, f32), bool(consensus), bool(normalize),
        f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
        base.numpy(), int(s), int(e), out.numpy(),
    )
    return out
