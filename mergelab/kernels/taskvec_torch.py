"""The torch row path of the chunked merge: how each task vector is sparsified, decided once per
tensor before the slice loop (`prepare_row`: a top-k rule, a full mask from the draws, an L1
rescale factor, a division by the density, or a stream position to redraw the mask from slice by
slice), and `Row.apply_`, which applies it to a slice with the operations of
`sparsify.apply_mask_` in its order. The compiled loops (`jit_taskvec`, `jit_dare`) reproduce
exactly these operations; `kernels.chunked` runs the slice loop."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from operators import sparsify as _sp
from operators.draws import CounterStream, exact_l1, factor_from_sums, fixed_scale, rescale_factor
from operators.task_vectors import TaskVectorMethod

from ..plan import TensorJob
from . import counter_jit, jit_core, jit_dare, mt19937
from . import inputs as inp


@dataclass
class Row:
    """How one task vector is sparsified, decided before the element pass: a threshold rule
    (TIES, applied slice by slice), or a full mask (DARE, or TIES with L1 rescale), then an
    optional division (inverse density) and factor (L1 rescale)."""

    i: int
    rule: _sp.TopKRule | inp.CutRule | None = None
    mask: torch.Tensor | None = None
    div: float | None = None
    factor: torch.Tensor | None = None
    stream: "mt19937.MTStream | None" = None  # DARE from disk: the row's draws, for its mask slice by slice
    density: float = 1.0

    def apply_(self, src: torch.Tensor, d: torch.Tensor, s: int, e: int, ws: inp.Workspace) -> None:
        """d = sparsified src (src may be d itself); the operations of sparsify.apply_mask_, in
        its order (the 0/1 product reads src and writes d: the same values as copy, then mul_)."""
        if self.rule is not None:
            a = torch.abs(src, out=ws.get("abs", e - s))
            # a float 0/1 mask: comparisons into bool and products with bool are 5x slower on
            # the CPU than with float32, and the product's values are the same
            keep = ws.get("keep", e - s)
            if isinstance(self.rule, inp.CutRule):
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


def rescale_mode(params: dict) -> str:
    """How a task-vector merge rescales its sparsified rows: "l1", "inverse_density" or "none"."""
    if params["rescale"]:
        return "inverse_density" if params.get("rescale_inverse_density", False) else "l1"
    return "none"


def l1_factor(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """sparsify.apply_mask_'s L1 rescale factor, from |τ| (overwritten) and the mask."""
    before = _sp.l1_norm_of_abs(a)
    a.mul_(mask.view(torch.uint8))  # |τ|·m equals |τ·m| entry for entry (m is 0 or 1)
    return l1_ratio(before, _sp.l1_norm_of_abs(a))


def l1_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """‖τ‖₁ / ‖τ·m‖₁, or None (no rescale) when either norm is below sparsify's epsilon."""
    eps = _EPS32  # the tensors compare with the threshold rounded to float32, as here
    if float(before) < eps or float(after) < eps:
        return None
    return before / after


_EPS32 = float(np.float32(_sp._RESCALE_EPS))


def prepare_row(method: TaskVectorMethod, job: TensorJob, i: int, slot: int, inputs: inp.Inputs,
                ws: inp.Workspace, gen: torch.Generator | None) -> Row:
    row = Row(i)
    n = inputs.n
    density = float(job.model_params[i]["density"])
    rescale = rescale_mode(job.params)
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
                if isinstance(row.rule, inp.CutRule):
                    row.mask = row.rule.mask(a, 0, n, out)
                else:
                    row.mask = row.rule.mask_chunk(a, out=out)
                row.rule = None
    elif isinstance(gen, CounterStream):  # the counter stream: any slice alone, exact L1 sums
        gen.position = slot * n  # rows take consecutive stretches, in row order
        if counter_jit.available() and rescale == "l1" and type(inputs) is inp.DiskInputs:
            # from disk nothing whole: the largest |τ| (its grid), then τ slice by slice into both
            # grid sums, and the mask redrawn slice by slice during the merge
            tau = ws.get("tau", inp.CHUNK)
            keep = ws.get("keep_mask", inp.CHUNK, torch.bool)
            amax = torch.zeros((), dtype=torch.float32)
            for s in range(0, n, inp.CHUNK):
                e = min(n, s + inp.CHUNK)
                torch.maximum(amax, inputs.delta_into(i, s, e, tau[: e - s]).abs_().amax(), out=amax)
            scale = fixed_scale(amax, n)
            total = after = 0
            for s in range(0, n, inp.CHUNK):
                e = min(n, s + inp.CHUNK)
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
                if isinstance(inputs, inp.DiskInputs):
                    inputs._abs_of = None
                return row
    else:  # bernoulli, mergekit's stream: the draws of its CPU generator, slice by slice
        if isinstance(gen, mt19937.MTStream) and rescale == "l1" and isinstance(inputs, inp.DiskInputs) \
                and jit_dare.sum_lanes() is not None and n <= jit_dare.L1_MAX:
            # nothing whole: τ and the mask slice by slice into the two norms, and the row's
            # draws kept as a stream position, to redraw its mask slice by slice in the merge
            row.stream, row.density = gen.copy(), density
            norms = jit_dare.L1Stream(n)
            tau = ws.get("tau", inp.CHUNK)
            keep = ws.get("keep_mask", inp.CHUNK, torch.bool)
            for s in range(0, n, inp.CHUNK):
                e = min(n, s + inp.CHUNK)
                got = norms.feed(inputs.delta_into(i, s, e, tau[: e - s]), gen.mask_into(density, keep[: e - s]), s)
            row.factor = l1_ratio(got.before, got.after)
            return row
        mask = ws.get(("mask", slot), n, torch.bool)
        drawn = inputs.uniform(i) if isinstance(inputs, inp.CachedInputs) else None
        if drawn is not None and rescale == "l1" and jit_core.AVAILABLE:
            # cached draws and ‖τ‖₁: the mask and ‖τ·mask‖₁ in one compiled pass that sums in
            # torch's order (nothing else written); else mask and |τ|·mask, then torch's sum
            after = jit_dare.dare_mask_l1(drawn, inputs._deltas[i], density, mask)
            if after is not None:
                row.mask = mask
                row.factor = l1_ratio(inputs.l1_norm(i), after)
                return row
            a = ws.get("abs_full", n)
            jit_dare.dare_prepass(drawn, inputs._deltas[i], density, mask, a)
            row.mask = mask
            row.factor = l1_ratio(inputs.l1_norm(i), _sp.l1_norm_of_abs(a))
            return row
        if drawn is not None:  # the same numbers, drawn once for the whole search
            torch.lt(drawn, density, out=mask)
        elif isinstance(gen, mt19937.MTStream):  # the generator's numbers, by the compiled loop
            gen.mask_into(density, mask)
            if rescale == "l1":
                # both L1 norms in one compiled pass over τ in torch's summation order (None
                # where that order cannot be reproduced: then torch's sums below)
                norms = jit_dare.l1_pair(inputs.delta_full(i, ws), mask)
                if norms is not None:
                    row.mask = mask
                    row.factor = l1_ratio(norms.before, norms.after)
                    return row
        else:
            r = ws.get("rand", inp.CHUNK)
            for s in range(0, n, inp.CHUNK):
                e = min(n, s + inp.CHUNK)
                torch.lt(r[: e - s].uniform_(generator=gen), density, out=mask[s:e])
        row.mask = mask
    if rescale == "inverse_density":
        row.div = density
    elif rescale == "l1":
        a = inputs.abs_delta(i, ws)
        row.factor = l1_factor(a, row.mask)
        if isinstance(inputs, inp.DiskInputs):
            inputs._abs_of = None  # the buffer now holds |τ|·m
    return row
