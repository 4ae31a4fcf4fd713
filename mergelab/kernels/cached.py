"""The trial merger's whole-tensor compiled passes over its cache (`inputs.CachedInputs` and its
16-bit sources): DARE from cached draws (`dare_cached`), TIES from cached magnitude orders
(`ties_cached`), any mix of rows in spans (`jit_merge`), linear straight into the model's
parameter (`linear_into`) and DARE from 16-bit sources with 1-byte draw keys (`dare16_into`).
Each writes the chunked kernels' values bit for bit, rounded through the output dtype, and says
False (nothing done) where it does not apply, so the slice loop (`kernels.chunked`) runs instead."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from operators import get_operator
from operators.checks import raise_if_invalid
from operators.linear import linear_weights
from operators.task_vectors import TaskVectorMethod, plain_divisor, task_weights

from ..plan import MergePlan, TensorJob
from . import jit_core, jit_dare, jit_dare16, jit_linear, jit_taskvec
from . import inputs as inp
from .taskvec_torch import rescale_mode

if TYPE_CHECKING:
    from .taskvec_torch import Row


@dataclass
class Prepared:
    """The numpy views the compiled whole-tensor passes take for one list of rows: the task
    vectors and the base, the rows' draws and ‖τ‖₁ (float32) where cached, and their magnitude
    orders where cached."""

    xs: tuple
    base: np.ndarray
    us: tuple | None = None
    l1: tuple | None = None
    order: tuple | None = None


class WholeOut(NamedTuple):
    """Where a whole-tensor compiled pass writes, the rounding it applies there, and whether the
    buffer goes to the sink afterwards."""

    out: np.ndarray
    rmode: int
    via_sink: bool


def prepared(inputs: inp.Inputs, others: list[int]) -> Prepared | None:
    """The numpy views the compiled whole-tensor passes take, built once per `inputs.CachedInputs` (the
    trial merger keeps those for the whole search): None unless the task vectors and the base are
    flat contiguous float32 CPU tensors."""
    if not (jit_core.AVAILABLE and isinstance(inputs, inp.CachedInputs) and inputs._deltas is not None and others):
        return None
    key = tuple(others)
    got = inputs.prep.get(key, False)
    if got is not False:
        return got
    n = inputs.n
    deltas = [inputs._deltas[i] for i in others]
    got = None

    def ok(t):
        return (t is not None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                and t.numel() == n)

    if n > 0 and all(ok(t) for t in (*deltas, inputs._base)):
        got = Prepared(tuple(t.numpy() for t in deltas), inputs._base.numpy())
        if inputs._uniforms is not None and all(ok(inputs._uniforms[i]) for i in others) \
                and inputs._l1 is not None and all(inputs._l1[i] is not None for i in others):
            got.us = tuple(inputs._uniforms[i].numpy() for i in others)
            got.l1 = tuple(np.float32(inputs._l1[i].item()) for i in others)
        if inputs._order is not None and all(inputs._order[i] is not None for i in others):
            got.order = tuple(inputs._order[i].numpy() for i in others)
    inputs.prep[key] = got
    return got


def whole_out(job: TensorJob, n: int, ws: inp.Workspace, dest: torch.Tensor | None) -> WholeOut:
    """Where a whole-tensor compiled pass writes: the model's parameter (rounded through the output
    dtype) when given, else a float32 workspace buffer handed to the sink afterwards."""
    rmode = jit_core.round_mode(job.out_dtype)
    if dest is not None and rmode is not None:
        return WholeOut(dest.view(-1).numpy(), rmode, False)
    return WholeOut(ws.get("jit_out", n).numpy(), jit_core.ROUND_NONE, True)


def sink_whole(buf: np.ndarray, n: int, sink: inp.Sink) -> None:
    t = torch.from_numpy(buf)
    for s in range(0, n, inp.CHUNK):
        e = min(n, s + inp.CHUNK)
        sink(s, e, t[s:e])


def dare_cached(method: TaskVectorMethod, job: TensorJob, inputs: inp.Inputs, others: list[int], sink: inp.Sink,
                ws: inp.Workspace, dest: torch.Tensor | None) -> bool:
    """DARE with L1 rescale from the trial merger's cached draws and task vectors, by
    `jit_dare.dare_pass` (masks, norms and the merge in two compiled calls, no per-row Python): what
    `prepare_row` and `jit_merge` compute. False (nothing done) where it does not apply."""
    if rescale_mode(job.params) != "l1":
        return False
    prep = prepared(inputs, others)
    if prep is None or prep.us is None:
        return False
    densities = [float(job.model_params[i]["density"]) for i in others]
    if any(d >= 1 for d in densities):
        return False
    n = inputs.n
    masks = ws.arrays("dare_masks", len(others), n)
    out, rmode, via_sink = whole_out(job, n, ws, dest)
    if not jit_dare.dare_pass(prep.us, prep.xs, densities, prep.l1, masks, base=prep.base, rmode=rmode,
                              out=out, **compiled_args(method, job, others)):
        return False
    if via_sink:
        sink_whole(out, n, sink)
    return True


def ties_cached(method: TaskVectorMethod, job: TensorJob, inputs: inp.Inputs, others: list[int], sink: inp.Sink,
                ws: inp.Workspace, dest: torch.Tensor | None) -> bool:
    """TIES (no rescale) from the trial merger's cached task vectors and magnitude orders: each
    row's threshold and tie cutoff are two lookups (`inputs.CachedInputs.top_k_rule`'s), then one
    compiled pass (`jit_taskvec.cut_pass`). False (nothing done) where it does not apply."""
    if rescale_mode(job.params) != "none":
        return False
    prep = prepared(inputs, others)
    if prep is None or prep.order is None:
        return False
    n = inputs.n
    thr, cut = [], []
    for r, i in enumerate(others):
        density = float(job.model_params[i]["density"])
        k = max(1, int(density * n))
        if density >= 1 or k >= n:
            return False
        c = int(prep.order[r][k - 1])
        thr.append(abs(prep.xs[r][c]))
        cut.append(c)
    out, rmode, via_sink = whole_out(job, n, ws, dest)
    if inputs.src16 is not None:  # the same values from the 16-bit sources (a third of the bytes)
        b16, m16 = inputs.src16.base, inputs.src16.models
        jit_taskvec.cut16_pass(tuple(m16[i] for i in others), b16, thr, cut, rmode=rmode, out=out,
                               **compiled_args(method, job, others))
    else:
        jit_taskvec.cut_pass(prep.xs, thr, cut, base=prep.base, rmode=rmode, out=out,
                             **compiled_args(method, job, others))
    if via_sink:
        sink_whole(out, n, sink)
    return True


def draws_cached(inputs: inp.Inputs) -> bool:
    return isinstance(inputs, inp.CachedInputs) and inputs._uniforms is not None


def jit_ready(inputs: inp.Inputs, rows: "list[Row]") -> bool:
    """The compiled element pass applies: numba is installed, every task vector is a cached
    float32 CPU tensor, and each row is kept whole, by a threshold cutoff or by a full mask."""
    if not (jit_core.AVAILABLE and isinstance(inputs, inp.CachedInputs) and rows and inputs._deltas is not None):
        return False
    for row in rows:
        d = inputs._deltas[row.i]
        if d is None or d.dtype != torch.float32 or d.device.type != "cpu" or not d.is_contiguous():
            return False
        if row.rule is not None and not isinstance(row.rule, inp.CutRule):
            return False
    b = inputs._base
    return b is not None and b.dtype == torch.float32 and b.device.type == "cpu" and b.is_contiguous()


_JIT_SPAN = 16 * inp.CHUNK  # elements per compiled call: amortizes the call, keeps the buffer small


def compiled_args(method: TaskVectorMethod, job: TensorJob, rows: list[int]) -> dict:
    """The compiled passes' arguments that do not depend on the sparsification."""
    lin_div = None
    if not method.consensus:
        lin_div = plain_divisor(task_weights(job.model_params, rows, torch.empty(len(rows), 1)))
    return dict(weights=[float(job.model_params[i]["weight"]) for i in rows], consensus=method.consensus,
                normalize=bool(job.params["normalize"]), lin_div=lin_div, lam=float(job.params["lambda"]))


def jit_merge(method: TaskVectorMethod, job: TensorJob, inputs: inp.CachedInputs, rows: "list[Row]",
              sink: inp.Sink, ws: inp.Workspace, dest: torch.Tensor | None = None) -> None:
    n = inputs.n
    common = compiled_args(method, job, [row.i for row in rows])
    deltas = [inputs._deltas[row.i] for row in rows]
    fast = None  # the uniform cases: every row masked, or every row cut by a threshold
    if all(row.div is None and row.rule is None and row.mask is not None for row in rows):
        fast = dict(masks=[row.mask for row in rows], thr=None, cut=None,
                    fac=[1.0 if row.factor is None else float(row.factor) for row in rows])
    elif all(row.div is None and row.factor is None and isinstance(row.rule, inp.CutRule) for row in rows):
        fast = dict(masks=None, thr=[float(row.rule.threshold) for row in rows],
                    cut=[row.rule.cutoff for row in rows], fac=[1.0] * len(rows))
    if fast is not None:
        common["base"] = inputs._base
        rmode = jit_core.round_mode(job.out_dtype)
        if dest is not None and rmode is not None:  # straight into the model's parameter
            jit_taskvec.uniform_pass(deltas, **fast, **common, s=0, e=n, rmode=rmode, out=dest.view(-1))
            return
        buf = ws.get("jit_out", min(n, _JIT_SPAN))
        for s0 in range(0, n, _JIT_SPAN):
            e0 = min(n, s0 + _JIT_SPAN)
            jit_taskvec.uniform_pass(deltas, **fast, **common, s=s0, e=e0, rmode=jit_core.ROUND_NONE,
                                     out=buf[: e0 - s0])
            for s in range(s0, e0, inp.CHUNK):
                e = min(e0, s + inp.CHUNK)
                sink(s, e, buf[s - s0: e - s0])
        return
    mode, thr, cut = [], [], []
    for row in rows:
        if isinstance(row.rule, inp.CutRule):
            mode.append(jit_taskvec.MODE_CUT)
            thr.append(float(row.rule.threshold))
            cut.append(row.rule.cutoff)
        else:
            mode.append(jit_taskvec.MODE_MASK if row.mask is not None else jit_taskvec.MODE_ALL)
            thr.append(0.0)
            cut.append(0)
    buf = ws.get("jit_out", min(n, _JIT_SPAN))
    for s0 in range(0, n, _JIT_SPAN):
        e0 = min(n, s0 + _JIT_SPAN)
        jit_taskvec.task_vector_pass(
            deltas, [row.mask if row.rule is None else None for row in rows],
            mode, thr, cut, [row.div for row in rows], [row.factor for row in rows], common["weights"],
            method.consensus, common["normalize"], common["lin_div"], common["lam"],
            inputs._base, s0, e0, buf[: e0 - s0])
        for s in range(s0, e0, inp.CHUNK):
            e = min(e0, s + inp.CHUNK)
            sink(s, e, buf[s - s0: e - s0])


_DIVISORS: dict[tuple[float, ...], float] = {}


def linear_into(job: TensorJob, models: list[torch.Tensor], dest: torch.Tensor) -> bool:
    """A linear merge of flat CPU tensors (all float32, or all float16 / bfloat16 as read from the
    checkpoints: widened exactly in the compiled loop) written straight into `dest` (a float32 model
    parameter) by the compiled loop, rounded through the job's output dtype: the values of the
    chunked kernel and `dest.copy_(result.to(out_dtype))`, bit for bit. False (nothing done)
    when the compiled loop does not apply: no numba, an output dtype or layout it does not
    handle, or a torch whose addcmul_ rounding it cannot reproduce on this CPU."""
    rmode = jit_core.round_mode(job.out_dtype)
    if not jit_core.AVAILABLE or rmode is None or dest.dtype != torch.float32 or dest.device.type != "cpu" \
            or not dest.is_contiguous() or jit_core.addcmul_fuses() is None:
        return False
    n = dest.numel()
    for m in models:
        if m.dtype != models[0].dtype or m.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
                or m.device.type != "cpu" or not m.is_contiguous() or m.numel() != n:
            return False
    raise_if_invalid("linear", job.name, job.model_params, job.params, None)
    w = tuple(float(mp["weight"]) for mp in job.model_params)
    div = _DIVISORS.get(w)
    if div is None:  # the float32 Σwᵢ that weighted_sum_ divides by, from the same torch sum
        if len(_DIVISORS) > 4096:  # a long search: keep the memo small
            _DIVISORS.clear()
        div = _DIVISORS[w] = float(linear_weights(job.model_params).sum(dim=0))
    jit_linear.linear_pass(models, np.asarray(w, np.float32), bool(job.params["normalize"]), div, rmode, dest.view(-1))
    return True


@dataclass
class Dare16Sources:
    """What `dare16_into` reads for one tensor, held by the trial merger for a whole search: the
    16-bit sources as stored (`jit_core.bits16` views, all of one format) of the base and of each
    task-vector row, the rows' draws as `jit_dare16.DrawKeys`, and each row's ‖τ‖₁ (a float32 value)."""

    base: np.ndarray
    models: tuple  # per row: the models other than the base, in order
    keys: list  # per row: its `jit_dare16.DrawKeys`
    l1: list  # per row


def dare16_into(plan: MergePlan, job: TensorJob, src: Dare16Sources, dest: torch.Tensor, ws: inp.Workspace) -> bool:
    """DARE with L1 rescale from 16-bit sources, written straight into `dest` (a float32 model
    parameter) rounded through the output dtype by `jit_dare16.dare16_pass`: the chunked kernels' values
    and `dest.copy_(result.to(out_dtype))`, bit for bit. False (nothing done) where it does not
    apply (another rescale, a density of 1, an output dtype or layout the pass does not handle)."""
    if job.copy or not jit_core.AVAILABLE:
        return False
    op = get_operator(plan.recipe.merge_method)
    method = op.task_vector
    if method is None or method.sparsification != "bernoulli":
        return False
    base_index = plan.recipe.base_index
    raise_if_invalid(op.name, job.name, job.model_params, job.params, base_index)
    others = [i for i in range(len(job.models)) if i != base_index]
    n = math.prod(job.shape)
    rmode = jit_core.round_mode(job.out_dtype)
    if rescale_mode(job.params) != "l1" or not others or len(others) != len(src.models) or rmode is None \
            or dest.dtype != torch.float32 or dest.device.type != "cpu" or not dest.is_contiguous() \
            or dest.numel() != n or n == 0:
        return False
    densities = [float(job.model_params[i]["density"]) for i in others]
    if any(d >= 1 for d in densities):
        return False
    return jit_dare16.dare16_pass(src.models, src.base, src.keys, densities, src.l1, rmode=rmode,
                                  out=dest.view(-1).numpy(), **compiled_args(method, job, others))
