"""The tensor plan: which output tensors to make, from which source tensors, with which
resolved parameters. All compatibility checks happen here, before any tensor is read."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MergelabError, name_list
from .recipe import DTYPES as recipe_dtypes
from .recipe import Recipe, resolve_value
from .sources import ModelSource

log = logging.getLogger("mergelab")

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
VOCAB_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output.weight", "tok_embeddings")
DTYPES = {name: getattr(torch, name) for name in recipe_dtypes}  # recipe dtype names
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_tokens", "embed_tokens.weight")


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_vocab_tensor(name: str) -> bool:
    return any(v in name for v in VOCAB_NAMES)


@dataclass
class Read:
    ref: str  # model reference (recipe string)
    tensor: str  # tensor name in that source


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    layer: int | None
    t: float
    base: Read | None  # None when the recipe has no base model
    models: list[Read]  # aligned with recipe.models
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    copy: bool = False  # non-float tensors (buffers) are copied from the reference model
    rows: int | None = None  # cut/pad dim 0 to this many rows (vocabulary tensors)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize

    def param_key(self) -> tuple:
        """Hashable view of everything that decides this tensor's value (for change detection)."""
        return (
            tuple(tuple(sorted(p.items())) for p in self.model_params),
            tuple(sorted(self.params.items())),
        )


@dataclass
class MergePlan:
    recipe: Recipe
    jobs: list[TensorJob]
    reference: str  # ref whose names, config and tokenizer the output follows
    num_layers: int | None
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    # keys of the reference's config.json that the output changes (a stack's layer count)
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    @property
    def largest_bytes(self) -> int:
        return max((j.nbytes for j in self.jobs), default=0)

    def peak_memory_estimate(self, prefetch: int = 2) -> int:
        """A conservative bound on tensor memory held at once, printed by `merge --dry-run`:
        room for `prefetch` jobs of 2-byte source tensors plus the float32 working set of one
        job (sources, task vectors, result, temporaries). The fused kernels need far less (a few
        64K-element slices plus per-tensor statistics); the readahead of the next tensors fills
        the page cache, not the process."""
        n = len({r for j in self.jobs[:1] for r in [*(m.ref for m in j.models)] + ([j.base.ref] if j.base else [])})
        largest_elems = max((math.prod(j.shape) for j in self.jobs), default=0)
        raw = prefetch * n * largest_elems * 2
        work = (2 * n + 4) * largest_elems * 4
        return raw + work + self.largest_bytes


def config_mismatches(ref_src: ModelSource, sources: dict[str, ModelSource], keys: tuple[str, ...]) -> list[str]:
    """One line per config key in which a source differs from the reference."""
    return [f"{ref}: {k}={s.config.get(k)!r} but {ref_src.ref} has {ref_src.config.get(k)!r}"
            for ref, s in sources.items() for k in keys if ref_src.config.get(k) != s.config.get(k)]


def _check_architecture(ref_src: ModelSource, sources: dict[str, ModelSource]) -> None:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    problems = config_mismatches(ref_src, sources, keys)
    if problems:
        raise MergelabError(
            "The models do not share one architecture, so their weights cannot be merged tensor by "
            f"tensor: {name_list(problems)}. Merge only fine-tunes of the same base model."
        )


def check_tokenizer_source(recipe: Recipe) -> None:
    if recipe.tokenizer_source not in (None, "base"):
        raise MergelabError(
            f"tokenizer_source `{recipe.tokenizer_source}` is not supported by mergelab; use "
            "`tokenizer_source: base` (embedding rows are cut or padded to the base model's vocabulary)."
        )


def build_plan(recipe: Recipe, sources: dict[str, ModelSource], *, seed: int | None = None) -> MergePlan:
    from operators import get_operator
    from operators.checks import raise_if_invalid

    layer_range = getattr(recipe, "_layer_range", None)
    if recipe.is_stack:
        from .stack import build_stack_plan

        return build_stack_plan(recipe, sources, seed=seed)
    if layer_range is not None and tuple(layer_range) != (0, sources[recipe.models[0].model].num_layers):
        # a single slice over part of the models: mergekit's output has only those layers
        from .stack import build_stack_plan, single_slice_as_stack

        return build_stack_plan(single_slice_as_stack(recipe), sources, seed=seed)
    op = get_operator(recipe.merge_method)
    reference = recipe.base_model or recipe.models[0].model
    ref_src = sources[reference]
    _check_architecture(ref_src, sources)
    L = ref_src.num_layers
    notes: list[str] = []
    out_dtype_name = recipe.out_dtype or recipe.dtype
    jobs: list[TensorJob] = []
    missing: list[str] = []
    mismatched: list[str] = []
    vocab_fix: set[str] = set()
    check_tokenizer_source(recipe)

    def locate(ref: str, name: str, shape) -> Read | None:
        src = sources[ref]
        if name in src.tensors:
            info = src.tensors[name]
        elif is_vocab_tensor(name) and "lm_head" in name and src.tie_word_embeddings:
            alias = next((e for e in EMBED_NAMES if e in src.tensors), None)
            if alias is None:
                missing.append(f"{name} in {ref}")
                return None
            info, name = src.tensors[alias], alias
        else:
            missing.append(f"{name} in {ref}")
            return None
        if tuple(info.shape) != tuple(shape):
            if is_vocab_tensor(name) and info.shape[1:] == tuple(shape[1:]):
                vocab_fix.add(ref)
            else:
                mismatched.append(f"{name}: {tuple(info.shape)} in {ref} vs {tuple(shape)} in {reference}")
                return None
        return Read(ref, name)

    for name, info in ref_src.tensors.items():
        layer = layer_of(name)
        t = (layer / (L - 1) if L and L > 1 else 0.0) if layer is not None else 0.0
        base = locate(recipe.base_model, name, info.shape) if recipe.base_model else None
        reads = [locate(m.model, name, info.shape) for m in recipe.models]
        floating = info.dtype.is_floating_point
        out_dtype = DTYPES[out_dtype_name] if (out_dtype_name and floating) else info.dtype
        model_params = []
        for m in recipe.models:
            mp = {}
            for spec in op.params:
                if spec.scope != "model":
                    continue
                mp[spec.name] = resolve_param(spec, [m.parameters, recipe.parameters], name, t)
            model_params.append(mp)
        params = {
            spec.name: resolve_param(spec, [recipe.parameters], name, t)
            for spec in op.params
            if spec.scope == "global"
        }
        raise_if_invalid(recipe.merge_method, name, model_params, params, recipe.base_index)
        jobs.append(
            TensorJob(
                name=name,
                shape=tuple(info.shape),
                out_dtype=out_dtype,
                layer=layer,
                t=t,
                base=base,
                models=reads,  # type: ignore[arg-type]
                model_params=model_params,
                params=params,
                copy=not floating,
                rows=info.shape[0] if is_vocab_tensor(name) else None,
            )
        )
    for ref, s in sources.items():
        extra = [n for n in s.tensors if n not in ref_src.tensors and not ("lm_head" in n and ref_src.tie_word_embeddings)]
        if extra:
            missing.extend(f"{n} in {reference} (present in {ref})" for n in extra)
    check_lined_up(missing, mismatched, "The models' tensors do not line up",
                   "All models must be fine-tunes of the same base with the same architecture; "
                   "check the model paths.")
    for ref in sorted(vocab_fix):
        notes.append(
            f"{ref} has a different vocabulary size; its embedding / lm_head rows are cut or padded "
            f"(with {reference}'s rows) to {reference}'s vocabulary (tokenizer_source: base)."
        )
    if seed is None:
        seed = recipe.seed if recipe.seed is not None else 0
    return MergePlan(recipe=recipe, jobs=jobs, reference=reference, num_layers=L, notes=notes, seed=seed)


def resolve_param(spec, layers: list[dict], tensor_name: str, t: float):
    for params in layers:
        if spec.name in params:
            v = resolve_value(params[spec.name], tensor_name, t)
            if v is not None:
                if spec.kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v)
                return v
    return spec.default


def check_lined_up(missing: list[str], mismatched: list[str], what: str, fix: str) -> None:
    """Raise one paragraph naming the missing tensors and shape mismatches, if there are any."""
    if not (missing or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {name_list(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {name_list(mismatched)}")
    raise MergelabError(f"{what}: " + "; ".join(parts) + ". " + fix)
