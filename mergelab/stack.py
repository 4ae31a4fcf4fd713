"""Layer stacking (mergekit's `slices`): the plan of a model built from layer ranges of several
models laid end to end, each slice merged with the recipe's operator (passthrough: copied, or
scaled). Output layers are renumbered from 0; embeddings come from the first slice's sources,
the final norm and head from the last slice's; config.json gets the new layer count."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import MergelabError, name_list
from .plan import (
    DTYPES,
    EMBED_NAMES,
    LAYER_RE,
    MergePlan,
    Read,
    TensorJob,
    check_tokenizer_source,
    is_vocab_tensor,
    layer_of,
    resolve_param,
)
from .recipe import Recipe, SliceDef, SliceSource
from .sources import ModelSource

# the tensors before the first layer (mergekit's "pre weights"); every other tensor outside
# the layers (final norm, head) is a "post weight", taken from the last slice
_PRE = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def with_layer(name: str, layer: int) -> str:
    """`name` with its layer number replaced (model.layers.3.mlp... -> model.layers.<layer>.mlp...)."""
    m = LAYER_RE.search(name)
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


def is_pre_weight(name: str) -> bool:
    return any(p in name for p in _PRE)


@dataclass(frozen=True)
class OutputLayer:
    """One layer of the stacked model: which layer of each source feeds it, and its t."""

    index: int  # output layer number
    slice_index: int
    sources: tuple[tuple[str, int], ...]  # (model ref, source layer) per slice source
    t: float  # position inside the slice, for gradients (mergekit: idx/(n-1), 1 when n = 1)


def output_layers(recipe: Recipe) -> list[OutputLayer]:
    out: list[OutputLayer] = []
    for si, sl in enumerate(recipe.slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            srcs = tuple((src.model, src.layer_range[0] + k) for src in sl.sources)
            out.append(OutputLayer(len(out), si, srcs, t))
    return out


def single_slice_as_stack(recipe: Recipe) -> Recipe:
    """A `models:` recipe converted from one mergekit slice over part of the layers, back as a
    stack (its slice parameters were folded into the global ones)."""
    a, b = recipe._layer_range  # type: ignore[attr-defined]
    sl = SliceDef(sources=[SliceSource(model=m.model, layer_range=(a, b), parameters=m.parameters) for m in recipe.models])
    return recipe.model_copy(update={"slices": [sl], "models": []})


def _check_stackable(reference: ModelSource, sources: dict[str, ModelSource]) -> None:
    """Layers of different models can follow each other when their widths agree; the depth may differ."""
    keys = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    problems = []
    for ref, s in sources.items():
        for k in keys:
            a, b = reference.config.get(k), s.config.get(k)
            if a != b:
                problems.append(f"{ref}: {k}={b!r} but {reference.ref} has {a!r}")
    if problems:
        raise MergelabError(
            "The models' layers cannot be stacked: their shapes differ "
            f"({name_list(problems)}). Stack layers only of models with one architecture and width."
        )


def build_stack_plan(recipe: Recipe, sources: dict[str, ModelSource], *, seed: int | None = None) -> MergePlan:
    from operators import get_operator
    from operators.checks import raise_if_invalid

    check_tokenizer_source(recipe)
    op = get_operator(recipe.merge_method)
    reference = recipe.base_model or recipe.slices[0].sources[0].model
    ref_src = sources[reference]
    _check_stackable(ref_src, sources)
    bad_range = []
    for si, sl in enumerate(recipe.slices):
        for src in sl.sources:
            n = sources[src.model].num_layers
            if n is None or src.layer_range[1] > n:
                bad_range.append(f"slices[{si}] {src.model}: layer_range {list(src.layer_range)} but it has {n} layers")
    if bad_range:
        raise MergelabError(
            f"The recipe takes layers a model does not have: {name_list(bad_range)}. layer_range is "
            "[first, end) with end at most the model's num_hidden_layers; fix the ranges."
        )
    layer_templates = [n for n in ref_src.tensors if layer_of(n) == 0]
    if not layer_templates:
        raise MergelabError(
            f"{reference} has no tensors named by layer (model.layers.N...), so its layers cannot be "
            "stacked. Layer stacking needs a decoder with numbered layers."
        )
    out_dtype_name = recipe.out_dtype or recipe.dtype
    bi = recipe.base_index
    missing: list[str] = []
    mismatched: list[str] = []
    vocab_fix: set[str] = set()
    jobs: list[TensorJob] = []

    def locate(ref: str, name: str, shape) -> Read | None:
        src = sources[ref]
        if name in src.tensors:
            info = src.tensors[name]
        elif "lm_head" in name and src.tie_word_embeddings and any(e in src.tensors for e in EMBED_NAMES):
            name = next(e for e in EMBED_NAMES if e in src.tensors)
            info = src.tensors[name]
        else:
            missing.append(f"{name} in {ref}")
            return None
        if tuple(info.shape) != tuple(shape):
            if is_vocab_tensor(name) and tuple(info.shape[1:]) == tuple(shape[1:]):
                vocab_fix.add(ref)
            else:
                mismatched.append(f"{name}: {tuple(info.shape)} in {ref} vs {tuple(shape)} in {reference}")
                return None
        return Read(ref, name)

    def add(out_name: str, info, slice_index: int, src_names: list[str], t: float, layer: int | None):
        sl = recipe.slices[slice_index]
        reads = [locate(src.model, sn, info.shape) for src, sn in zip(sl.sources, src_names)]
        model_params = [
            {spec.name: resolve_param(spec, [src.parameters, sl.parameters, recipe.parameters], out_name, t)
             for spec in op.params if spec.scope == "model"}
            for src in sl.sources
        ]
        params = {spec.name: resolve_param(spec, [sl.parameters, recipe.parameters], out_name, t)
                  for spec in op.params if spec.scope == "global"}
        raise_if_invalid(recipe.merge_method, out_name, model_params, params, bi)
        floating = info.dtype.is_floating_point
        jobs.append(TensorJob(
            name=out_name, shape=tuple(info.shape),
            out_dtype=DTYPES[out_dtype_name] if (out_dtype_name and floating) else info.dtype,
            layer=layer, t=t, base=reads[bi] if bi is not None else None, models=reads,  # type: ignore[arg-type]
            model_params=model_params, params=params, copy=not floating,
            rows=info.shape[0] if is_vocab_tensor(out_name) else None,
        ))

    outside = [n for n in ref_src.tensors if layer_of(n) is None]
    last = len(recipe.slices) - 1
    for name in (n for n in outside if is_pre_weight(n)):
        add(name, ref_src.tensors[name], 0, [name] * len(recipe.slices[0].sources), 0.0, None)
    layers = output_layers(recipe)
    for ol in layers:
        for tmpl in layer_templates:
            add(with_layer(tmpl, ol.index), ref_src.tensors[tmpl], ol.slice_index,
                [with_layer(tmpl, src_layer) for _, src_layer in ol.sources], ol.t, ol.index)
    for name in (n for n in outside if not is_pre_weight(n)):
        add(name, ref_src.tensors[name], last, [name] * len(recipe.slices[last].sources), 0.0, None)
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {name_list(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {name_list(mismatched)}")
        raise MergelabError(
            "The stacked layers do not line up with their sources: " + "; ".join(parts) + ". Every "
            "layer of a stack must have the reference model's tensors and shapes; check the models."
        )
    notes = [
        f"{ref} has a different vocabulary size; its embedding / lm_head rows are cut or padded "
        f"(with {reference}'s rows) to {reference}'s vocabulary (tokenizer_source: base)."
        for ref in sorted(vocab_fix)
    ]
    cfg = ref_src.config.get("text_config", ref_src.config)
    key = next((k for k in _LAYER_KEYS if isinstance(cfg.get(k), int)), "num_hidden_layers")
    updates = {key: len(layers)}
    if "text_config" in ref_src.config:
        updates = {"text_config": {**ref_src.config["text_config"], key: len(layers)}}
    if seed is None:
        seed = recipe.seed if recipe.seed is not None else 0
    return MergePlan(recipe=recipe, jobs=jobs, reference=reference, num_layers=len(layers), notes=notes,
                     seed=seed, config_updates=updates)

