"""Chunked, fused merge kernels shared by the streaming engine and the trial merger: a tensor is
merged in cache-sized slices with reused buffers, giving bit for bit what the operators compute.

Why it is exact: every step after the per-tensor statistics is element by element (the sums in
`combine_` run over the stacked models, not over elements), so computing it slice by slice
changes no value. The statistics that need the whole tensor (the top-k threshold, DARE's L1
norms, fixed-order sums that no thread count changes) are computed on a full-tensor buffer with
the very calls the operators use (or compiled loops that sum in their order, `_jit`), and random
numbers are drawn in flat order from the same generator (float32 `uniform_` consumes the
generator element by element, so slices draw the same numbers as one full-tensor draw; with
numba, `_jit.MTStream` draws that stream itself, and a copy of it at a row's start redraws the
row's mask slice by slice).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from operators import get_operator, tensor_seed
from operators import sparsify as _sp
from operators.sparsify import one_thread
from operators.checks import raise_if_invalid
from operators.draws import CounterStream, exact_l1, factor_from_sums, fixed_scale, rescale_factor
from operators.linear import linear_weights, weighted_sum_
from operators.task_vectors import METHODS, TaskVectorMethod, combine_, plain_divisor, task_weights

from . import _jit
from .kernels import counter_jit
from .plan import MergePlan, Read, TensorJob

# Elements per slice: a multiple of 64 (so slice boundaries never split a SIMD vector) small
# enough that a slice of every operand stays in the L2 cache.
CHUNK = max(64, int(os.environ.get("MERGELAB_CHUNK", 1 << 16)) // 64 * 64)

_TASK: dict[str, TaskVectorMethod] = {m.name: m for m, _ in METHODS}
BERNOULLI = frozenset(m.name for m, _ in METHODS if m.sparsification == "bernoulli")  # DARE
_F32 = torch.float32

Sink = Callable[[int, int, torch.Tensor], None]  # (start, stop, float32 slice of the result)


class Workspace:
    """Grow-only scratch buffers keyed by role: a merge allocates (and page-faults) each buffer
    once, at the size of the largest tensor that needs it, instead of once per tensor."""

    def __init__(self):
        self._bufs: dict[object, torch.Tensor] = {}
        self._np: dict[object, np.ndarray] = {}
        self._views: dict[object, tuple[np.ndarray, ...]] = {}

    def get(self, key, n: int, dtype: torch.dtype = _F32) -> torch.Tensor:
        t = self._bufs.get(key)
        if t is None or t.dtype != dtype or t.numel() < n:
            t = self._bufs[key] = torch.empty(n, dtype=dtype)
        return t[:n]

    def arrays(self, key, count: int, n: int, dtype=np.uint8) -> tuple[np.ndarray, ...]:
        """`count` numpy scratch arrays of n elements (for the compiled passes), their views cached
        per length: no tensor-to-numpy conversion per call."""
        views = self._views.get((key, count, n))
        if views is None:
            base = self._np.get((key, count))
            if base is None or base.shape[1] < n or base.dtype != dtype:
                base = self._np[(key, count)] = np.empty((count, n), dtype)
                self._views = {k: v for k, v in self._views.items() if k[:2] != (key, count)}
            views = self._views[(key, count, n)] = tuple(base[r, :n] for r in range(count))
        return views

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._bufs.values()) + sum(a.nbytes for a in self._np.values())


def supported(plan: MergePlan, job: TensorJob, compute_dtype: torch.dtype = _F32,
              sources: dict | None = None, fitted: bool = False) -> bool:
    """Whether the chunked kernels merge this job (else the engine calls the operator on whole
    tensors): linear and the task-vector methods without DELLA/breadcrumbs ranking, float32
    compute, no vocabulary cut or pad (a vocabulary tensor whose sources all have the output's
    shape needs none, and `fitted` inputs were cut or padded already)."""
    if job.copy or compute_dtype != _F32:
        return False
    if job.rows is not None and not fitted:  # fitted: the inputs have the job's rows already
        reads = ([job.base] if job.base is not None else []) + list(job.models)
        if sources is None or any(tuple(sources[r.ref].tensors[r.tensor].shape) != tuple(job.shape)
                                  for r in reads):
            return False
    name = get_operator(plan.recipe.merge_method).name
    if name == "linear":
        return True
    m = _TASK.get(name)
    if m is None or m.sparsification not in ("none", "magnitude", "bernoulli"):
        return False
    if job.base is None and plan.recipe.base_index is None:
        return False
    return any(i != plan.recipe.base_index for i in range(len(job.models)))


class Inputs:
    """Slices of one job's inputs as float32. Subclasses: disk (positioned reads) and the trial
    merger's in-memory cache."""

    n: int

    def model(self, i: int, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def base(self, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def delta_into(self, i: int, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        """τᵢ[s:e] = θᵢ − base, written into `out`."""
        return torch.sub(self.model(i, s, e), self.base(s, e), out=out)

    def delta_view(self, i: int, s: int, e: int) -> torch.Tensor | None:
        """τᵢ[s:e] as a read-only tensor when it is held already (no copy), else None."""
        return None

    def delta_full(self, i: int, ws: Workspace) -> torch.Tensor:
        """τᵢ over the whole tensor, flat float32 (a workspace buffer unless it is held already)."""
        a = ws.get("abs_full", self.n)
        for s in range(0, self.n, CHUNK):
            e = min(self.n, s + CHUNK)
            self.delta_into(i, s, e, a[s:e])
        return a

    def abs_delta(self, i: int, ws: Workspace) -> torch.Tensor:
        """|τᵢ| over the whole tensor, flat, in a workspace buffer."""
        a = ws.get("abs_full", self.n)
        for s in range(0, self.n, CHUNK):
            e = min(self.n, s + CHUNK)
            self.delta_into(i, s, e, a[s:e]).abs_()
        return a

    def top_k_rule(self, i: int, k: int, ws: Workspace) -> "_sp.TopKRule | CutRule":
        a = self.abs_delta(i, ws)
        if _jit.AVAILABLE:  # the same threshold by a compiled radix selection, and its cutoff
            return CutRule(*_jit.top_k_cut(a, k))
        return _sp.top_k_rule(a, k)


class DiskInputs(Inputs):
    """Reads slices straight from the safetensors files into reused buffers (pread): nothing
    is mapped, so the page cache holds the files and this process holds only the buffers."""

    def __init__(self, job: TensorJob, sources: dict, base_index: int | None, ws: Workspace):
        self.n = math.prod(job.shape)
        self.ws = ws
        self._slots: list[tuple[object, str, torch.dtype]] = []
        index: dict[tuple[str, str], int] = {}

        def slot(r: Read) -> int:
            key = (r.ref, r.tensor)
            if key not in index:
                src = sources[r.ref]
                index[key] = len(self._slots)
                self._slots.append((src, r.tensor, src.tensors[r.tensor].dtype))
            return index[key]

        self._model = [slot(r) for r in job.models]
        if job.base is not None:
            self._base = slot(job.base)
        else:
            self._base = self._model[base_index] if base_index is not None else None
        self._at: dict[int, tuple[int, int]] = {}  # slot -> slice its buffer holds now
        self._raw_at: dict[int, tuple[int, int]] = {}  # the same for the buffers as stored
        self._abs_of: int | None = None
        # τ straight from 16-bit slices by the compiled loop (widen and subtract in one pass)
        dtypes = {d for _, _, d in self._slots}
        self._sub16 = (_jit.AVAILABLE and self._base is not None and len(dtypes) == 1
                       and next(iter(dtypes)) in (torch.float16, torch.bfloat16))

    def _raw(self, slot: int, s: int, e: int) -> torch.Tensor:
        src, name, dtype = self._slots[slot]
        raw = self.ws.get(("raw", slot), CHUNK, dtype)[: e - s]
        if self._raw_at.get(slot) != (s, e):
            src.read_into(name, raw, s)
            self._raw_at[slot] = (s, e)
        return raw

    def _get(self, slot: int, s: int, e: int) -> torch.Tensor:
        f32 = self.ws.get(("in", slot), CHUNK)[: e - s]
        if self._at.get(slot) == (s, e):
            return f32
        src, name, dtype = self._slots[slot]
        if dtype == _F32:
            src.read_into(name, f32, s)
        else:
            f32.copy_(self._raw(slot, s, e))
        self._at[slot] = (s, e)
        return f32

    def delta_into(self, i, s, e, out):
        if self._sub16:  # the values of torch.sub(θ.float(), base.float()), in one pass
            return _jit.sub16(self._raw(self._model[i], s, e), self._raw(self._base, s, e), out)
        return super().delta_into(i, s, e, out)

    def model(self, i, s, e):
        return self._get(self._model[i], s, e)

    def base(self, s, e):
        return self._get(self._base, s, e)

    def delta_full(self, i, ws):
        self._abs_of = None  # the buffer is about to hold τ
        return super().delta_full(i, ws)

    def abs_delta(self, i, ws):
        if self._abs_of == i:
            return ws.get("abs_full", self.n)
        a = super().abs_delta(i, ws)
        self._abs_of = i
        return a


class StoredInputs(DiskInputs):
    """The trial merger's compact cache read like the files: each source held flat as stored
    (16-bit checkpoints stay 16-bit), slices widened (or τ computed) on the fly into the
    workspace's buffers. The chunked kernels then run exactly as from disk, bit for bit."""

    def __init__(self, job: TensorJob, stored: dict, base_index: int | None, ws: Workspace):
        self.n = math.prod(job.shape)
        self.ws = ws
        self._slots = []
        index: dict[tuple[str, str], int] = {}

        def slot(r: Read) -> int:
            key = (r.ref, r.tensor)
            if key not in index:
                index[key] = len(self._slots)
                t = stored[key]
                self._slots.append((t, r.tensor, t.dtype))
            return index[key]

        self._model = [slot(r) for r in job.models]
        if job.base is not None:
            self._base = slot(job.base)
        else:
            self._base = self._model[base_index] if base_index is not None else None
        self._at, self._raw_at = {}, {}
        self._abs_of = None
        dtypes = {d for _, _, d in self._slots}
        self._sub16 = (_jit.AVAILABLE and self._base is not None and len(dtypes) == 1
                       and next(iter(dtypes)) in (torch.float16, torch.bfloat16))

    def _raw(self, slot: int, s: int, e: int) -> torch.Tensor:
        return self._slots[slot][0][s:e]

    def _get(self, slot: int, s: int, e: int) -> torch.Tensor:
        t, _, dtype = self._slots[slot]
        if dtype == _F32:
            return t[s:e]
        f32 = self.ws.get(("in", slot), CHUNK)[: e - s]
        if self._at.get(slot) != (s, e):
            f32.copy_(t[s:e])
            self._at[slot] = (s, e)
        return f32


class CutRule:
    """The top-k mask as threshold and cutoff: keep |τ| > v, and |τ| == v at flat indices <= c,
    where c = the k-th index of the stable descending magnitude order and v = |τ[c]|. The same
    mask as `sparsify.TopKRule` (ties kept in flat order until k are kept), but each slice is
    one or two comparisons, with no scan for the ties."""

    def __init__(self, threshold: torch.Tensor, cutoff: int):
        self.threshold = threshold
        self.cutoff = cutoff

    def mask(self, a: torch.Tensor, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        c = self.cutoff + 1 - s  # entries [0, c) of this slice keep their ties
        if c >= e - s:
            return torch.ge(a, self.threshold, out=out)
        if c <= 0:
            return torch.gt(a, self.threshold, out=out)
        torch.ge(a[:c], self.threshold, out=out[:c])
        torch.gt(a[c:], self.threshold, out=out[c:])
        return out


@dataclass
class _Row:
    """How one task vector is sparsified, decided before the element pass: a threshold rule
    (TIES, applied slice by slice), or a full mask (DARE, or TIES with L1 rescale), then an
    optional division (inverse density) and factor (L1 rescale)."""

    i: int
    rule: _sp.TopKRule | CutRule | None = None
    mask: torch.Tensor | None = None
    div: float | None = None
    factor: torch.Tensor | None = None
    stream: "_jit.MTStream | None" = None  # DARE from disk: the row's draws, for its mask slice by slice
    density: float = 1.0

    def apply_(self, src: torch.Tensor, d: torch.Tensor, s: int, e: int, ws: Workspace) -> None:
        """d = sparsified src (src may be d itself); the operations of sparsify.apply_mask_, in
        its order (the 0/1 product reads src and writes d: the same values as copy, then mul_)."""
        if self.rule is not None:
            a = torch.abs(src, out=ws.get("abs", e - s))
            # a float 0/1 mask: comparisons into bool and products with bool are 5x slower on
            # the CPU than with float32, and the product's values are the same
            keep = ws.get("keep", e - s)
            if isinstance(self.rule, CutRule):
                keep = self.rule.mask(a, s, e, keep)
            else:
                keep = self.rule.mask_chunk(a, out=keep)
            torch.mul(src, keep, out=d)
        elif self.mask is not None:
            torch.mul(src, self.mask[s:e].view(torch.uint8), out=d)  # 0/1 as uint8: 3x faster
        elif src is not d:
            d.copy_(src)
        if self.div is not None:
            d.div_(self.div)
        if self.factor is not None:
            d.mul_(self.factor)


def _rescale_mode(params: dict) -> str:
    if params["rescale"]:
        return "inverse_density" if params.get("rescale_inverse_density", False) else "l1"
    return "none"


def _l1_factor(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """sparsify.apply_mask_'s L1 rescale factor, from |τ| (overwritten) and the mask."""
    before = _sp.l1_norm_of_abs(a)
    a.mul_(mask.view(torch.uint8))  # |τ|·m equals |τ·m| entry for entry (m is 0 or 1)
    return _l1_ratio(before, _sp.l1_norm_of_abs(a))


def _l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """‖τ‖₁ / ‖τ·m‖₁, or None (no rescale) when either norm is below sparsify's epsilon."""
    eps = _EPS32  # the tensors compare with the threshold rounded to float32, as here
    if float(before) < eps or float(after) < eps:
        return None
    return before / after


_EPS32 = float(np.float32(_sp._RESCALE_EPS))


def _prepare_row(method: TaskVectorMethod, job: TensorJob, i: int, slot: int, inputs: Inputs,
                 ws: Workspace, gen: torch.Generator | None) -> _Row:
    row = _Row(i)
    n = inputs.n
    density = float(job.model_params[i]["density"])
    rescale = _rescale_mode(job.params)
    kind = method.sparsification
    if kind == "none" or density >= 1 or n == 0:
        return row
    if kind == "magnitude":
        k = max(1, int(density * n))
        if k >= n:
            row.mask = torch.ones(n, dtype=torch.bool)
        else:
            row.rule = inputs.top_k_rule(i, k, ws)
            if rescale == "l1":
                a = inputs.abs_delta(i, ws)
                out = ws.get(("mask", slot), n, torch.bool)
                if isinstance(row.rule, CutRule):
                    row.mask = row.rule.mask(a, 0, n, out)
                else:
                    row.mask = row.rule.mask_chunk(a, out=out)
                row.rule = None
    elif isinstance(gen, CounterStream):  # the counter stream: any slice alone, exact L1 sums
        gen.position = slot * n  # rows take consecutive stretches, in row order
        if counter_jit.available() and rescale == "l1" and type(inputs) is DiskInputs:
            # from disk nothing whole: the largest |τ| (its grid), then τ slice by slice into both
            # grid sums, and the mask redrawn slice by slice during the merge
            tau = ws.get("tau", CHUNK)
            keep = ws.get("keep_mask", CHUNK, torch.bool)
            amax = torch.zeros((), dtype=torch.float32)
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                torch.maximum(amax, inputs.delta_into(i, s, e, tau[: e - s]).abs_().amax(), out=amax)
            scale = fixed_scale(amax, n)
            total = after = 0
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                a = inputs.delta_into(i, s, e, tau[: e - s]).abs_()
                t, f = counter_jit.mask_l1(a, gen.key, gen.position + s, density, scale, keep[: e - s])
                total, after = total + t, after + f
            row.stream, row.density = counter_jit.CounterSlices(gen.key, gen.position), density
            row.factor = factor_from_sums(torch.tensor(total), torch.tensor(after), scale, _sp._RESCALE_EPS)
            return row
        if counter_jit.available():  # mask and both grid sums in one compiled pass over |τ|
            mask = ws.get(("mask", slot), n, torch.bool)
            a = inputs.abs_delta(i, ws) if rescale == "l1" else None
            scale = fixed_scale(a.amax(), n) if a is not None else None
            total, after = counter_jit.mask_l1(a if a is not None else ws.get("abs_full", 0), gen.key, gen.position,
                                               density, scale, mask)
            row.mask = mask
            if a is not None:
                row.factor = factor_from_sums(torch.tensor(total), torch.tensor(after), scale, _sp._RESCALE_EPS)
                return row
        else:
            row.mask = gen.keep_mask(torch.Size([n]), density, "cpu")
            if rescale == "l1":
                row.factor = rescale_factor(exact_l1(inputs.abs_delta(i, ws)), row.mask, _sp._RESCALE_EPS)
                if isinstance(inputs, DiskInputs):
                    inputs._abs_of = None
                return row
    else:  # bernoulli, mergekit's stream: the draws of its CPU generator, slice by slice
        if isinstance(gen, _jit.MTStream) and rescale == "l1" and isinstance(inputs, DiskInputs) \
                and _jit.sum_lanes() is not None and n <= _jit.L1_MAX:
            # nothing whole: τ and the mask slice by slice into the two norms, and the row's
            # draws kept as a stream position, to redraw its mask slice by slice in the merge
            row.stream, row.density = gen.copy(), density
            norms = _jit.L1Stream(n)
            tau = ws.get("tau", CHUNK)
            keep = ws.get("keep_mask", CHUNK, torch.bool)
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                got = norms.feed(inputs.delta_into(i, s, e, tau[: e - s]), gen.mask_into(density, keep[: e - s]), s)
            row.factor = _l1_ratio(*got)
            return row
        mask = ws.get(("mask", slot), n, torch.bool)
        drawn = inputs.uniform(i) if isinstance(inputs, CachedInputs) else None
        if drawn is not None and rescale == "l1" and _jit.AVAILABLE:
            # cached draws and ‖τ‖₁: the mask and ‖τ·mask‖₁ in one compiled pass that sums in
            # torch's order (nothing else written); else mask and |τ|·mask, then torch's sum
            after = _jit.dare_mask_l1(drawn, inputs._deltas[i], density, mask)
            if after is not None:
                row.mask = mask
                row.factor = _l1_ratio(inputs.l1_norm(i), after)
                return row
            a = ws.get("abs_full", n)
            _jit.dare_prepass(drawn, inputs._deltas[i], density, mask, a)
            row.mask = mask
            row.factor = _l1_ratio(inputs.l1_norm(i), _sp.l1_norm_of_abs(a))
            return row
        if drawn is not None:  # the same numbers, drawn once for the whole search
            torch.lt(drawn, density, out=mask)
        elif isinstance(gen, _jit.MTStream):  # the generator's numbers, by the compiled loop
            gen.mask_into(density, mask)
            if rescale == "l1":
                # both L1 norms in one compiled pass over τ in torch's summation order (None
                # where that order cannot be reproduced: then torch's sums below)
                norms = _jit.l1_pair(inputs.delta_full(i, ws), mask)
                if norms is not None:
                    row.mask = mask
                    row.factor = _l1_ratio(*norms)
                    return row
        else:
            r = ws.get("rand", CHUNK)
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                torch.lt(r[: e - s].uniform_(generator=gen), density, out=mask[s:e])
        row.mask = mask
    if rescale == "inverse_density":
        row.div = density
    elif rescale == "l1":
        a = inputs.abs_delta(i, ws)
        row.factor = _l1_factor(a, row.mask)
        if isinstance(inputs, DiskInputs):
            inputs._abs_of = None  # the buffer now holds |τ|·m
    return row


# A slice is too small for OpenMP's fork/join to pay: with 2 threads on a busy 2-core machine a
# 64K-element copy took 20x longer (threads spin waiting for a descheduled peer). Results do not
# depend on the thread count: the only whole-tensor sums (the L1 rescale) are fixed-order.
single_thread = one_thread


def merge_job(plan: MergePlan, job: TensorJob, inputs: Inputs, sink: Sink, ws: Workspace,
              dest: torch.Tensor | None = None) -> None:
    """Merge one tensor slice by slice, handing each float32 slice of the result to `sink`.
    With `dest` (the float32 tensor `sink` fills) the compiled loops may write the result, rounded
    through the output dtype, straight into it instead."""
    with single_thread():
        _merge_job(plan, job, inputs, sink, ws, dest)


def _merge_job(plan: MergePlan, job: TensorJob, inputs: Inputs, sink: Sink, ws: Workspace,
               dest: torch.Tensor | None = None) -> None:
    op = get_operator(plan.recipe.merge_method)
    base_index = plan.recipe.base_index
    raise_if_invalid(op.name, job.name, job.model_params, job.params, base_index)
    n = inputs.n
    if op.name == "linear":
        weights = linear_weights(job.model_params)
        normalize = job.params["normalize"]
        acc = ws.get("acc", CHUNK)
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            vals = [inputs.model(i, s, e) for i in range(len(job.models))]
            sink(s, e, weighted_sum_(acc[: e - s], vals, weights, normalize))
        return

    method = _TASK[op.name]
    others = [i for i in range(len(job.models)) if i != base_index]
    if isinstance(inputs, CachedInputs) and _jit.AVAILABLE:  # whole-tensor compiled passes
        fast = {"bernoulli": _dare_cached, "magnitude": _ties_cached}.get(method.sparsification)
        if fast is not None and fast(method, job, inputs, others, sink, ws, dest):
            return
    gen = None
    if method.sparsification == "bernoulli" and plan.recipe.rng != "mergekit":
        gen = CounterStream(tensor_seed(plan.seed, job.name))
    elif method.sparsification == "bernoulli":
        seed = tensor_seed(plan.seed, job.name)
        gen = _jit.mt_stream(seed) if not _draws_cached(inputs) else None
        if gen is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
    rows = [_prepare_row(method, job, i, r, inputs, ws, gen) for r, i in enumerate(others)]
    if _jit_ready(inputs, rows):
        _jit_merge(method, job, inputs, rows, sink, ws, dest)
        return
    stack = ws.get("stack", len(others) * CHUNK)
    out = ws.get("out", CHUNK)
    if _jit.AVAILABLE and rows and all((r.mask is not None or r.stream is not None) and r.rule is None
                                       and r.div is None for r in rows):
        # DARE from disk (and TIES with L1 rescale): each slice through the compiled masked loop,
        # a streamed row's mask slice redrawn from its stream position
        common = _jit_common(method, job, [r.i for r in rows])
        fac = [1.0 if r.factor is None else float(r.factor) for r in rows]
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            d = stack[: len(rows) * (e - s)].view(len(rows), e - s)
            deltas = [inputs.delta_into(row.i, s, e, d[r]) for r, row in enumerate(rows)]
            masks = [r.mask[s:e] if r.stream is None
                     else r.stream.mask_into(r.density, ws.get(("redraw", k), CHUNK, torch.bool)[: e - s])
                     for k, r in enumerate(rows)]
            _jit.uniform_pass(deltas, masks, None, None, fac, base=inputs.base(s, e),
                              s=0, e=e - s, rmode=_jit.ROUND_NONE, out=out[: e - s], **common)
            sink(s, e, out[: e - s])
        return
    if _jit.AVAILABLE and rows and all(isinstance(r.rule, CutRule) and r.div is None and r.factor is None
                                       for r in rows):
        # TIES from disk: each slice's task vectors go through the compiled element loop
        thr = [float(r.rule.threshold) for r in rows]
        cut = [r.rule.cutoff for r in rows]
        common = _jit_common(method, job, [r.i for r in rows])
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            d = stack[: len(rows) * (e - s)].view(len(rows), e - s)
            deltas = [inputs.delta_into(row.i, s, e, d[r]) for r, row in enumerate(rows)]
            _jit.uniform_pass(deltas, None, thr, [c - s for c in cut], [1.0] * len(rows), base=inputs.base(s, e),
                              s=0, e=e - s, rmode=_jit.ROUND_NONE, out=out[: e - s], **common)
            sink(s, e, out[: e - s])
        return
    weights = task_weights(job.model_params, others, stack.view(len(others), -1))

    def work(key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return ws.get(("combine", key), numel, dtype)

    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        d = stack[: len(others) * (e - s)].view(len(others), e - s)
        for r, row in enumerate(rows):
            src = inputs.delta_view(row.i, s, e)
            if src is None:
                src = inputs.delta_into(row.i, s, e, d[r])
            row.apply_(src, d[r], s, e, ws)
        sink(s, e, combine_(method, d, weights, inputs.base(s, e), job.params, out=out[: e - s], work=work))


def _prep(inputs: Inputs, others: list[int]) -> dict | None:
    """The numpy views the compiled whole-tensor passes take, built once per CachedInputs (the
    trial merger keeps those for the whole search): None unless the task vectors and the base are
    flat contiguous float32 CPU tensors."""
    if not (_jit.AVAILABLE and isinstance(inputs, CachedInputs) and inputs._deltas is not None and others):
        return None
    key = tuple(others)
    got = inputs.prep.get(key, False)
    if got is not False:
        return got
    n = inputs.n
    deltas = [inputs._deltas[i] for i in others]
    got = None

    def ok(t):
        return t is not None and t.dtype == _F32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() == n

    if n > 0 and all(ok(t) for t in (*deltas, inputs._base)):
        got = {"xs": tuple(t.numpy() for t in deltas), "base": inputs._base.numpy(), "us": None, "l1": None,
               "order": None}
        if inputs._uniforms is not None and all(ok(inputs._uniforms[i]) for i in others) \
                and inputs._l1 is not None and all(inputs._l1[i] is not None for i in others):
            got["us"] = tuple(inputs._uniforms[i].numpy() for i in others)
            got["l1"] = tuple(np.float32(inputs._l1[i].item()) for i in others)
        if inputs._order is not None and all(inputs._order[i] is not None for i in others):
            got["order"] = tuple(inputs._order[i].numpy() for i in others)
    inputs.prep[key] = got
    return got


def _whole_out(job: TensorJob, n: int, ws: Workspace, dest: torch.Tensor | None) -> tuple[np.ndarray, int, bool]:
    """Where a whole-tensor compiled pass writes: the model's parameter (rounded through the output
    dtype) when given, else a float32 workspace buffer handed to the sink afterwards."""
    rmode = _jit.round_mode(job.out_dtype)
    if dest is not None and rmode is not None:
        return dest.view(-1).numpy(), rmode, False
    return ws.get("jit_out", n).numpy(), _jit.ROUND_NONE, True


def _sink_whole(buf: np.ndarray, n: int, sink: Sink) -> None:
    t = torch.from_numpy(buf)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        sink(s, e, t[s:e])


def _dare_cached(method: TaskVectorMethod, job: TensorJob, inputs: Inputs, others: list[int], sink: Sink,
                 ws: Workspace, dest: torch.Tensor | None) -> bool:
    """DARE with L1 rescale from the trial merger's cached draws and task vectors, by
    `_jit.dare_pass` (masks, norms and the merge in two compiled calls, no per-row Python): what
    `_prepare_row` and `_jit_merge` compute. False (nothing done) where it does not apply."""
    if _rescale_mode(job.params) != "l1":
        return False
    prep = _prep(inputs, others)
    if prep is None or prep["us"] is None:
        return False
    densities = [float(job.model_params[i]["density"]) for i in others]
    if any(d >= 1 for d in densities):
        return False
    n = inputs.n
    masks = ws.arrays("dare_masks", len(others), n)
    out, rmode, via_sink = _whole_out(job, n, ws, dest)
    if not _jit.dare_pass(prep["us"], prep["xs"], densities, prep["l1"], masks, base=prep["base"], rmode=rmode,
                          out=out, **_jit_common(method, job, others)):
        return False
    if via_sink:
        _sink_whole(out, n, sink)
    return True


def _ties_cached(method: TaskVectorMethod, job: TensorJob, inputs: Inputs, others: list[int], sink: Sink,
                 ws: Workspace, dest: torch.Tensor | None) -> bool:
    """TIES (no rescale) from the trial merger's cached task vectors and magnitude orders: each
    row's threshold and tie cutoff are two lookups (`CachedInputs.top_k_rule`'s), then one
    compiled pass (`_jit.cut_pass`). False (nothing done) where it does not apply."""
    if _rescale_mode(job.params) != "none":
        return False
    prep = _prep(inputs, others)
    if prep is None or prep["order"] is None:
        return False
    n = inputs.n
    thr, cut = [], []
    for r, i in enumerate(others):
        density = float(job.model_params[i]["density"])
        k = max(1, int(density * n))
        if density >= 1 or k >= n:
            return False
        c = int(prep["order"][r][k - 1])
        thr.append(abs(prep["xs"][r][c]))
        cut.append(c)
    out, rmode, via_sink = _whole_out(job, n, ws, dest)
    if inputs.src16 is not None:  # the same values from the 16-bit sources (a third of the bytes)
        b16, m16 = inputs.src16[0], inputs.src16[1:]
        _jit.cut16_pass(tuple(m16[i] for i in others), b16, thr, cut, rmode=rmode, out=out,
                        **_jit_common(method, job, others))
    else:
        _jit.cut_pass(prep["xs"], thr, cut, base=prep["base"], rmode=rmode, out=out,
                      **_jit_common(method, job, others))
    if via_sink:
        _sink_whole(out, n, sink)
    return True


def _draws_cached(inputs: Inputs) -> bool:
    return isinstance(inputs, CachedInputs) and inputs._uniforms is not None


def _jit_ready(inputs: Inputs, rows: list[_Row]) -> bool:
    """The compiled element pass applies: numba is installed, every task vector is a cached
    float32 CPU tensor, and each row is kept whole, by a threshold cutoff or by a full mask."""
    if not (_jit.AVAILABLE and isinstance(inputs, CachedInputs) and rows and inputs._deltas is not None):
        return False
    for row in rows:
        d = inputs._deltas[row.i]
        if d is None or d.dtype != _F32 or d.device.type != "cpu" or not d.is_contiguous():
            return False
        if row.rule is not None and not isinstance(row.rule, CutRule):
            return False
    b = inputs._base
    return b is not None and b.dtype == _F32 and b.device.type == "cpu" and b.is_contiguous()


_JIT_SPAN = 16 * CHUNK  # elements per compiled call: amortizes the call, keeps the buffer small


def _jit_common(method: TaskVectorMethod, job: TensorJob, rows: list[int]) -> dict:
    """The compiled passes' arguments that do not depend on the sparsification."""
    lin_div = None
    if not method.consensus:
        lin_div = plain_divisor(task_weights(job.model_params, rows, torch.empty(len(rows), 1)))
    return dict(weights=[float(job.model_params[i]["weight"]) for i in rows], consensus=method.consensus,
                normalize=bool(job.params["normalize"]), lin_div=lin_div, lam=float(job.params["lambda"]))


def _jit_merge(method: TaskVectorMethod, job: TensorJob, inputs: "CachedInputs", rows: list[_Row],
               sink: Sink, ws: Workspace, dest: torch.Tensor | None = None) -> None:
    n = inputs.n
    common = _jit_common(method, job, [row.i for row in rows])
    deltas = [inputs._deltas[row.i] for row in rows]
    fast = None  # the uniform cases: every row masked, or every row cut by a threshold
    if all(row.div is None and row.rule is None and row.mask is not None for row in rows):
        fast = dict(masks=[row.mask for row in rows], thr=None, cut=None,
                    fac=[1.0 if row.factor is None else float(row.factor) for row in rows])
    elif all(row.div is None and row.factor is None and isinstance(row.rule, CutRule) for row in rows):
        fast = dict(masks=None, thr=[float(row.rule.threshold) for row in rows],
                    cut=[row.rule.cutoff for row in rows], fac=[1.0] * len(rows))
    if fast is not None:
        common["base"] = inputs._base
        rmode = _jit.round_mode(job.out_dtype)
        if dest is not None and rmode is not None:  # straight into the model's parameter
            _jit.uniform_pass(deltas, **fast, **common, s=0, e=n, rmode=rmode, out=dest.view(-1))
            return
        buf = ws.get("jit_out", min(n, _JIT_SPAN))
        for s0 in range(0, n, _JIT_SPAN):
            e0 = min(n, s0 + _JIT_SPAN)
            _jit.uniform_pass(deltas, **fast, **common, s=s0, e=e0, rmode=_jit.ROUND_NONE, out=buf[: e0 - s0])
            for s in range(s0, e0, CHUNK):
                e = min(e0, s + CHUNK)
                sink(s, e, buf[s - s0: e - s0])
        return
    mode, thr, cut = [], [], []
    for row in rows:
        if isinstance(row.rule, CutRule):
            mode.append(_jit.MODE_CUT)
            thr.append(float(row.rule.threshold))
            cut.append(row.rule.cutoff)
        else:
            mode.append(_jit.MODE_MASK if row.mask is not None else _jit.MODE_ALL)
            thr.append(0.0)
            cut.append(0)
    buf = ws.get("jit_out", min(n, _JIT_SPAN))
    for s0 in range(0, n, _JIT_SPAN):
        e0 = min(n, s0 + _JIT_SPAN)
        _jit.task_vector_pass(
            deltas, [row.mask if row.rule is None else None for row in rows],
            mode, thr, cut, [row.div for row in rows], [row.factor for row in rows], common["weights"],
            method.consensus, common["normalize"], common["lin_div"], common["lam"],
            inputs._base, s0, e0, buf[: e0 - s0])
        for s in range(s0, e0, CHUNK):
            e = min(e0, s + CHUNK)
            sink(s, e, buf[s - s0: e - s0])


_DIVISORS: dict[tuple[float, ...], float] = {}


def linear_into(job: TensorJob, models: list[torch.Tensor], dest: torch.Tensor) -> bool:
    """A linear merge of flat CPU tensors (all float32, or all float16 / bfloat16 as read from the
    checkpoints: widened exactly in the compiled loop) written straight into `dest` (a float32 model
    parameter) by the compiled loop, rounded through the job's output dtype: the values of the
    chunked kernel and `dest.copy_(result.to(out_dtype))`, bit for bit. False (nothing done)
    when the compiled loop does not apply: no numba, an output dtype or layout it does not
    handle, or a torch whose addcmul_ rounding it cannot reproduce on this CPU."""
    rmode = _jit.round_mode(job.out_dtype)
    if not _jit.AVAILABLE or rmode is None or dest.dtype != _F32 or dest.device.type != "cpu" \
            or not dest.is_contiguous() or _jit.addcmul_fuses() is None:
        return False
    n = dest.numel()
    for m in models:
        if m.dtype != models[0].dtype or m.dtype not in (_F32, torch.float16, torch.bfloat16) \
                or m.device.type != "cpu" or not m.is_contiguous() or m.numel() != n:
            return False
    raise_if_invalid("linear", job.name, job.model_params, job.params, None)
    w = tuple(float(mp["weight"]) for mp in job.model_params)
    div = _DIVISORS.get(w)
    if div is None:  # the float32 Σwᵢ that weighted_sum_ divides by, from the same torch sum
        if len(_DIVISORS) > 4096:  # a long search: keep the memo small
            _DIVISORS.clear()
        div = _DIVISORS[w] = float(linear_weights(job.model_params).sum(dim=0))
    _jit.linear_pass(models, np.asarray(w, np.float32), bool(job.params["normalize"]), div, rmode, dest.view(-1))
    return True


@dataclass
class Dare16Sources:
    """What `dare16_into` reads for one tensor, held by the trial merger for a whole search: the
    16-bit sources as stored (`_jit.bits16` views, all of one format) of the base and of each
    task-vector row, the rows' draws as `_jit.DrawKeys`, and each row's ‖τ‖₁ (a float32 value)."""

    base: np.ndarray
    models: tuple  # per row: the models other than the base, in order
    keys: list  # per row: its `_jit.DrawKeys`
    l1: list  # per row


def dare16_applies(plan: MergePlan, job: TensorJob) -> bool:
    """Whether this candidate's DARE tensor is one `dare16_into` can merge, as far as its
    parameters tell (L1 rescale, every task vector's density below 1): checked before the trial
    merger builds its sources."""
    bi = plan.recipe.base_index
    return not job.copy and _rescale_mode(job.params) == "l1" and all(
        float(mp["density"]) < 1 for i, mp in enumerate(job.model_params) if i != bi)


def dare16_into(plan: MergePlan, job: TensorJob, src: Dare16Sources, dest: torch.Tensor, ws: Workspace) -> bool:
    """DARE with L1 rescale from 16-bit sources, written straight into `dest` (a float32 model
    parameter) rounded through the output dtype by `_jit.dare16_pass`: the chunked kernels' values
    and `dest.copy_(result.to(out_dtype))`, bit for bit. False (nothing done) where it does not
    apply (another rescale, a density of 1, an output dtype or layout the pass does not handle)."""
    if job.copy or not _jit.AVAILABLE:
        return False
    op = get_operator(plan.recipe.merge_method)
    method = _TASK.get(op.name)
    if method is None or method.sparsification != "bernoulli":
        return False
    base_index = plan.recipe.base_index
    raise_if_invalid(op.name, job.name, job.model_params, job.params, base_index)
    others = [i for i in range(len(job.models)) if i != base_index]
    n = math.prod(job.shape)
    rmode = _jit.round_mode(job.out_dtype)
    if _rescale_mode(job.params) != "l1" or not others or len(others) != len(src.models) or rmode is None \
            or dest.dtype != _F32 or dest.device.type != "cpu" or not dest.is_contiguous() or dest.numel() != n \
            or n == 0:
        return False
    densities = [float(job.model_params[i]["density"]) for i in others]
    if any(d >= 1 for d in densities):
        return False
    return _jit.dare16_pass(src.models, src.base, src.keys, densities, src.l1, rmode=rmode,
                            out=dest.view(-1).numpy(), **_jit_common(method, job, others))


def full_output(job: TensorJob, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Sink]:
    """A tensor of the job's shape and output dtype and the sink that fills it."""
    if out is None:
        out = torch.empty(job.shape, dtype=job.out_dtype)
    flat = out.view(-1)

    def sink(s: int, e: int, chunk: torch.Tensor) -> None:
        flat[s:e].copy_(chunk)

    return out, sink


class CachedInputs(Inputs):
    """The trial merger's in-memory inputs: flat float32 tensors cached once per source (models,
    base, task vectors) and each task vector's stable descending magnitude order (int32 flat
    indices), so a TIES threshold and its tie cutoff are two lookups."""

    def __init__(self, n: int, base: torch.Tensor | None, models: list[torch.Tensor | None],
                 deltas: list[torch.Tensor | None] | None = None,
                 order: list[torch.Tensor | None] | None = None,
                 uniforms: list[torch.Tensor | None] | None = None,
                 l1: list[torch.Tensor | None] | None = None):
        self.n = n
        self._base = base
        self._models = models
        self._deltas = deltas
        self._order = order
        self._uniforms = uniforms
        self._l1 = l1
        self.prep: dict = {}  # the compiled passes' numpy views, per row list (see `_prep`)
        # the trial merger's 16-bit sources as stored (`_jit.bits16` views: base, then each model),
        # when every one is float16 or every one bfloat16: the TIES pass reads those instead
        self.src16: tuple | None = None

    def l1_norm(self, i: int) -> torch.Tensor | None:
        """‖τᵢ‖₁ as `_l1_factor` computes it (the fixed-order sum of |τᵢ|); given with the draws."""
        return self._l1[i] if self._l1 is not None else None

    def uniform(self, i: int) -> torch.Tensor | None:
        """Model i's DARE draws for this tensor (the generator's numbers in row order), if cached."""
        return self._uniforms[i] if self._uniforms is not None else None

    def model(self, i, s, e):
        return self._models[i][s:e]

    def base(self, s, e):
        return self._base[s:e]

    def delta_view(self, i, s, e):
        if self._deltas is not None and self._deltas[i] is not None:
            return self._deltas[i][s:e]
        return None

    def delta_into(self, i, s, e, out):
        if self._deltas is not None and self._deltas[i] is not None:
            return out.copy_(self._deltas[i][s:e])
        return super().delta_into(i, s, e, out)

    def delta_full(self, i, ws):
        if self._deltas is not None and self._deltas[i] is not None:
            return self._deltas[i]
        return super().delta_full(i, ws)

    def abs_delta(self, i, ws):
        if self._deltas is not None and self._deltas[i] is not None:
            return torch.abs(self._deltas[i], out=ws.get("abs_full", self.n))
        return super().abs_delta(i, ws)

    def top_k_rule(self, i, k, ws):
        if self._order is not None and self._order[i] is not None and self._deltas[i] is not None:
            c = int(self._order[i][k - 1])
            return CutRule(self._deltas[i][c].abs(), c)
        return super().top_k_rule(i, k, ws)


def magnitude_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices of |delta| in stable descending order (int32 where they fit): what
    `CachedInputs` needs for TIES thresholds."""
    order = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices
    return order.to(torch.int32) if delta.numel() < 2**31 else order


def into_tensor(dest: torch.Tensor, out_dtype: torch.dtype, ws: Workspace) -> Sink:
    """A sink writing into an existing contiguous tensor (a model parameter), rounding through
    the output dtype first, exactly like `dest.copy_(result.to(out_dtype))`."""
    flat = dest.view(-1)

    def sink(s: int, e: int, chunk: torch.Tensor) -> None:
        if out_dtype == dest.dtype:
            flat[s:e].copy_(chunk)
        else:
            tmp = ws.get(("round", out_dtype), CHUNK, out_dtype)[: e - s]
            flat[s:e].copy_(tmp.copy_(chunk))

    return sink
