"""TIES's top-k selection, compiled: the exact k-th largest magnitude of a flat float32 tensor by
a two-pass radix selection on its bit patterns, and the flat index of the last tie kept, instead
of a sort (what `sparsify.kth_largest` and torch.kthvalue give, and the stable sort's cutoff)."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core


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
    """This module's compiled loops, by name."""

    kth_largest_bits: Any
    nth_equal: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    jit = jit_core.helpers().jit
    return Compiled(kth_largest_bits=jit(_kth_largest_bits), nth_equal=jit(_nth_equal))


class TopKCut(NamedTuple):
    """The top-k rule of a tensor: keep |τ| > threshold, and |τ| == threshold at flat indices <=
    cutoff."""

    threshold: torch.Tensor  # a float32 scalar tensor
    cutoff: int


def top_k_cut(abs_flat: torch.Tensor, k: int) -> TopKCut:
    """The top-k rule of a flat float32 CPU tensor of magnitudes (1 <= k < n) as (threshold v,
    cutoff c): keep > v, and == v at flat indices <= c. v is the exact k-th largest value (what
    sparsify.kth_largest and torch.kthvalue give), found by a two-pass radix selection on the
    bit patterns; c is the flat index of the last tie kept (ties kept in flat order until k)."""
    bits = abs_flat.view(torch.int32).numpy().view(np.uint32)
    c = compiled()
    value, above, equal = c.kth_largest_bits(bits, int(k))
    need = k - int(above)
    cut = abs_flat.numel() - 1 if need >= equal else int(c.nth_equal(bits, int(value), need))
    thr = torch.tensor([int(value)], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]
    return TopKCut(thr, cut)
