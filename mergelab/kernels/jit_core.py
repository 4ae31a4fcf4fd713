"""The shared ground of the compiled (numba, extra `fast`) merge loops in `mergelab.kernels.jit_*`:
whether numba is there, the LLVM intrinsics the loops are written with (FMA, exact 16-bit
widening, the output dtype's rounding, wide vectors), the inlined helpers every element loop
calls (`_round`, `_elect`), and the probe of this torch's addcmul_ rounding.

Why the loops exist: the torch kernels (`kernels.taskvec_torch`, `kernels.chunked`) make ~45
element-wise passes over each slice for a TIES candidate against ~8 for a linear one; the
compiled loops make one, over the elements with the rows inside, which the compiler vectorizes.
They perform the same float32 operations in the same order as the torch path
(`taskvec_torch.Row.apply_` then `operators.task_vectors.combine_`, `operators.linear.weighted_sum_`
with addcmul_'s FMA where torch uses it, the output dtype's round-to-nearest-even, torch's serial
sum for the L1 norm, the generator's numbers in its order), so results are equal bit for bit;
tests/test_jit.py checks each against the torch path. Where an equivalence depends on this
machine's torch (FMA in addcmul_, the sum's vector width, the generator's stream) a probe
decides, and the torch path runs when the probe cannot match it.

Each `jit_*` module compiles its own loops on first use (`compiled()`, a NamedTuple of them):
it first takes `helpers()` from here and binds the names its loops call (`_round`, `_wid`, ...)
in its own globals, which is where numba resolves them.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import numpy as np
import torch

# An optional extra: without numba the engine and the trial merger use the torch kernels (same
# values). Only looked up here: numba (~50 MB, ~0.3 s) is imported on the first compiled call, so
# a linear `mergelab merge`, which makes none, does not pay for it. MERGELAB_JIT=0 turns the
# compiled loops off (to compare, or to rule them out when debugging). Read it as
# `jit_core.AVAILABLE` at call time (tests switch it).
AVAILABLE = importlib.util.find_spec("numba") is not None and os.environ.get("MERGELAB_JIT", "1") != "0"

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


class Helpers(NamedTuple):
    """What the compiled loops of every `jit_*` module are built from: `jit`, the decorator they
    compile with (cached on disk, no GIL, no bounds checks), the intrinsics and the inlined helpers."""

    jit: Any
    fma: Any  # a·b + c rounded once
    h2f: Any  # float16 bits -> float32
    b2f: Any  # bfloat16 bits -> float32
    wid: Any  # either, by the array's integer type
    wide: Any  # prefer the widest vectors in the calling function
    round: Any  # `_round_py`, inlined
    elect: Any  # `_elect_py`, inlined
    ceil_log2: Any  # `_ceil_log2_py`


@functools.cache
def helpers() -> Helpers:
    """The intrinsics and shared helpers, built on first use (numba imported then)."""
    if not AVAILABLE:
        raise RuntimeError("numba is not installed (or MERGELAB_JIT=0); check jit_core.AVAILABLE before calling")
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

    globals().update(_f16rt=f16rt, _bf16rt=bf16rt)  # what `_round_py` calls, bound before it compiles
    return Helpers(jit=jit, fma=fma, h2f=h2f, b2f=b2f, wid=wid, wide=wide_vectors,
                   round=numba.njit(inline="always")(_round_py),  # inlined in numba IR: vectorizes
                   elect=numba.njit(inline="always")(_elect_py), ceil_log2=jit(_ceil_log2_py))


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


@functools.cache
def eps32() -> float:
    """sparsify's L1-rescale epsilon rounded to float32, as the tensors compare with it."""
    from operators.sparsify import _RESCALE_EPS

    return float(np.float32(_RESCALE_EPS))


def bits16(t: torch.Tensor) -> np.ndarray:
    """A flat float16 / bfloat16 CPU tensor's bit patterns as the compiled 16-bit loops take them (a
    view, no copy): uint16 for float16, int16 for bfloat16; the integer type selects the widening."""
    v = t.view(torch.int16).numpy()
    return v.view(np.uint16) if t.dtype == torch.float16 else v
