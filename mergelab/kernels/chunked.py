"""The chunked merge of one tensor (the disk engine's kernel, and the trial merger's where its
whole-tensor passes do not apply): the tensor is merged in cache-sized slices with reused buffers,
giving bit for bit what the operators compute (see `kernels.inputs` for why). Linear is a
weighted sum per slice; a task-vector merge prepares each row's sparsification
(`taskvec_torch.prepare_row`), then runs the first that applies of: the trial merger's compiled
whole-tensor passes (`kernels.cached`), the compiled masked or cut loop per slice (from disk),
and the torch kernels per slice (`Row.apply_` then `combine_`)."""
from __future__ import annotations

import torch

from operators import get_operator, tensor_seed
from operators.checks import raise_if_invalid
from operators.draws import CounterStream
from operators.linear import linear_weights, weighted_sum_
from operators.sparsify import one_thread
from operators.task_vectors import combine_, task_weights

from ..plan import MergePlan, TensorJob
from . import cached, jit_core, jit_taskvec, mt19937, taskvec_torch
from . import inputs as inp


def supported(plan: MergePlan, job: TensorJob, compute_dtype: torch.dtype = torch.float32,
              sources: dict | None = None, fitted: bool = False) -> bool:
    """Whether the chunked kernels merge this job (else the engine calls the operator on whole
    tensors): linear and the task-vector methods without DELLA/breadcrumbs ranking, float32
    compute, no vocabulary cut or pad (a vocabulary tensor whose sources all have the output's
    shape needs none, and `fitted` inputs were cut or padded already)."""
    if job.copy or compute_dtype != torch.float32:
        return False
    if job.rows is not None and not fitted:  # fitted: the inputs have the job's rows already
        reads = ([job.base] if job.base is not None else []) + list(job.models)
        if sources is None or any(tuple(sources[r.ref].tensors[r.tensor].shape) != tuple(job.shape)
                                  for r in reads):
            return False
    op = get_operator(plan.recipe.merge_method)
    if op.weighted_sum:
        return True
    m = op.task_vector
    if m is None or m.sparsification not in ("none", "magnitude", "bernoulli"):
        return False
    if job.base is None and plan.recipe.base_index is None:
        return False
    return any(i != plan.recipe.base_index for i in range(len(job.models)))


# A slice is too small for OpenMP's fork/join to pay: with 2 threads on a busy 2-core machine a
# 64K-element copy took 20x longer (threads spin waiting for a descheduled peer). Results do not
# depend on the thread count: the only whole-tensor sums (the L1 rescale) are fixed-order.
single_thread = one_thread


def merge_job(plan: MergePlan, job: TensorJob, inputs: inp.Inputs, sink: inp.Sink, ws: inp.Workspace,
              dest: torch.Tensor | None = None) -> None:
    """Merge one tensor slice by slice, handing each float32 slice of the result to `sink`.
    With `dest` (the float32 tensor `sink` fills) the compiled loops may write the result, rounded
    through the output dtype, straight into it instead."""
    with single_thread():
        _merge_job(plan, job, inputs, sink, ws, dest)


def _merge_job(plan: MergePlan, job: TensorJob, inputs: inp.Inputs, sink: inp.Sink, ws: inp.Workspace,
               dest: torch.Tensor | None = None) -> None:
    op = get_operator(plan.recipe.merge_method)
    base_index = plan.recipe.base_index
    raise_if_invalid(op.name, job.name, job.model_params, job.params, base_index)
    n = inputs.n
    if op.weighted_sum:
        weights = linear_weights(job.model_params)
        normalize = job.params["normalize"]
        acc = ws.get("acc", inp.CHUNK)
        for s in range(0, n, inp.CHUNK):
            e = min(n, s + inp.CHUNK)
            vals = [inputs.model(i, s, e) for i in range(len(job.models))]
            sink(s, e, weighted_sum_(acc[: e - s], vals, weights, normalize))
        return

    method = op.task_vector
    others = [i for i in range(len(job.models)) if i != base_index]
    if isinstance(inputs, inp.CachedInputs) and jit_core.AVAILABLE:  # whole-tensor compiled passes
        fast = {"bernoulli": cached.dare_cached, "magnitude": cached.ties_cached}.get(method.sparsification)
        if fast is not None and fast(method, job, inputs, others, sink, ws, dest):
            return
    gen = None
    if method.sparsification == "bernoulli" and plan.recipe.rng != "mergekit":
        gen = CounterStream(tensor_seed(plan.seed, job.name))
    elif method.sparsification == "bernoulli":
        seed = tensor_seed(plan.seed, job.name)
        gen = mt19937.mt_stream(seed) if not cached.draws_cached(inputs) else None
        if gen is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
    rows = [taskvec_torch.prepare_row(method, job, i, r, inputs, ws, gen) for r, i in enumerate(others)]
    if cached.jit_ready(inputs, rows):
        cached.jit_merge(method, job, inputs, rows, sink, ws, dest)
        return
    stack = ws.get("stack", len(others) * inp.CHUNK)
    out = ws.get("out", inp.CHUNK)
    if jit_core.AVAILABLE and rows and all((r.mask is not None or r.stream is not None) and r.rule is None
                                           and r.div is None for r in rows):
        # DARE from disk (and TIES with L1 rescale): each slice through the compiled masked loop,
        # a streamed row's mask slice redrawn from its stream position
        common = cached.compiled_args(method, job, [r.i for r in rows])
        fac = [1.0 if r.factor is None else float(r.factor) for r in rows]
        for s in range(0, n, inp.CHUNK):
            e = min(n, s + inp.CHUNK)
            d = stack[: len(rows) * (e - s)].view(len(rows), e - s)
            deltas = [inputs.delta_into(row.i, s, e, d[r]) for r, row in enumerate(rows)]
            masks = [r.mask[s:e] if r.stream is None
                     else r.stream.mask_into(r.density, ws.get(("redraw", k), inp.CHUNK, torch.bool)[: e - s])
                     for k, r in enumerate(rows)]
            jit_taskvec.uniform_pass(deltas, masks, None, None, fac, base=inputs.base(s, e),
                                     s=0, e=e - s, rmode=jit_core.ROUND_NONE, out=out[: e - s], **common)
            sink(s, e, out[: e - s])
        return
    if jit_core.AVAILABLE and rows and all(isinstance(r.rule, inp.CutRule) and r.div is None and r.factor is None
                                           for r in rows):
        # TIES from disk: each slice's task vectors go through the compiled element loop
        thr = [float(r.rule.threshold) for r in rows]
        cut = [r.rule.cutoff for r in rows]
        common = cached.compiled_args(method, job, [r.i for r in rows])
        for s in range(0, n, inp.CHUNK):
            e = min(n, s + inp.CHUNK)
            d = stack[: len(rows) * (e - s)].view(len(rows), e - s)
            deltas = [inputs.delta_into(row.i, s, e, d[r]) for r, row in enumerate(rows)]
            jit_taskvec.uniform_pass(deltas, None, thr, [c - s for c in cut], [1.0] * len(rows), base=inputs.base(s, e),
                                     s=0, e=e - s, rmode=jit_core.ROUND_NONE, out=out[: e - s], **common)
            sink(s, e, out[: e - s])
        return
    weights = task_weights(job.model_params, others, stack.view(len(others), -1))

    def work(key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return ws.get(("combine", key), numel, dtype)

    for s in range(0, n, inp.CHUNK):
        e = min(n, s + inp.CHUNK)
        d = stack[: len(others) * (e - s)].view(len(others), e - s)
        for r, row in enumerate(rows):
            src = inputs.delta_view(row.i, s, e)
            if src is None:
                src = inputs.delta_into(row.i, s, e, d[r])
            row.apply_(src, d[r], s, e, ws)
        sink(s, e, combine_(method, d, weights, inputs.base(s, e), job.params, out=out[: e - s], work=work))
