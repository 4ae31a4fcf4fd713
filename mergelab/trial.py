"""In-memory trial merges: load the sources once, keep what the operators need on the compute
device, and write each candidate recipe's merged tensors straight into one transformers model."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from operators import get_operator, tensor_seed
from operators.sparsify import l1_norm_of_abs

from .engine import JobReader, compute_job, fit_rows, job_params, resolve_device
from .errors import MergelabError
from .kernels import cached, jit_core, jit_dare16, mt19937
from .kernels import inputs as kinputs
from .kernels.finite import FiniteGuard
from .kernels.select import KernelCall, run_job
from .plan import MergePlan, TensorJob, build_plan
from .recipe import Recipe, load_recipe
from .sources import ModelSource, open_sources

log = logging.getLogger("mergelab")


Tier = Literal["fast", "stored", "disk"]


def _available_memory() -> float:
    """MemAvailable of /proc/meminfo in bytes (inf where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _tensors_in(v) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors_in(x)]
    return []


def _fast_extra(op) -> int:
    """Bytes per source element the fast tier adds: float32 copies, task vectors, magnitude orders
    (none for an operator whose kernel keeps its own derived tensors instead)."""
    if op.keeps_derived:
        return 0
    return 4 * (1 + (op.uses_deltas or op.uses_sorted_abs) + op.uses_sorted_abs)


def _derived_extra(op) -> int:
    """Bytes per source element an operator's kernel derives and keeps in any tier (TSV's parts)."""
    return 4 if op.keeps_derived else 0


@dataclass
class TrialStats:
    """What the last `TrialMerger.apply` did: tensors recomputed (unchanged ones are skipped),
    seconds, tensors per kernel name (`kernels.select`: e.g. "chunked", "reference", "linear16",
    "copy") and the device it ran on ("cpu", "cuda:0")."""

    changed_tensors: int = 0
    merge_seconds: float = 0.0
    kernels: dict[str, int] = field(default_factory=dict)
    device: str = ""


class TrialMerger:
    """Merge many candidate recipes over the same sources into one model held in memory.

    The compact cache keeps each source tensor as stored (a 16-bit checkpoint stays 16-bit) on
    the compute device, and a candidate derives what it needs per tensor (task vectors, top-k
    thresholds by selection, DARE's draws from the counter stream) while it merges: on CUDA
    always. On the CPU, `cache="fast"` keeps float32 task vectors and magnitude orders too
    (TIES candidates about four times faster, about four times the memory); "auto" (default)
    takes the fast tier while it fits (see `_assign_tiers`), "compact" never. A candidate costs one kernel call per tensor whose
    parameters changed since the previous candidate. When the cache exceeds `max_memory` bytes,
    the tensors that do not fit stream from disk per candidate (slower, same result); the merger
    says so before the first candidate.
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
        cache: Literal["auto", "compact", "fast"] = "auto",
    ):
        self.base_model = base_model
        self.model_refs = list(models)
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype
        refs = ([base_model] if base_model else []) + [m for m in models if m != base_model]
        self.sources = sources or open_sources(refs)
        self.reference = base_model or models[0]
        self.max_memory = max_memory
        # derived float32 caches serve the CPU's compiled kernels only
        self.cache = cache if self.device.type == "cpu" else "compact"
        if cache not in ("auto", "compact", "fast"):
            raise ValueError(f"TrialMerger cache must be auto, compact or fast, not {cache!r}")
        self._model = None
        self._tokenizer = None
        self._params: dict[str, torch.Tensor] | None = None
        self._stored: dict[tuple[str, str], torch.Tensor] = {}  # (ref, tensor) -> as stored, on the device
        self._tiers: dict[str, Tier] = {}  # tensor name -> where its sources live
        # the fast tier (cache="fast", CPU): float32 copies, task vectors, magnitude orders
        self._inputs: dict[tuple[str, str], torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._order: dict[tuple[str, str], torch.Tensor] = {}
        # mergekit's DARE stream (rng: mergekit): the uniform draws per (seed, tensor), a search
        # keeps one seed, so each candidate's masks are a comparison (same numbers, same order)
        self._draws: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._l1: dict[tuple[str, str], torch.Tensor] = {}  # ‖τ‖₁ per task vector (mergekit's rescale)
        self._fast_cache: dict[tuple, kinputs.CachedInputs] = {}
        self._fast_seed: int | None = None
        # mergekit's DARE from the 16-bit sources and 1-byte draw keys, per (seed, tensor, sources)
        self._dare16: dict[tuple, cached.Dare16Sources | None] = {}
        self._last: dict[str, tuple] = {}  # tensor name -> key of the last candidate written
        # what a memory kernel derives once from the sources (TSV's decompositions), by its key
        self._derived: dict[tuple, object] = {}
        self.workspace = kinputs.Workspace()
        self.model_dtype = model_dtype
        self.last_stats = TrialStats(device=str(self.device))

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

    def _reads(self, job: TensorJob) -> dict[tuple[str, str], int]:
        """The job's distinct source tensors and their element counts."""
        n = math.prod(job.shape)
        return {(r.ref, r.tensor): n for r in ([job.base] if job.base is not None else []) + list(job.models)}

    def cache_bytes(self, plan: MergePlan, tier: Tier) -> int:
        """Bytes the cache holds for a plan's tensors in one tier ("stored": the sources as stored;
        "fast": float32 copies, task vectors and, for TIES-like methods, magnitude orders too)."""
        op = get_operator(plan.recipe.merge_method)
        seen: set = set()
        total = 0
        for job in plan.jobs:
            for key, n in self._reads(job).items():
                if key in seen:
                    continue
                seen.add(key)
                size = self.sources[key[0]].tensors[key[1]].dtype.itemsize
                total += n * (size + _derived_extra(op))
                if tier == "fast":
                    total += n * _fast_extra(op)
        return total

    def _assign_tiers(self, plan: MergePlan) -> None:
        """Decide, before the first candidate, where each new tensor's sources live: all in the
        fast tier when it fits `max_memory` (cache "fast", or "auto" on the CPU: then without
        max_memory while it fits half the available memory), else all as stored when that fits,
        else as stored tensor by tensor while the budget lasts, the rest from disk."""
        new = [j for j in plan.jobs if j.name not in self._tiers]
        if not new:
            return
        used = sum(t.numel() * t.element_size() for t in self._stored.values())
        used += sum(t.numel() * t.element_size()
                    for d in (self._inputs, self._deltas, self._order) for t in d.values())
        used += sum(t.numel() * t.element_size() for v in self._derived.values() for t in _tensors_in(v))
        budget = math.inf if self.max_memory is None else self.max_memory
        op = get_operator(plan.recipe.merge_method)
        fast_extra = _fast_extra(op)
        seen = set(self._stored)
        stored_of, fast_of = {}, {}
        for job in new:
            reads = {k: n for k, n in self._reads(job).items() if k not in seen}
            seen.update(reads)
            stored_of[job.name] = sum(n * (self.sources[k[0]].tensors[k[1]].dtype.itemsize + _derived_extra(op))
                                      for k, n in reads.items())
            fast_of[job.name] = stored_of[job.name] + sum(reads.values()) * fast_extra
        fast_budget = budget
        if self.cache == "auto" and self.max_memory is None:  # the fast tier while it takes at most half
            fast_budget = _available_memory() / 2         # of the memory this machine has free
        if self.cache != "compact" and used + sum(fast_of.values()) <= fast_budget:
            self._tiers.update({j.name: "fast" for j in new})
            return
        if used + sum(stored_of.values()) <= budget:
            self._tiers.update({j.name: "stored" for j in new})
            return
        streamed = 0
        for job in new:
            if used + stored_of[job.name] <= budget:
                self._tiers[job.name], used = "stored", used + stored_of[job.name]
            else:
                self._tiers[job.name] = "disk"
                streamed += 1
        log.warning(
            "The trial cache does not fit --max-memory (%.1f MB): %d of %d tensors stream from "
            "disk per candidate (slower, same result); the others stay in memory.",
            budget / 1e6, streamed, len(new),
        )

    def tier(self, job: TensorJob) -> Tier:
        return self._tiers[job.name]

    # -- the cache -------------------------------------------------------------------------------
    def stored(self, job: TensorJob, r) -> torch.Tensor:
        """A source tensor as stored (vocabulary rows cut or padded to the job's), on the device."""
        key = (r.ref, r.tensor)
        t = self._stored.get(key)
        if t is None:
            raw = self.sources[r.ref].get(r.tensor)
            ref_raw = None
            if job.rows is not None and raw.shape[0] < job.rows:  # padding takes the reference's rows
                ref_read = job.base if job.base is not None else job.models[0]
                ref_raw = self.sources[ref_read.ref].get(ref_read.tensor)
            t = self._stored[key] = fit_rows(raw, job.rows, ref_raw).to(self.device).contiguous()
        return t

    def stored_map(self, job: TensorJob) -> dict[tuple[str, str], torch.Tensor]:
        """The job's sources as stored, flat, by (ref, tensor)."""
        reads = ([job.base] if job.base is not None else []) + list(job.models)
        return {(r.ref, r.tensor): self.stored(job, r).view(-1) for r in reads}

    def _input(self, job: TensorJob, r) -> torch.Tensor:
        """A source in the compute dtype (the fast tier's float32 copy)."""
        key = (r.ref, r.tensor)
        t = self._inputs.get(key)
        if t is None:
            t = self._inputs[key] = self.stored(job, r).to(self.compute_dtype, copy=True)
        return t

    def _delta(self, job: TensorJob, r, base: torch.Tensor) -> torch.Tensor:
        """τ = model − base (fast tier), cached."""
        k = (r.ref, r.tensor)
        d = self._deltas.get(k)
        if d is None:
            m = self._inputs.get(k)
            if m is None:
                m = self.stored(job, r).to(self.compute_dtype)
            d = self._deltas[k] = m - base
        return d

    def dare16_sources(self, job: TensorJob, plan: MergePlan) -> cached.Dare16Sources | None:
        """mergekit's DARE: the 16-bit sources, draw keys and ‖τ‖₁ of a tensor, built once per seed;
        None (another kernel then) when a source is not float16 / bfloat16 as stored or not all of
        one format, the tensor is not in memory, or the compiled loops are off (the keys are built by
        one)."""
        bi = plan.recipe.base_index
        base_read = job.base if job.base is not None else (job.models[bi] if bi is not None else None)
        if base_read is None or job.copy or self.tier(job) == "disk" or not jit_core.AVAILABLE:
            return None
        rows = [r for i, r in enumerate(job.models) if i != bi]
        key = (plan.seed, job.name, (base_read.ref, base_read.tensor), tuple((r.ref, r.tensor) for r in rows))
        if key in self._dare16:
            return self._dare16[key]
        if self._dare16 and next(iter(self._dare16))[0] != plan.seed:
            self._dare16.clear()  # a new seed: the old draws will not come back
        got = None
        srcs = [self.stored(job, r).view(-1) for r in (base_read, *rows)]
        if rows and srcs[0].dtype in (torch.float16, torch.bfloat16) and all(t.dtype == srcs[0].dtype for t in srcs):
            b, ms = srcs[0], srcs[1:]
            n = b.numel()
            stream = mt19937.mt_stream(tensor_seed(plan.seed, job.name))
            gen = None
            if stream is None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(tensor_seed(plan.seed, job.name))
            keys, l1 = [], []
            u = torch.empty(n, dtype=torch.float32)
            for r, m in zip(rows, ms):  # the rows' draws in row order, as the operator takes them
                drawn = stream.uniform_into(u) if stream is not None else u.uniform_(generator=gen)
                keys.append(jit_dare16.DrawKeys(drawn))
                k = (r.ref, r.tensor)
                if k not in self._l1:  # the values of _l1_norm(τ), τ = θ − base in float32
                    self._l1[k] = l1_norm_of_abs(torch.abs(m.float() - b.float()))
                l1.append(self._l1[k].item())
            got = cached.Dare16Sources(jit_core.bits16(b), tuple(jit_core.bits16(m) for m in ms), keys, l1)
        self._dare16[key] = got
        return got

    def derived(self, key: tuple, build):
        """What `build()` derives from the sources for a kernel (its key names the kernel, the
        tensor and the sources), built on first use and kept: it does not depend on a candidate."""
        got = self._derived.get(key)
        if got is None:
            got = self._derived[key] = build()
        return got

    def fast_inputs(self, job: TensorJob, plan: MergePlan) -> kinputs.CachedInputs:
        """The fast tier's inputs of the chunked kernels, built once per tensor, operator, stream
        and source list (they do not depend on the candidate's values)."""
        op = get_operator(plan.recipe.merge_method)
        if plan.seed != self._fast_seed:
            self._fast_cache.clear()  # mergekit DARE's inputs hold the old seed's draws
            self._fast_seed = plan.seed
        reads = (job.base, *job.models)
        key = (job.name, op.name, plan.recipe.rng, plan.recipe.base_index,
               tuple(None if r is None else (r.ref, r.tensor) for r in reads))
        got = self._fast_cache.get(key)
        if got is None:
            got = self._fast_cache[key] = self._build_fast_inputs(job, plan, op)
        return got

    def _build_fast_inputs(self, job: TensorJob, plan: MergePlan, op) -> kinputs.CachedInputs:
        n = math.prod(job.shape)
        if op.weighted_sum:
            return kinputs.CachedInputs(n, None, [self._input(job, r).view(-1) for r in job.models])
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
                    self._order[k] = kinputs.magnitude_order(d)
                order.append(self._order[k])
            else:
                order.append(None)
        uniforms = l1 = None
        tv = op.task_vector
        if tv is not None and tv.sparsification == "bernoulli" and plan.recipe.rng == "mergekit":
            # DARE with mergekit's stream: its draws, kept
            uniforms = self._uniforms(job, plan, deltas)
            l1 = [self._l1_norm(r, d) if d is not None else None for r, d in zip(job.models, deltas)]
        got = kinputs.CachedInputs(n, base.view(-1), [None] * len(job.models), deltas, order, uniforms, l1)
        if op.uses_sorted_abs and jit_core.AVAILABLE:  # TIES: its pass may read the 16-bit sources
            srcs = [self.stored(job, r).view(-1) for r in (base_read, *job.models)]
            if srcs[0].dtype in (torch.float16, torch.bfloat16) and all(t.dtype == srcs[0].dtype for t in srcs):
                got.src16 = kinputs.Sources16(jit_core.bits16(srcs[0]), tuple(jit_core.bits16(t) for t in srcs[1:]))
        return got

    def _l1_norm(self, r, delta: torch.Tensor) -> torch.Tensor:
        """‖τ‖₁ by the fixed-order sum mergekit's L1 rescale uses, once per task vector."""
        k = (r.ref, r.tensor)
        v = self._l1.get(k)
        if v is None:
            v = self._l1[k] = l1_norm_of_abs(torch.abs(delta))
        return v

    def _uniforms(self, job: TensorJob, plan: MergePlan, deltas) -> list[torch.Tensor | None]:
        """mergekit's uniform numbers for this tensor (torch's CPU generator, rows in order)."""
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

    # -- merging ---------------------------------------------------------------------------------
    def merged_tensors(self, recipe, seed: int | None = None, only_changed: bool = False, target=None):
        """Yield (job, key, Merged) for a candidate, in plan order. With `target` (job -> tensor or
        None) a kernel may write straight into the returned tensor (then `Merged.out` is None)."""
        plan = self.plan(recipe, seed)
        self._assign_tiers(plan)
        for job in plan.jobs:
            key = (plan.recipe.merge_method, plan.seed, plan.recipe.rng, job.param_key())
            if only_changed and self._last.get(job.name) == key:
                continue
            if self.tier(job) == "disk":
                merged = compute_job(job, JobReader(job, self.sources, self.workspace), plan, self.device,
                                     self.compute_dtype)
            else:
                dest = target(job) if target is not None else None
                merged = run_job(KernelCall(plan, job, "memory", self.device, self.compute_dtype, self, dest))
            yield job, key, merged

    def apply(self, recipe, seed: int | None = None):
        """Write the candidate's merged weights into the in-memory model and return the model.
        A layer stack (mergekit slices: the data-flow search's candidates) is built instead from
        the cached layers of its sources, as references (mergelab.stack.StackBuilder).
        Raises NonFiniteMergeError when a merged tensor holds inf/NaN."""
        slices = recipe.get("slices") if isinstance(recipe, dict) else getattr(recipe, "slices", ())
        if slices is not None and load_recipe(recipe).is_stack:  # validated twice only for stacks
            builder = self._stack_builder()
            model = builder.build(recipe)
            self.last_stats = TrialStats(changed_tensors=int(builder.last_stats.get("tensors", 0)),
                                         merge_seconds=builder.last_stats["build_seconds"],
                                         kernels={"stack": int(builder.last_stats.get("tensors", 0))},
                                         device=str(self.device))
            return model
        model = self.model
        t0 = time.perf_counter()
        stats = TrialStats(device=str(self.device))
        guard = FiniteGuard("in the trial merger's candidate")
        with torch.no_grad():
            for job, key, merged in self.merged_tensors(recipe, seed, only_changed=True,
                                                        target=lambda j: self._params.get(j.name)):
                stats.kernels[merged.kernel] = stats.kernels.get(merged.kernel, 0) + 1
                out = merged.out
                if out is None:  # written in place by the kernel
                    self._last[job.name] = key
                    stats.changed_tensors += 1
                    if not job.copy:
                        guard.add(job.name, self._params[job.name], job_params(job))
                    continue
                if not job.copy:
                    guard.add(job.name, out, job_params(job))
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
                stats.changed_tensors += 1
            guard.flush()
        stats.merge_seconds = time.perf_counter() - t0
        self.last_stats = stats
        return model

    def _stack_builder(self):
        if getattr(self, "_stacks", None) is None:
            from .stack import StackBuilder

            self._stacks = StackBuilder([], device=self.device, model_dtype=self.model_dtype, sources=dict(self.sources))
        return self._stacks

    def state_dict(self, recipe, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The candidate's merged tensors in the output dtype (what `mergelab merge` writes)."""
        return {job.name: merged.out.cpu() for job, _, merged in self.merged_tensors(recipe, seed)}


def load_recipe_model(recipe: Recipe | dict | str | Path, device: str | torch.device | None = "auto",
                      seed: int | None = None):
    """Merge a recipe in memory and return (transformers model, tokenizer). Nothing is written."""
    r = load_recipe(recipe)
    tm = TrialMerger(r.base_model, r.model_refs, device=device)
    model = tm.apply(r, seed)
    return model, tm.tokenizer
