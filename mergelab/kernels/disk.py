"""The streaming engine's kernels: each merges one tensor read from the source files (the
`engine.JobReader` in `KernelCall.source`)."""
from __future__ import annotations

import torch

from . import chunked as _chunked
from . import inputs as inp
from .select import KernelCall


def copy(call: KernelCall) -> torch.Tensor:
    """A tensor taken over unchanged from the reference model."""
    job = call.job
    r = job.base if job.base is not None else job.models[0]
    return call.source.read_all()[(r.ref, r.tensor)].clone()


def chunked(call: KernelCall) -> torch.Tensor | None:
    """linear and the task-vector methods slice by slice through reused buffers (`kernels.chunked`)."""
    reader, job = call.source, call.job
    if not _chunked.supported(call.plan, job, call.compute_dtype, reader.sources):
        return None
    inputs = inp.DiskInputs(job, reader.sources, call.plan.recipe.base_index, reader.ws)
    full = inp.full_output(job, reader.output())
    _chunked.merge_job(call.plan, job, inputs, full.sink, reader.ws)
    return full.out


def reference(call: KernelCall) -> torch.Tensor:
    """The operator's reference function on whole tensors on the compute device. The sources
    travel in their stored dtype (half the bytes of float32 for 16-bit checkpoints) and are
    widened on the device."""
    from ..engine import fit_rows, run_operator

    job, raw = call.job, call.source.read_all()
    ref_read = job.base if job.base is not None else job.models[0]
    ref_raw = raw[(ref_read.ref, ref_read.tensor)]
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(r):
        key = (r.ref, r.tensor)
        if key not in cache:
            t = fit_rows(raw[key], job.rows, ref_raw)
            cache[key] = t.to(device=call.device, non_blocking=True).to(call.compute_dtype)
        return cache[key]

    base = get(job.base) if job.base is not None else None
    models = [get(r) for r in job.models]
    return run_operator(job, call.plan, base, models).to(job.out_dtype)
