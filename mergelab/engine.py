"""The streaming merge engine: for each planned tensor, read the sources (the kernel reads the
next tensors ahead), merge them on the compute device, and write the result to disk (the trial
merger reuses the per-tensor merge)."""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from operators import MergeInputs, get_operator

from . import _fast
from .errors import MergelabError
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


def read_job(job: TensorJob, sources: dict[str, ModelSource]) -> dict[tuple[str, str], torch.Tensor]:
    """The raw source tensors of one job, each read once even when a model is listed twice."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for r in ([job.base] if job.base else []) + list(job.models):
        key = (r.ref, r.tensor)
        if key not in out:
            out[key] = sources[r.ref].get(r.tensor)
    return out


class JobReader:
    """A job's sources, not read yet: the chunked kernels read them slice by slice into the
    workspace's buffers; any other path reads the whole tensors (`read_all`)."""

    def __init__(self, job: TensorJob, sources: dict[str, ModelSource], ws: _fast.Workspace,
                 reuse_output: bool = False):
        self.job, self.sources, self.ws, self.reuse_output = job, sources, ws, reuse_output

    def read_all(self) -> dict[tuple[str, str], torch.Tensor]:
        return read_job(self.job, self.sources)

    def output(self) -> torch.Tensor | None:
        """A reused output buffer (valid until the next job), or None for a fresh tensor."""
        if not self.reuse_output:
            return None
        n = math.prod(self.job.shape)
        return self.ws.get(("result", self.job.out_dtype), n, self.job.out_dtype).view(self.job.shape)


def advise(job: TensorJob, sources: dict[str, ModelSource]) -> None:
    """Ask the kernel to start reading a job's tensors into the page cache (asynchronous
    readahead), so disk reads of the next tensors overlap the compute of this one."""
    for r in ([job.base] if job.base else []) + list(job.models):
        if not sources[r.ref].will_need(r.tensor):
            return


def compute_job(
    job: TensorJob,
    raw: dict[tuple[str, str], torch.Tensor] | JobReader,
    plan: MergePlan,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Merge one tensor. Shared by the disk path and the in-memory path's fallback. With a
    JobReader on the CPU, linear and the task-vector methods run the chunked kernels."""
    if isinstance(raw, JobReader):
        if device.type == "cpu" and _fast.supported(plan, job, compute_dtype, raw.sources):
            inputs = _fast.DiskInputs(job, raw.sources, plan.recipe.base_index, raw.ws)
            out, sink = _fast.full_output(job, raw.output())
            _fast.merge_job(plan, job, inputs, sink, raw.ws)
            return out
        raw = raw.read_all()
    ref_read = job.base if job.base is not None else job.models[0]
    if job.copy:
        return raw[(ref_read.ref, ref_read.tensor)].clone()
    ref_raw = raw[(ref_read.ref, ref_read.tensor)]
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(r):
        key = (r.ref, r.tensor)
        if key not in cache:
            t = fit_rows(raw[key], job.rows, ref_raw)
            cache[key] = t.to(device=device, dtype=compute_dtype)
        return cache[key]

    base = get(job.base) if job.base is not None else None
    models = [get(r) for r in job.models]
    return run_operator(job, plan, base, models).to(job.out_dtype)


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
    )
    return op.fn(inp)


def iter_merged(
    plan: MergePlan,
    sources: dict[str, ModelSource],
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    prefetch: int = 2,
    reuse_output: bool = False,
) -> Iterator[tuple[TensorJob, torch.Tensor]]:
    """Yield (job, merged tensor) in plan order. The next `prefetch` jobs' tensors are read
    ahead into the page cache by the kernel while this one is merged; the merge itself reads
    slices into reused buffers, so memory is a few slices plus the per-tensor statistics.
    With `reuse_output` each yielded tensor is valid only until the next one is asked for."""
    ws = _fast.Workspace()
    jobs = plan.jobs
    for idx, job in enumerate(jobs):
        for nxt in jobs[idx + 1: idx + 1 + prefetch]:
            advise(nxt, sources)
        out = compute_job(job, JobReader(job, sources, ws, reuse_output), plan, device, compute_dtype)
        yield job, out
        del out


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
    t0 = time.perf_counter()
    with writer:
        for i, (job, tensor) in enumerate(iter_merged(plan, sources, dev, compute_dtype, reuse_output=True)):
            writer.write(job.name, tensor)
            prog.update(job.nbytes)
            if on_tensor:
                on_tensor(i + 1, len(plan.jobs))
            del tensor
        out_dtype = next((j.out_dtype for j in plan.jobs if not j.copy), None)
        vocab = next((j.shape[0] for j in plan.jobs if j.rows is not None), None)
        if vocab is not None and vocab == ref_src.vocab_size:
            vocab = None
        files = {
            "config.json": _json(output_config(ref_src.config, out_dtype, vocab)),
            RECIPE_FILE: written_recipe(plan).to_yaml(),
        }
        files.update(_card(plan, extra_files, Path(out_dir)))  # README.md and its pictures
        files.update(extra_files or {})
        copy = list(ref_src.tokenizer_files())
        gen = ref_src.path / "generation_config.json"
        if gen.is_file():
            copy.append(gen)
        out = writer.finish(files, copy)
    return MergeReport(out, len(plan.jobs), writer.bytes_written, time.perf_counter() - t0, writer.n_shards)


def written_recipe(plan: MergePlan) -> Recipe:
    """The recipe as it ran: a random operator's seed is recorded so it reproduces."""
    if get_operator(plan.recipe.merge_method).uses_random and plan.recipe.seed != plan.seed:
        return plan.recipe.model_copy(update={"seed": plan.seed})
    return plan.recipe


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2) + "\n"


def _card(plan: MergePlan, extra_files, out_dir: Path) -> dict[str, str | bytes]:
    """The model card (it records provenance) and the pictures it shows, by file name."""
    import json

    from .card import model_card_files, sources_info_from_local

    search = None
    if extra_files and "mergelab_search.json" in extra_files:
        search = json.loads(extra_files["mergelab_search.json"])
    recipe = written_recipe(plan).to_dict()
    return model_card_files(out_dir, recipe, search=search, sources_info=sources_info_from_local(recipe))
