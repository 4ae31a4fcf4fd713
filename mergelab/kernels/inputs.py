"""The inputs of one tensor's chunked merge, read slice by slice: `Workspace` (reused scratch
buffers), `Inputs` and its kinds (`DiskInputs` reading the safetensors files, `StoredInputs` the
trial merger's compact cache as stored, `CachedInputs` its float32 task vectors, magnitude orders
and draws), the top-k rule as threshold and cutoff (`CutRule`), and the sinks a merged slice goes
to. The merges themselves are in `kernels.chunked` (the slice loop), `kernels.taskvec_torch` (each
row's sparsification) and `kernels.cached` (the trial merger's whole-tensor compiled passes).

Why slice by slice is exact: every step after the per-tensor statistics is element by element
(the sums in `combine_` run over the stacked models, not over elements), so computing it slice by
slice changes no value. The statistics that need the whole tensor (the top-k threshold, DARE's L1
norms, fixed-order sums that no thread count changes) are computed on a full-tensor buffer with
the very calls the operators use (or compiled loops that sum in their order, `jit_dare`), and
random numbers are drawn in flat order from the same generator (float32 `uniform_` consumes the
generator element by element, so slices draw the same numbers as one full-tensor draw; with
numba, `mt19937.MTStream` draws that stream itself, and a copy of it at a row's start redraws the
row's mask slice by slice).
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import numpy as np
import torch

from operators import sparsify as _sp

from ..plan import Read, TensorJob
from . import jit_core, jit_linear, jit_topk


# Elements per slice: a multiple of 64 (so slice boundaries never split a SIMD vector) small
# enough that a slice of every operand stays in the L2 cache.
CHUNK = max(64, int(os.environ.get("MERGELAB_CHUNK", 1 << 16)) // 64 * 64)


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
        if jit_core.AVAILABLE:  # the same threshold by a compiled radix selection, and its cutoff
            got = jit_topk.top_k_cut(a, k)
            return CutRule(got.threshold, got.cutoff)
        return _sp.top_k_rule(a, k)


class Slot(NamedTuple):
    """One source tensor of a job as `DiskInputs` / `StoredInputs` read it: where it is (a
    `sources.ModelSource`, or the trial merger's flat tensor as stored), its name, its stored dtype."""

    source: object
    name: str
    dtype: torch.dtype


class Sources16(NamedTuple):
    """The trial merger's 16-bit sources of one tensor as stored (`jit_core.bits16` views, all of
    one format): the base, then every model in the recipe's order."""

    base: np.ndarray
    models: tuple


class DiskInputs(Inputs):
    """Reads slices straight from the safetensors files into reused buffers (pread): nothing
    is mapped, so the page cache holds the files and this process holds only the buffers."""

    def __init__(self, job: TensorJob, sources: dict, base_index: int | None, ws: Workspace):
        def from_file(r: Read) -> Slot:
            src = sources[r.ref]
            return Slot(src, r.tensor, src.tensors[r.tensor].dtype)

        self._setup(job, base_index, ws, from_file)

    def _setup(self, job: TensorJob, base_index: int | None, ws: Workspace, make_slot) -> None:
        """One slot per distinct (model, tensor) the job reads, made by make_slot(read); the
        model rows and the base point at them."""
        self.n = math.prod(job.shape)
        self.ws = ws
        self._slots: list[Slot] = []
        index: dict[tuple[str, str], int] = {}

        def slot(r: Read) -> int:
            key = (r.ref, r.tensor)
            if key not in index:
                index[key] = len(self._slots)
                self._slots.append(make_slot(r))
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
        dtypes = {s.dtype for s in self._slots}
        self._sub16 = (jit_core.AVAILABLE and self._base is not None and len(dtypes) == 1
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
            return jit_linear.sub16(self._raw(self._model[i], s, e), self._raw(self._base, s, e), out)
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
        def held(r: Read) -> Slot:
            t = stored[(r.ref, r.tensor)]
            return Slot(t, r.tensor, t.dtype)

        self._setup(job, base_index, ws, held)

    def _raw(self, slot: int, s: int, e: int) -> torch.Tensor:
        return self._slots[slot].source[s:e]

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
        self.prep: dict = {}  # the compiled passes' numpy views, per row list (see `cached.prepared`)
        # the trial merger's 16-bit sources as stored (`Sources16`),
        # when every one is float16 or every one bfloat16: the TIES pass reads those instead
        self.src16: Sources16 | None = None

    def l1_norm(self, i: int) -> torch.Tensor | None:
        """‖τᵢ‖₁ as `taskvec_torch.l1_factor` computes it (the fixed-order sum of |τᵢ|); given with the
        draws."""
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


class FullOutput(NamedTuple):
    """A tensor of a job's shape and output dtype, and the sink that fills it."""

    out: torch.Tensor
    sink: Sink


def full_output(job: TensorJob, out: torch.Tensor | None = None) -> FullOutput:
    """A tensor of the job's shape and output dtype and the sink that fills it."""
    if out is None:
        out = torch.empty(job.shape, dtype=job.out_dtype)
    flat = out.view(-1)

    def sink(s: int, e: int, chunk: torch.Tensor) -> None:
        flat[s:e].copy_(chunk)

    return FullOutput(out, sink)


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
