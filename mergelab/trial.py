"""In-memory trial merges: load the sources once, keep what the operators need on the compute
device, and write each candidate recipe's merged tensors straight into one transformers model."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from operators import get_operator, tensor_seed
from operators.sparsify import l1_norm_of_abs, sorted_magnitudes

from . import _fast, _jit
from .engine import compute_job, fit_rows, read_job, resolve_device, run_operator
from .errors import MergelabError
from .plan import MergePlan, TensorJob, build_plan
from .recipe import Recipe, load_recipe
from .sources import ModelSource, open_sources

log = logging.getLogger("mergelab")


class TrialMerger:
    """Merge many candidate recipes over the same sources into one model held in memory.

    Base tensors, each model's tensors and (when an operator wants them) task vectors and
    their magnitude order are cached once on the device; a candidate then costs one operator
    call per tensor whose parameters changed since the previous candidate. DARE over float16 /
    bfloat16 checkpoints keeps the tensors as stored and each draw as one byte instead (see
    `_jit.DrawKeys`, `_jit.dare16_pass`): about a third of the bytes per candidate. When the cache
    would exceed `max_memory` bytes it streams from disk per candidate instead (slower, same result).
    """

    def __init__(
        self,
        base_model: str | None,
        models: list[str],
        *,
        device: str | torch.device | None = "auto",
        compute_dtype: torch.dtype = torch.float32,
        model_dtype: torch.dtype = torch.float32,
        max_memory: int | None = None,
        sources: dict[str, ModelSource] | None = None,
    ):
        self.base_model = base_model
        self.model_refs = list(models)
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype
        refs = ([base_model] if base_model else []) + [m for m in models if m != base_model]
        self.sources = sources or open_sources(refs)
        self.reference = base_model or models[0]
        self.max_memory = max_memory
        self._model = None
        self._tokenizer = None
        self._params: dict[str, torch.Tensor] | None = None
        self._inputs: dict[tuple[str, str], torch.Tensor] = {}  # (ref, tensor) -> compute tensor
        self._raw16: dict[tuple[str, str], torch.Tensor] = {}  # 16-bit sources of the linear pass
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._sorted: dict[tuple[str, str], torch.Tensor] = {}  # descending (operators' form)
        self._order: dict[tuple[str, str], torch.Tensor] = {}  # magnitude order, chunked kernels
        # DARE's uniform draws per (seed, tensor): a search keeps one seed, so each candidate's
        # masks are a comparison instead of fresh draws (same numbers, same generator order)
        self._draws: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._draws_fit: bool | None = None
        self._l1: dict[tuple[str, str], torch.Tensor] = {}  # ‖τ‖₁ per task vector (DARE's rescale)
        self._ws = _fast.Workspace()
        # per tensor and operator kind: whether the chunked kernels apply and their inputs, built
        # once per search (for the seed in _fast_seed: DARE's inputs hold that seed's draws)
        self._fast_cache: dict[tuple, tuple[bool, _fast.CachedInputs | None]] = {}
        self._fast_seed: int | None = None
        # DARE from the 16-bit sources as stored and 1-byte draw keys, per (seed, tensor, sources)
        self._dare16: dict[tuple, _fast.Dare16Sources | None] = {}
        self._keys_fit: bool | None = None
        self._last: dict[str, tuple] = {}  # tensor name -> key of the last candidate written
        self._streaming: bool | None = None
        self.model_dtype = model_dtype
        self.last_stats: dict[str, Any] = {}

    # -- model -----------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            path = self.sources[self.reference].path
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            with torch.device(self.device):
                self._model = AutoModelForCausalLM.from_config(config, dtype=self.model_dtype)
            self._model.eval()
            self._model.requires_grad_(False)
            self._params = {**dict(self._model.named_parameters()), **dict(self._model.named_buffers())}
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.sources[self.reference].path, trust_remote_code=False)
        return self._tokenizer

    # -- planning --------------------------------------------------------------------------------
    def plan(self, recipe: Recipe | dict | str | Path, seed: int | None = None) -> MergePlan:
        r = load_recipe(recipe)
        wanted = set(r.all_refs())
        known = set(self.sources)
        if not wanted <= known:
            raise MergelabError(
                f"The candidate recipe uses models this trial merger was not built with: "
                f"{sorted(wanted - known)}. Known: {sorted(known)}."
            )
        if (r.base_model or r.models[0].model) != self.reference:
            raise MergelabError(
                f"The candidate recipe's base ({r.base_model}) differs from the trial merger's ({self.reference})."
            )
        return build_plan(r, {k: self.sources[k] for k in wanted}, seed=seed)

    def _cache_bytes(self, plan: MergePlan) -> int:
        op = get_operator(plan.recipe.merge_method)
        n_refs = len(self.sources)
        per_elem = 4 * (n_refs + (n_refs if op.uses_deltas or op.uses_sorted_abs else 0) + (n_refs if op.uses_sorted_abs else 0))
        return sum(math.prod(j.shape) * per_elem for j in plan.jobs)

    def _input(self, job: TensorJob, r) -> torch.Tensor:
        key = (r.ref, r.tensor)
        t = self._inputs.get(key)
        if t is None:
            raw = self.sources[r.ref].get(r.tensor)
            ref_raw = None
            if job.rows is not None and raw.shape[0] < job.rows:  # padding takes the reference's rows
                ref_read = job.base if job.base is not None else job.models[0]
                ref_raw = self.sources[ref_read.ref].get(ref_read.tensor)
            t = fit_rows(raw, job.rows, ref_raw).to(device=self.device, dtype=self.compute_dtype)
            self._inputs[key] = t
        return t

    def _linear_source(self, job: TensorJob, r) -> torch.Tensor:
        """A model's tensor, flat, for the compiled linear pass: as stored when it is float16 or
        bfloat16 and needs no vocabulary cut or pad (the pass widens it exactly, reading half the
        bytes of a float32 copy), else the cached compute-dtype tensor."""
        key = (r.ref, r.tensor)
        t = self._raw16.get(key)
        if t is None:
            if key in self._inputs or not _jit.AVAILABLE:  # a float32 copy is held already
                return self._input(job, r).view(-1)
            raw = self.sources[r.ref].get(r.tensor)
            if raw.dtype not in (torch.float16, torch.bfloat16) or (job.rows is not None and raw.shape[0] != job.rows):
                return self._input(job, r).view(-1)
            t = self._raw16[key] = raw.view(-1)  # a fresh tensor (sources.get reads into one)
        return t

    # -- merging ---------------------------------------------------------------------------------
    def _delta(self, job: TensorJob, r, base: torch.Tensor) -> torch.Tensor:
        """τ = model − base, cached flat; the model itself is not kept for it."""
        k = (r.ref, r.tensor)
        d = self._deltas.get(k)
        if d is None:
            m = self._inputs.get(k)
            if m is None and job.rows is not None:
                m = self._input(job, r)
            if m is None:
                m = fit_rows(self.sources[r.ref].get(r.tensor), job.rows, None).to(
                    device=self.device, dtype=self.compute_dtype)
            d = self._deltas[k] = m - base
        return d

    def _dare16_sources(self, job: TensorJob, plan: MergePlan) -> _fast.Dare16Sources | None:
        """The 16-bit sources, draw keys and ‖τ‖₁ of a DARE tensor, built once per seed; None (the
        float32 path then) when a source is not float16 / bfloat16 as stored or not all of one
        format, needs a vocabulary cut or pad, or the draws do not fit `max_memory`."""
        bi = plan.recipe.base_index
        base_read = job.base if job.base is not None else (job.models[bi] if bi is not None else None)
        if base_read is None or job.copy:
            return None
        rows = [r for i, r in enumerate(job.models) if i != bi]
        key = (plan.seed, job.name, (base_read.ref, base_read.tensor), tuple((r.ref, r.tensor) for r in rows))
        if key in self._dare16:
            return self._dare16[key]
        if self._dare16 and next(iter(self._dare16))[0] != plan.seed:
            self._dare16.clear()  # a new seed: the old draws will not come back
        if self._keys_fit is None:  # per row element 7 bytes of keys, per source element 2
            need = sum(math.prod(j.shape) * (7 * (len(j.models) - 1) + 2 * (len(j.models) + 1)) for j in plan.jobs)
            self._keys_fit = self.max_memory is None or need <= self.max_memory
        got = None
        srcs = [self._raw16_source(job, r) for r in (base_read, *rows)] if self._keys_fit else []
        if self._keys_fit and rows and all(t is not None and t.dtype == srcs[0].dtype for t in srcs):
            b, ms = srcs[0], srcs[1:]
            n = b.numel()
            stream = _jit.mt_stream(tensor_seed(plan.seed, job.name))
            gen = None
            if stream is None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(tensor_seed(plan.seed, job.name))
            keys, l1 = [], []
            u = torch.empty(n, dtype=torch.float32)
            for r, m in zip(rows, ms):  # the rows' draws in row order, as the operator takes them
                keys.append(_jit.DrawKeys(stream.uniform_into(u) if stream is not None else u.uniform_(generator=gen)))
                k = (r.ref, r.tensor)
                if k not in self._l1:  # the values of _l1_norm(τ), τ = θ − base in float32
                    d = self._deltas.get(k)
                    self._l1[k] = l1_norm_of_abs(torch.abs(d if d is not None else m.float() - b.float()))
                l1.append(self._l1[k].item())
            got = _fast.Dare16Sources(_jit.bits16(b), tuple(_jit.bits16(m) for m in ms), keys, l1)
        self._dare16[key] = got
        return got

    def _raw16_source(self, job: TensorJob, r) -> torch.Tensor | None:
        """A model's tensor, flat, as stored when it is float16 or bfloat16 and needs no vocabulary
        cut or pad (cached with the linear pass's), else None."""
        key = (r.ref, r.tensor)
        t = self._raw16.get(key)
        if t is None:
            raw = self.sources[r.ref].get(r.tensor)
            if raw.dtype not in (torch.float16, torch.bfloat16) or (job.rows is not None and raw.shape[0] != job.rows):
                return None
            t = self._raw16[key] = raw.view(-1)  # a fresh tensor (sources.get reads into one)
        return t

    def _cached_fast_inputs(self, job: TensorJob, plan: MergePlan, op) -> _fast.CachedInputs | None:
        """`_fast_inputs` when the chunked kernels merge this job, else None; both decided once per
        tensor, operator and source list (they do not depend on the candidate's values)."""
        if plan.seed != self._fast_seed:
            self._fast_cache.clear()  # DARE's inputs hold the old seed's draws
            self._fast_seed = plan.seed
        reads = (job.base, *job.models)
        key = (job.name, op.name, plan.recipe.base_index, tuple(None if r is None else (r.ref, r.tensor) for r in reads))
        got = self._fast_cache.get(key)
        if got is None:
            ok = _fast.supported(plan, job, self.compute_dtype, self.sources)
            got = self._fast_cache[key] = (ok, self._fast_inputs(job, plan, op) if ok else None)
        return got[1]

    def _fast_inputs(self, job: TensorJob, plan: MergePlan, op) -> _fast.CachedInputs:
        n = math.prod(job.shape)
        if op.name == "linear":
            models = [self._input(job, r).view(-1) for r in job.models]
            return _fast.CachedInputs(n, None, models)
        bi = plan.recipe.base_index
        base_read = job.base if job.base is not None else job.models[bi]
        base = self._input(job, base_read)
        deltas: list[torch.Tensor | None] = []
        order: list[torch.Tensor | None] = []
        for i, r in enumerate(job.models):
            if i == bi:
                deltas.append(None)
                order.append(None)
                continue
            d = self._delta(job, r, base)
            deltas.append(d.view(-1))
            if op.uses_sorted_abs:
                k = (r.ref, r.tensor)
                if k not in self._order:
                    self._order[k] = _fast.magnitude_order(d)
                order.append(self._order[k])
            else:
                order.append(None)
        uniforms = l1 = None
        if op.name in _fast.BERNOULLI:
            uniforms = self._uniforms(job, plan, deltas)
            if uniforms is not None:
                l1 = [self._l1_norm(job, r, d) if d is not None else None for r, d in zip(job.models, deltas)]
        got = _fast.CachedInputs(n, base.view(-1), [None] * len(job.models), deltas, order, uniforms, l1)
        if op.uses_sorted_abs and _jit.AVAILABLE:  # TIES: its pass may read the 16-bit sources
            srcs = [self._raw16_source(job, r) for r in (base_read, *job.models)]
            if all(t is not None and t.dtype == srcs[0].dtype and t.numel() == n for t in srcs):
                got.src16 = tuple(_jit.bits16(t) for t in srcs)
        return got

    def _l1_norm(self, job: TensorJob, r, delta: torch.Tensor) -> torch.Tensor:
        """‖τ‖₁ by the fixed-order sum the L1 rescale uses, once per task vector."""
        k = (r.ref, r.tensor)
        v = self._l1.get(k)
        if v is None:
            v = self._l1[k] = l1_norm_of_abs(torch.abs(delta))
        return v

    def _uniforms(self, job: TensorJob, plan: MergePlan, deltas) -> list[torch.Tensor | None] | None:
        """The uniform numbers DARE draws for this tensor, cached while they fit `max_memory`."""
        if self._draws_fit is None:
            extra = sum(math.prod(j.shape) * 4 * (len(j.models) - 1) for j in plan.jobs)
            self._draws_fit = self.max_memory is None or self._cache_bytes(plan) + extra <= self.max_memory
        if not self._draws_fit:
            return None
        key = (plan.seed, job.name)
        got = self._draws.get(key)
        if got is None:
            if any(k[0] != plan.seed for k in self._draws):
                self._draws.clear()  # a new seed: the old draws will not come back
            gen = torch.Generator(device="cpu")
            gen.manual_seed(tensor_seed(plan.seed, job.name))
            got = [torch.empty(d.numel(), dtype=torch.float32).uniform_(generator=gen) if d is not None else None
                   for d in deltas]
            self._draws[key] = got
        return got

    def merged_tensors(self, recipe, seed: int | None = None, only_changed: bool = False, target=None):
        """Yield (job, key, merged tensor in the output dtype) for a candidate. With `target`
        (job -> tensor or None) a chunked merge writes straight into the returned tensor and
        yields None in place of the merged tensor."""
        plan = self.plan(recipe, seed)
        op = get_operator(plan.recipe.merge_method)
        linear = op.name == "linear" and self.device.type == "cpu" and self.compute_dtype == torch.float32
        dare16 = (op.name in _fast.BERNOULLI and self.device.type == "cpu" and self.compute_dtype == torch.float32
                  and _jit.AVAILABLE)
        if self._streaming is None:
            need = self._cache_bytes(plan)
            self._streaming = self.max_memory is not None and need > self.max_memory
            if self._streaming:
                log.warning(
                    "The sources and task vectors need %.1f MB, more than --max-memory (%.1f MB): "
                    "trial merges will stream from disk per candidate (slower, same result).",
                    need / 1e6, self.max_memory / 1e6,
                )
        for job in plan.jobs:
            key = (plan.recipe.merge_method, plan.seed, job.param_key())
            if only_changed and self._last.get(job.name) == key:
                continue
            if self._streaming or job.copy:
                out = compute_job(job, read_job(job, self.sources), plan, self.device, self.compute_dtype)
            elif linear and target is not None and (dest := target(job)) is not None \
                    and _fast.linear_into(job, [self._linear_source(job, r) for r in job.models], dest):
                out = None  # the compiled loop wrote the result into the model's parameter
            elif dare16 and target is not None and (dest := target(job)) is not None \
                    and _fast.dare16_applies(plan, job) \
                    and (src := self._dare16_sources(job, plan)) is not None \
                    and _fast.dare16_into(plan, job, src, dest, self._ws):
                out = None  # the compiled passes wrote the result into the model's parameter
            elif self.device.type == "cpu" and (inputs := self._cached_fast_inputs(job, plan, op)) is not None:
                dest = target(job) if target is not None else None
                if dest is not None and dest.is_contiguous() and tuple(dest.shape) == tuple(job.shape):
                    _fast.merge_job(plan, job, inputs, _fast.into_tensor(dest, job.out_dtype, self._ws), self._ws,
                                    dest if dest.dtype == torch.float32 else None)
                    out = None
                else:
                    out, sink = _fast.full_output(job)
                    _fast.merge_job(plan, job, inputs, sink, self._ws)
            else:
                base = self._input(job, job.base) if job.base is not None else None
                models = [self._input(job, r) for r in job.models]
                deltas = sorted_abs = None
                if base is not None and (op.uses_deltas or op.uses_sorted_abs):
                    deltas = []
                    for i, (r, m) in enumerate(zip(job.models, models)):
                        if i == plan.recipe.base_index:
                            deltas.append(None)
                            continue
                        deltas.append(self._delta(job, r, base))
                    if op.uses_sorted_abs:
                        sorted_abs = []
                        for r, d in zip(job.models, deltas):
                            if d is None:
                                sorted_abs.append(None)
                                continue
                            k = (r.ref, r.tensor)
                            if k not in self._sorted:
                                self._sorted[k] = sorted_magnitudes(d)
                            sorted_abs.append(self._sorted[k])
                out = run_operator(job, plan, base, models, deltas, sorted_abs).to(job.out_dtype)
            yield job, key, out

    def apply(self, recipe, seed: int | None = None):
        """Write the candidate's merged weights into the in-memory model and return the model.
        A layer stack (mergekit slices: the data-flow search's candidates) is built instead from
        the cached layers of its sources, as references (mergelab.stack.StackBuilder)."""
        slices = recipe.get("slices") if isinstance(recipe, dict) else getattr(recipe, "slices", ())
        if slices is not None and load_recipe(recipe).is_stack:  # validated twice only for stacks
            return self._stack_builder().build(recipe)
        model = self.model
        t0 = time.perf_counter()
        changed = 0
        with torch.no_grad():
            for job, key, out in self.merged_tensors(recipe, seed, only_changed=True,
                                                      target=lambda j: self._params.get(j.name)):
                if out is None:  # written in place by the chunked kernels
                    self._last[job.name] = key
                    changed += 1
                    continue
                p = self._params.get(job.name)
                if p is None:
                    if "lm_head" in job.name and getattr(model.config, "tie_word_embeddings", False):
                        self._last[job.name] = key
                        continue
                    raise MergelabError(
                        f"The model built from {self.reference}'s config has no parameter `{job.name}`; "
                        "its checkpoint and config disagree."
                    )
                p.copy_(out)
                self._last[job.name] = key
                changed += 1
        self.last_stats = {"changed_tensors": changed, "merge_seconds": time.perf_counter() - t0}
        return model

    def _stack_builder(self):
        if getattr(self, "_stacks", None) is None:
            from .stack import StackBuilder

            self._stacks = StackBuilder([], device=self.device, model_dtype=self.model_dtype, sources=dict(self.sources))
        return self._stacks

    def state_dict(self, recipe, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The candidate's merged tensors in the output dtype (what `mergelab merge` writes)."""
        return {job.name: out.cpu() for job, _, out in self.merged_tensors(recipe, seed)}


def load_recipe_model(recipe: Recipe | dict | str | Path, device: str | torch.device | None = "auto",
                      seed: int | None = None):
    """Merge a recipe in memory and return (transformers model, tokenizer). Nothing is written."""
    r = load_recipe(recipe)
    tm = TrialMerger(r.base_model, r.model_refs, device=device)
    model = tm.apply(r, seed)
    return model, tm.tokenizer
