"""The streaming merge engine: for each planned tensor, read the sources (the kernel reads the
next tensors ahead), merge them on the compute device, and write the result to disk (the trial
merger reuses the per-tensor merge)."""
from __future__ import annotations

import logging
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from operators import MergeInputs, get_operator

from .errors import MergelabError
from .kernels import inputs as kinputs
from .kernels.finite import FiniteGuard
from .kernels.select import KernelCall, KernelCounts, Merged, run_job
from .plan import MergePlan, TensorJob, build_plan
from .recipe import Recipe, load_recipe
from .sources import ModelSource, open_sources

log = logging.getLogger("mergelab")

RECIPE_FILE = "mergelab_recipe.yaml"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise MergelabError(f"--device `{device}` is not a device. Use auto, cpu, cuda or cuda:N.") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError(
            f"--device {device} asks for a GPU, but torch sees no CUDA device here. Use --device cpu "
            "(or auto), or install a CUDA build of torch."
        )
    return d


def fit_rows(t: torch.Tensor, rows: int | None, filler: torch.Tensor | None) -> torch.Tensor:
    """Cut or pad dim 0 to `rows` (vocabulary tensors); padding takes `filler`'s rows so a
    model that lacks a token adds no task vector for it."""
    if rows is None or t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    pad = filler[t.shape[0]:rows] if filler is not None else torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad.to(t.dtype)], dim=0)


def read_job(job: TensorJob, sources: dict[str, ModelSource], pinned: bool = False) -> dict[tuple[str, str], torch.Tensor]:
    """The raw source tensors of one job, each read once even when a model is listed twice. With
    `pinned` (a CUDA merge) they are read into page-locked host memory: torch's caching host
    allocator hands the same blocks back tensor after tensor (no page faults after the first
    ones), and the copies to the GPU run at full speed without a staging copy."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for r in ([job.base] if job.base else []) + list(job.models):
        key = (r.ref, r.tensor)
        if key not in out:
            src = sources[r.ref]
            if pinned:
                info = src.tensors[r.tensor]
                out[key] = src.read_into(r.tensor, torch.empty(info.shape, dtype=info.dtype, pin_memory=True))
            else:
                out[key] = src.get(r.tensor)
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A merged GPU tensor copied to (pinned, reused) host memory for the writer."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t)


class JobReader:
    """A job's sources, not read yet: the chunked kernels read them slice by slice into the
    workspace's buffers; any other kernel reads the whole tensors (`read_all`), which a reader
    thread may have started already (`prefetched`)."""

    def __init__(self, job: TensorJob, sources: dict[str, ModelSource], ws: kinputs.Workspace,
                 reuse_output: bool = False, prefetched: Future | None = None):
        self.job, self.sources, self.ws, self.reuse_output = job, sources, ws, reuse_output
        self._prefetched = prefetched
        self._raw: dict[tuple[str, str], torch.Tensor] | None = None

    def read_all(self) -> dict[tuple[str, str], torch.Tensor]:
        if self._raw is None:
            self._raw = self._prefetched.result() if self._prefetched is not None else read_job(self.job, self.sources)
        return self._raw

    def output(self) -> torch.Tensor | None:
        """A reused output buffer (valid until the next job), or None for a fresh tensor."""
        if not self.reuse_output:
            return None
        n = math.prod(self.job.shape)
        return self.ws.get(("result", self.job.out_dtype), n, self.job.out_dtype).view(self.job.shape)


def advise(job: TensorJob, sources: dict[str, ModelSource]) -> None:
    """Ask the kernel to start reading a job's tensors into the page cache (asynchronous
    readahead), so disk reads of the next tensors overlap the compute of this one."""
    for r in ([job.base] if job.base is not None else []) + list(job.models):
        if not sources[r.ref].will_need(r.tensor):
            return


def compute_job(job: TensorJob, reader: JobReader, plan: MergePlan, device: torch.device,
                compute_dtype: torch.dtype = torch.float32) -> Merged:
    """Merge one tensor from the files by the kernel the seam selects (`kernels.select.run_job`);
    the result names the kernel."""
    return run_job(KernelCall(plan, job, "disk", device, compute_dtype, reader))


def job_params(job: TensorJob) -> dict:
    """A tensor's resolved parameters, as error messages show them."""
    return {"models": job.model_params, **job.params}


def run_operator(job: TensorJob, plan: MergePlan, base, models, deltas=None, sorted_abs=None) -> torch.Tensor:
    op = get_operator(plan.recipe.merge_method)
    inp = MergeInputs(
        name=job.name,
        base=base,
        models=models,
        model_params=job.model_params,
        params=job.params,
        seed=plan.seed,
        base_index=plan.recipe.base_index,
        deltas=deltas,
        sorted_abs=sorted_abs,
        rng=plan.recipe.rng,
    )
    return op.fn(inp)


def iter_merged(
    plan: MergePlan,
    sources: dict[str, ModelSource],
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    prefetch: int = 2,
    reuse_output: bool = False,
) -> Iterator[tuple[TensorJob, Merged]]:
    """Yield (job, merged tensor and its kernel) in plan order. The next `prefetch` jobs' tensors are read
    ahead into the page cache by the kernel while this one is merged; the merge itself reads
    slices into reused buffers, so memory is a few slices plus the per-tensor statistics.
    With `reuse_output` each yielded tensor is valid only until the next one is asked for."""
    ws = kinputs.Workspace()
    jobs = plan.jobs
    # on a GPU the whole tensors are read by a thread while the previous one merges and writes
    pool = ThreadPoolExecutor(1, thread_name_prefix="mergelab-read") if device.type != "cpu" else None
    ahead: Future | None = None
    try:
        for idx, job in enumerate(jobs):
            for nxt in jobs[idx + 1: idx + 1 + prefetch]:
                advise(nxt, sources)
            current, ahead = ahead, None
            if pool is not None and idx + 1 < len(jobs):
                ahead = pool.submit(read_job, jobs[idx + 1], sources, device.type == "cuda")
            merged = compute_job(job, JobReader(job, sources, ws, reuse_output, current), plan, device, compute_dtype)
            log.debug("%s: kernel %s", job.name, merged.kernel)
            yield job, merged
            del merged
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """Tensors done / total and bytes/s on stderr, one line rewritten in place."""

    def __init__(self, total: int, total_bytes: int, quiet: bool = False, stream=None):
        self.total, self.total_bytes, self.quiet = total, total_bytes, quiet
        self.stream = stream or sys.stderr
        self.done = 0
        self.bytes = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.quiet or (now - self._last < 0.2 and self.done < self.total):
            return
        self._last = now
        rate = self.bytes / max(now - self.t0, 1e-9)
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        self.stream.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} tensors "
            f"{self.bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s"
        )
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class MergeReport:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    shards: int
    kernels: dict[str, int]  # tensors merged per kernel name (kernels.select)


def prepare(recipe: Recipe | str | Path | dict, seed: int | None = None) -> tuple[MergePlan, dict[str, ModelSource]]:
    """Validate the recipe, open the sources (metadata only) and build the plan."""
    r = load_recipe(recipe)
    sources = open_sources(r.all_refs())
    plan = build_plan(r, sources, seed=seed)
    for note in plan.notes:
        log.warning(note)
    return plan, sources


def merge_to_dir(
    recipe: Recipe | str | Path | dict,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = "auto",
    compute_dtype: torch.dtype = torch.float32,
    shard_size: int | str = 5 * 10**9,
    seed: int | None = None,
    quiet: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str | bytes] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    plan_and_sources: tuple[MergePlan, dict[str, ModelSource]] | None = None,
) -> MergeReport:
    """Merge a recipe into a model directory with the streaming engine (atomic: a directory
    under `out_dir`'s name appears only when the merge is complete)."""
    from .writer import ShardWriter, output_config, parse_size

    dev = resolve_device(device)
    plan, sources = plan_and_sources or prepare(recipe, seed)
    ref_src = sources[plan.reference]
    writer = ShardWriter(out_dir, [(j.name, j.out_dtype, j.shape) for j in plan.jobs],
                         parse_size(shard_size), overwrite=overwrite)
    prog = Progress(len(plan.jobs), plan.total_bytes, quiet=quiet)
    kernels = KernelCounts()
    guard = FiniteGuard(f"merging {plan.recipe.merge_method} into {out_dir}; nothing was written")
    t0 = time.perf_counter()
    # on a GPU a thread writes tensor i while tensor i + 1 merges (writes stay in order)
    pool = ThreadPoolExecutor(1, thread_name_prefix="mergelab-write") if dev.type == "cuda" else None
    pending: list[Future] = []
    with writer:
        try:
            for i, (job, merged) in enumerate(iter_merged(plan, sources, dev, compute_dtype, reuse_output=True)):
                tensor = merged.out
                kernels.add(merged.kernel)
                if not job.copy:
                    guard.add(job.name, tensor, job_params(job))
                if pool is None:
                    writer.write(job.name, tensor)
                else:
                    pending.append(pool.submit(writer.write, job.name, to_host(tensor)))
                    while len(pending) > 2:  # at most two merged tensors wait on the host
                        pending.pop(0).result()
                prog.update(job.nbytes)
                if on_tensor:
                    on_tensor(i + 1, len(plan.jobs))
                del tensor
            for f in pending:
                f.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        guard.flush()  # before the output directory appears
        log.info("kernels (tensors each): %s", kernels.counts)
        out_dtype = next((j.out_dtype for j in plan.jobs if not j.copy), None)
        vocab = next((j.shape[0] for j in plan.jobs if j.rows is not None), None)
        if vocab is not None and vocab == ref_src.vocab_size:
            vocab = None
        files = {
            "config.json": _json(output_config({**ref_src.config, **plan.config_updates}, out_dtype, vocab)),
            RECIPE_FILE: written_recipe(plan, compute_dtype).to_yaml(),
        }
        files.update(_card(plan, extra_files, Path(out_dir), compute_dtype))  # README.md and its pictures
        files.update(extra_files or {})
        copy = list(ref_src.tokenizer_files())
        gen = ref_src.path / "generation_config.json"
        if gen.is_file():
            copy.append(gen)
        out = writer.finish(files, copy)
    return MergeReport(out, len(plan.jobs), writer.bytes_written, time.perf_counter() - t0, writer.n_shards,
                       kernels.counts)


def written_recipe(plan: MergePlan, compute_dtype: torch.dtype = torch.float32) -> Recipe:
    """The recipe as it ran: a random operator's seed is recorded so it reproduces, and the
    compute and output dtypes are written in, so mergekit (which computes in the models' dtype
    when `dtype` is absent) gives the same tensors from it."""
    r = plan.recipe
    if get_operator(r.merge_method).uses_random and r.seed != plan.seed:
        r = r.model_copy(update={"seed": plan.seed})
    out = next((j.out_dtype for j in plan.jobs if not j.copy), None)
    return r.pinned_dtypes(str(compute_dtype).removeprefix("torch."), None if out is None else str(out).removeprefix("torch."))


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2) + "\n"


def _card(plan: MergePlan, extra_files, out_dir: Path, compute_dtype: torch.dtype = torch.float32) -> dict[str, str | bytes]:
    """The model card (it records provenance) and the pictures it shows, by file name."""
    import json

    from .card import model_card_files, sources_info_from_local

    search = None
    if extra_files and "mergelab_search.json" in extra_files:
        search = json.loads(extra_files["mergelab_search.json"])
    recipe = written_recipe(plan, compute_dtype).to_dict()
    return model_card_files(out_dir, recipe, search=search, sources_info=sources_info_from_local(recipe))
