"""Compiled weighted sums (linear): Σ wᵢ·xᵢ (/ div) over float32 sources or 16-bit sources as
stored (widened exactly in the loop), written rounded through the output dtype, and the 16-bit
θ − base pass. See `jit_core` for why the compiled loops equal the torch kernels bit for bit."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core


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


class Compiled(NamedTuple):
    """This module's compiled loops, by name (each the numba version of the `_..._kernel` above)."""

    linear: Any
    linear16: Any
    sub16: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    h = jit_core.helpers()
    globals().update(_fma=h.fma, _round=h.round, _wid=h.wid, _wide=h.wide, _h2f=h.h2f, _b2f=h.b2f)
    jit = h.jit
    return Compiled(linear=jit(_linear_kernel), linear16=jit(_linear_kernel_16), sub16=jit(_sub16_kernel))


def linear_pass(xs: list[torch.Tensor], weights: np.ndarray, normalize: bool, divisor: float,
                rmode: int, out: torch.Tensor) -> torch.Tensor:
    """out = Σ wᵢ·xsᵢ (/ divisor) over flat float32 CPU tensors (or all float16, or all bfloat16:
    widened exactly in the loop, so the sources can be kept at half the bytes), rounded through the output
    dtype (`rmode`) and written into the flat float32 tensor `out` (a model parameter): the
    values of weighted_sum_ followed by `out.copy_(result.to(out_dtype))`, bit for bit.
    `weights` are float32; `divisor` is the float32 Σwᵢ that weighted_sum_ divides by."""
    w = tuple(np.float32(v) for v in weights)
    tail = (w, bool(jit_core.addcmul_fuses()), bool(normalize), np.float32(divisor), int(rmode), out.numpy())
    if xs[0].dtype in (torch.float16, torch.bfloat16):  # 16-bit sources, widened in the loop
        compiled().linear16(tuple(jit_core.bits16(x) for x in xs), *tail)
    else:
        compiled().linear(tuple(x.numpy() for x in xs), *tail)
    return out


def sub16(m: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = m.float() − b.float() for flat float16 (or bfloat16) CPU tensors of one dtype, into
    the flat float32 tensor `out`, in one compiled pass."""
    compiled().sub16(m.view(torch.int16).numpy().view(np.uint16), b.view(torch.int16).numpy().view(np.uint16),
                     m.dtype == torch.float16, out.numpy())
    return out
