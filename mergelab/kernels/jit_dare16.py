"""DARE from the 16-bit checkpoints as stored, for the trial merger: the rows' draws kept as one
byte each (`DrawKeys`, fixed per candidate density by one bucket sweep), τ = θ − base widened
exactly in the loop, the rows' ‖τ·mask‖₁ in torch's serial order (`_cascade16_py`, the base read
once for all rows) and the merge, in one compiled call (`dare16_pass`): `jit_dare.dare_pass`'s
values from about a third of the bytes. See `jit_core` for why these equal the torch kernels."""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core, jit_dare


def _cascade16_py(ms, b, ks, T, acc, start, size, W):
    """`jit_dare._cascade_py` for every row of a tensor at once, from the 16-bit sources as stored:
    row r's τ = θᵣ − base (each widened exactly by `_wid`, whose float16 or bfloat16 form the arrays'
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
    """`jit_dare._dare_rows_py` from 16-bit sources and draw key bytes (`_cascade16_py`): after[r] =
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
    """`jit_taskvec._masked_kernel` from 16-bit sources as stored and draw key bytes: τᵣ = θᵣ − base and the
    base widened exactly in the loop (`_wid`), row r kept where ks[r] < T[r], the same float32
    operations after."""
    _wide()
    R = len(ms)
    zero = np.float32(0.0)
    for j in range(out.shape[0]):
        bj = _wid(b[j])
        total = zero
        p_sum = zero  # as in jit_taskvec._masked_kernel
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


class Compiled(NamedTuple):
    """This module's compiled loops, by name (each the numba version of the function above)."""

    dare16_rows: Any
    masked16: Any
    keys_build: Any
    keys_set: Any
    dare16: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    h = jit_core.helpers()
    jit = h.jit
    globals().update(_round=h.round, _elect=h.elect, _wid=h.wid, _wide=h.wide, _ceil_log2=h.ceil_log2)
    globals().update(_cascade16=jit(_cascade16_py), _dare16_rows=jit(_dare16_rows_py),
                     _masked16=jit(_masked16_kernel))
    return Compiled(dare16_rows=jit(_dare16_rows_py), masked16=jit(_masked16_kernel), keys_build=jit(_keys_build_py),
                    keys_set=jit(_keys_set_py), dare16=jit(_dare16_py))


def key_limit(density: float) -> int:
    """K such that a draw u = k·2^-24 satisfies u < float32(density) exactly when k < K (the
    comparison `jit_dare.dare_pass` makes in float32)."""
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
        compiled().keys_build(u.numpy(), self.key, self.offs, self.pos, self.low)
        self._fixed: dict[int, int] = {}  # bucket -> the low-bits limit its keys are fixed for

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.offs.nbytes + self.pos.nbytes + self.low.nbytes

    def _set(self, q: int, kl: int) -> None:
        clean = 65536 if q == 0 else 0  # the limit at which bucket q is k >> 16 throughout
        cur = self._fixed.get(q, clean)
        if cur != kl:
            compiled().keys_set(self.key, self.offs, self.pos, self.low, q, cur, kl)
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
    """`jit_dare.dare_pass` from the 16-bit sources as stored (`bits16` views of one format: `ms` the rows'
    models, `b` the base) and the rows' draws as `DrawKeys`: the same masks, norms, factors and
    merged values, reading about a third of the bytes (the base once for all rows, no mask
    written). `l1` holds each row's ‖τ‖₁ (float32 values). False (nothing written) where the
    summation order cannot be reproduced."""
    n = out.shape[0]
    lanes = jit_dare.sum_lanes() if n <= jit_dare.L1_MAX else None
    if lanes is None:
        return False
    f32 = np.float32
    T = tuple(np.int32(k.fix(d)) for k, d in zip(keys, densities))
    compiled().dare16(ms, b, tuple(k.key for k in keys), T, lanes, np.asarray(l1, f32), f32(jit_core.eps32()),
                      tuple(f32(v) for v in weights), bool(consensus), bool(normalize),
                      f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam), bool(f32(lam) != f32(1.0)),
                      int(rmode), out)
    return True
