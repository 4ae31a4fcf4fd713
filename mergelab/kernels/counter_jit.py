"""The counter stream's DARE mask and its exact L1 sums in one compiled pass over |τ| (CPU, numba):
what `operators.draws.CounterStream.keep_mask` and `draws.exact_l1` compute with ~40 torch passes,
in one. Integer arithmetic only (the hash, the threshold, the grid sums), and the grid's
floor(|x|·2**scale) is the same float64 product and floor as torch's, so the values are the
torch path's exactly; tests/test_operators.py checks it."""
from __future__ import annotations

import functools

import numpy as np
import torch

from operators.draws import _BITS, _C1, _C2, keep_threshold

from . import jit_core

_M32 = 0xFFFFFFFF
_C2U = _C2 & _M32


def _mix(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _mask_l1_py(a, k0, k1, start, thr, pow2, with_sums, mask):
    total = 0
    after = 0
    n = mask.shape[0]
    shift = 32 - 24
    for i in range(n):
        idx = start + i
        hi = idx >> 32
        x = _mix((idx & 0xFFFFFFFF) ^ k0)
        x = _mix(x ^ ((k1 + hi * 0x9E3779B9) & 0xFFFFFFFF))
        keep = (x >> shift) < thr
        mask[i] = keep
        if with_sums:
            u = np.int64(np.floor(np.float64(a[i]) * pow2))
            total += u
            if keep:
                after += u
    return total, after


@functools.cache
def _compiled():
    import numba

    mix = numba.njit(inline="always")(_mix)
    src = _mask_l1_py
    g = dict(src.__globals__, _mix=mix)
    fn = type(src)(src.__code__, g, src.__name__)
    return numba.njit(cache=False, nogil=True, boundscheck=False, error_model="numpy")(fn)


def available() -> bool:
    return jit_core.AVAILABLE


def mask_l1(a: torch.Tensor, key: int, start: int, density: float, scale: torch.Tensor | None,
            mask: torch.Tensor) -> tuple[int, int]:
    """Fill `mask` (bool, flat) with draws start.. of stream `key` below `density`, and return the
    grid sums Σ floor(|a|·2**scale) over all entries and over the kept ones (0, 0 without scale).
    `a` holds |τ|, flat float32 on the CPU."""
    assert _C1 == 0x7FEB352D and _C2U == 0x846CA68B and _BITS == 24  # the hash of operators.draws
    fn = _compiled()
    pow2 = 0.0 if scale is None else float(2.0 ** int(scale))
    total, after = fn(a.numpy(), key & _M32, (key >> 32) & _M32, start, keep_threshold(density), pow2,
                      scale is not None, mask.numpy())
    return int(total), int(after)


class CounterSlices:
    """A row's counter-stream mask, redrawn slice by slice in flat order during a merge (the
    interface of `mt19937.MTStream.mask_into`): nothing tensor-sized is held for it."""

    def __init__(self, key: int, position: int):
        self.key, self.position = key, position

    def mask_into(self, density: float, mask: torch.Tensor) -> torch.Tensor:
        mask_l1(_EMPTY, self.key, self.position, density, None, mask)
        self.position += mask.numel()
        return mask


_EMPTY = torch.empty(0)
