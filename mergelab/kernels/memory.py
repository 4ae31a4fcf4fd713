"""The trial merger's kernels: each merges one tensor of a candidate from the merger's cache
(`KernelCall.source` is the `TrialMerger`), into `KernelCall.dest` (the model's parameter) where
they can. Results equal the disk engine's bit for bit."""
from __future__ import annotations

import torch

from . import cached
from . import chunked as _chunked
from . import inputs as inp
from .select import KernelCall


def copy(call: KernelCall) -> torch.Tensor:
    """A tensor taken over unchanged from the reference model."""
    tm, job = call.source, call.job
    r = job.base if job.base is not None else job.models[0]
    return tm.stored(job, r).clone().view(job.shape).to(job.out_dtype)


def _dest(call: KernelCall) -> torch.Tensor | None:
    d = call.dest
    if d is not None and d.is_contiguous() and tuple(d.shape) == tuple(call.job.shape):
        return d
    return None


def linear16(call: KernelCall) -> bool | None:
    """The compiled weighted sum of the sources as stored (16-bit widened exactly in the loop),
    rounded through the output dtype straight into the parameter."""
    tm, job, dest = call.source, call.job, _dest(call)
    if dest is None:
        return None
    return True if cached.linear_into(job, [tm.stored(job, r).view(-1) for r in job.models], dest) else None


def dare16(call: KernelCall) -> bool | None:
    """mergekit's DARE stream from the 16-bit sources, draws kept as 1-byte keys per seed."""
    tm, job, dest = call.source, call.job, _dest(call)
    if dest is None:
        return None
    src = tm.dare16_sources(job, call.plan)
    if src is None or not cached.dare16_into(call.plan, job, src, dest, tm.workspace):
        return None
    return True


def chunked(call: KernelCall) -> torch.Tensor | bool | None:
    """The chunked/compiled kernels (`chunked.merge_job`) over the cache: float32 task vectors and
    magnitude orders where the merger keeps them (its fast tier), else the sources as stored."""
    tm, job, plan = call.source, call.job, call.plan
    if not _chunked.supported(plan, job, call.compute_dtype, fitted=True):
        return None
    inputs = tm.fast_inputs(job, plan) if tm.tier(job) == "fast" else \
        inp.StoredInputs(job, tm.stored_map(job), plan.recipe.base_index, tm.workspace)
    dest = _dest(call)
    if dest is not None:
        _chunked.merge_job(plan, job, inputs, inp.into_tensor(dest, job.out_dtype, tm.workspace), tm.workspace,
                           dest if dest.dtype == torch.float32 else None)
        return True
    full = inp.full_output(job)
    _chunked.merge_job(plan, job, inputs, full.sink, tm.workspace)
    return full.out


def reference(call: KernelCall) -> torch.Tensor:
    """The operator's reference function on the device, from the sources as stored: task vectors
    and top-k thresholds are derived per candidate (selection, no stored sort orders)."""
    from ..engine import run_operator

    tm, job = call.source, call.job
    base = tm.stored(job, job.base).to(call.compute_dtype) if job.base is not None else None
    models = [tm.stored(job, r).to(call.compute_dtype) for r in job.models]
    return run_operator(job, call.plan, base, models).to(job.out_dtype)


def tsv(call: KernelCall) -> torch.Tensor | bool | None:
    """TSV-Merge from each tensor's parts (`operators.tsv.merge_parts`: a weight matrix's
    decorrelated task parts, else its task vectors), built from the sources on the first
    candidate and kept by the merger: a candidate is a weighted sum added into the parameter."""
    from operators.tsv import merge_parts, tsv_combine

    tm, job, plan = call.source, call.job, call.plan
    if tm.tier(job) == "disk":
        return None
    bi = plan.recipe.base_index
    base_read = job.base if job.base is not None else job.models[bi]
    rows = [i for i in range(len(job.models)) if i != bi]
    if not rows:
        return None
    key = ("tsv", job.name, (base_read.ref, base_read.tensor),
           tuple((job.models[i].ref, job.models[i].tensor) for i in rows))

    def build():
        base = tm.stored(job, base_read).to(call.compute_dtype).view(job.shape)
        deltas = [tm.stored(job, job.models[i]).to(call.compute_dtype).view(job.shape) - base for i in rows]
        return base, merge_parts(job.name, deltas)

    base, parts = tm.derived(key, build)
    ws = [float(job.model_params[i]["weight"]) for i in rows]
    lam = float(job.params["lambda"])
    dest = _dest(call)
    if dest is not None and dest.dtype == base.dtype == job.out_dtype == torch.float32:
        tsv_combine(base, parts, ws, lam, out=dest)
        return True
    return tsv_combine(base, parts, ws, lam).to(base.dtype).to(job.out_dtype)
