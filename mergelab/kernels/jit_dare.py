"""DARE's compiled passes over float32 task vectors: the mask from the draws and the L1 norms
summed in the exact order of torch's serial float32 sum (aten's SumKernel cascade), fused into
one pass (`_dare_mask_l1`), for both norms at once (`l1_pair`), fed slice by slice (`L1Stream`,
so from disk neither τ nor its mask is ever whole), and a whole DARE merge with L1 rescale from
cached draws in two compiled calls (`dare_pass`). `sum_lanes` probes the vector width that
reproduces this torch's sum; where none does, the torch path runs. See `jit_core` for why the
compiled loops equal the torch kernels bit for bit."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core, jit_taskvec


def _dare_prepass(u, tau, density, mask, absm):
    """mask = u < density; absm = |τ|·mask (what `taskvec_torch.l1_factor` sums), in one pass."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(u.shape[0]):
        keep = u[j] < density
        mask[j] = keep
        absm[j] = abs(tau[j]) * (one if keep else zero)  # a product, as torch: NaN·0 stays NaN


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


def _dare_rows_py(us, xs, ts, L, ms, after):
    """`_dare_mask_l1` for every row of a tensor in one call: ms[r] = us[r] < ts[r] and
    after[r] = ‖xs[r]·ms[r]‖₁ in torch's serial order."""
    for r in range(len(xs)):
        after[r] = _mask_l1(us[r], xs[r], ts[r], L, ms[r])


class Compiled(NamedTuple):
    """This module's compiled loops, by name (each the numba version of the function above)."""

    dare_prepass: Any
    dare_mask_l1: Any
    l1_pair: Any
    l1_stream: Any
    dare_rows: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    h = jit_core.helpers()
    jit = h.jit
    globals().update(_ceil_log2=h.ceil_log2)
    globals().update(_cascade=jit(_cascade_py), _l1_stream=jit(_l1_stream_py), _mask_l1=jit(_dare_mask_l1))
    return Compiled(dare_prepass=jit(_dare_prepass), dare_mask_l1=jit(_dare_mask_l1), l1_pair=jit(_l1_pair_py),
                    l1_stream=jit(_l1_stream_py), dare_rows=jit(_dare_rows_py))


class L1Norms(NamedTuple):
    """A task vector's L1 norms before and after its mask, float32 scalar tensors."""

    before: torch.Tensor  # ‖τ‖₁
    after: torch.Tensor  # ‖τ·mask‖₁


def dare_prepass(u: torch.Tensor, tau: torch.Tensor, density: float, mask: torch.Tensor,
                 absm: torch.Tensor) -> None:
    """DARE's mask from cached draws and |τ|·mask for the L1 rescale, flat float32 CPU tensors
    (`mask` a bool tensor), equal to torch.lt(u, density) and |τ|.mul_(mask)."""
    compiled().dare_prepass(u.numpy(), tau.numpy(), np.float32(density), mask.view(torch.uint8).numpy(), absm.numpy())


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
        if all(compiled().dare_mask_l1(u, tau, np.float32(0.6), lanes, mask[: len(u)]) == np.float32(ref)
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
    v = compiled().dare_mask_l1(u.numpy(), tau.numpy(), np.float32(density), lanes, mask.view(torch.uint8).numpy())
    return torch.tensor(v, dtype=torch.float32)


def l1_pair(tau: torch.Tensor, mask: torch.Tensor) -> L1Norms | None:
    """(‖τ‖₁, ‖τ·mask‖₁) as `l1_norm_of_abs(|τ|)` and `l1_norm_of_abs(|τ|.mul_(mask))` compute them,
    in one pass over a flat float32 CPU tensor and a bool mask, or None where the summation order
    cannot be reproduced (see `sum_lanes`, `L1_MAX`)."""
    lanes = sum_lanes() if tau.numel() <= L1_MAX else None
    if lanes is None:
        return None
    b, a = compiled().l1_pair(tau.numpy(), mask.view(torch.uint8).numpy(), lanes)
    return L1Norms(torch.tensor(b, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))


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

    def feed(self, tau: torch.Tensor, mask: torch.Tensor, s: int) -> L1Norms | None:
        """Take the slice [s, s + len) of τ and its bool mask; with the last slice, return
        (‖τ‖₁, ‖τ·mask‖₁), else None."""
        e = s + tau.numel()
        if self._parts is not None:
            self._parts.append((tau.clone(), mask.clone()))
            if e < self.n:
                return None
            return l1_pair(torch.cat([t for t, _ in self._parts]), torch.cat([m for _, m in self._parts]))
        b, a = compiled().l1_stream(tau.numpy(), mask.view(torch.uint8).numpy(), int(s), self.n, self.lanes,
                                    self._accb, self._acca, self._st)
        if e < self.n:
            return None
        return L1Norms(torch.tensor(b, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))


def dare_pass(us: tuple, xs: tuple, densities: list[float], l1: tuple, masks: tuple, weights: list[float],
              consensus: bool, normalize: bool, lin_div: torch.Tensor | None, lam: float, base: np.ndarray,
              rmode: int, out: np.ndarray) -> bool:
    """A whole DARE merge with L1 rescale from cached draws, in two compiled calls, over the numpy
    views of flat float32 CPU tensors (`us` the rows' uniforms, `xs` their task vectors, `l1` their
    ‖τ‖₁ as float32, `masks` uint8 workspaces): every row's mask and ‖τ·mask‖₁, the factors
    ‖τ‖₁ / ‖τ·mask‖₁ (no rescale where a norm is below sparsify's epsilon), then
    `jit_taskvec._masked_kernel` into `out` rounded through the output dtype: `dare_mask_l1` per row
    then `jit_taskvec.uniform_pass`, value for value. False (nothing written) where the summation
    order cannot be reproduced."""
    n = out.shape[0]
    lanes = sum_lanes() if n <= L1_MAX else None
    if lanes is None:
        return False
    f32 = np.float32
    after = np.empty(len(xs), f32)
    compiled().dare_rows(us, xs, tuple(f32(d) for d in densities), lanes, masks, after)
    eps = f32(jit_core.eps32())
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf/inf -> nan, as torch's division gives, unwarned
        fac = tuple(f32(1.0) if b < eps or a < eps else b / a for b, a in zip(l1, after))  # float32 division
    jit_taskvec.compiled().masked(xs, masks, fac, tuple(f32(v) for v in weights), bool(consensus), bool(normalize),
                                  f32(1.0) if lin_div is None else f32(float(lin_div)), f32(lam),
                                  bool(f32(lam) != f32(1.0)), base, int(rmode), out)
    return True
