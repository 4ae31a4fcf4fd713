"""Layer stacking (mergekit's `slices`): the plan of a model built from layer ranges of several
models laid end to end, each slice merged with the recipe's operator (passthrough: copied, or
scaled). Output layers are renumbered from 0; embeddings come from the first slice's sources,
the final norm and head from the last slice's; config.json gets the new layer count."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import MergelabError, name_list
from .plan import (
    check_lined_up,
    DTYPES,
    config_mismatches,
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
    problems = config_mismatches(reference, sources, keys)
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
    check_lined_up(missing, mismatched, "The stacked layers do not line up with their sources",
                   "Every layer of a stack must have the reference model's tensors and shapes; check the models.")
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



class StackBuilder:
    """Layer-stacked candidates in memory (the data-flow search's merger): the model's parameters
    are references to the source models' tensors, read once and kept on the device; only a scaled
    tensor (passthrough `scale` other than 1) gets a copy. It follows the stack plan, so a
    candidate equals what `mergelab merge` writes for the same recipe (same dtype rounding)."""

    def __init__(self, refs: list[str], *, device="auto", model_dtype=None, sources: dict[str, ModelSource] | None = None):
        import torch

        from .engine import resolve_device
        from .sources import open_sources

        self.refs = list(refs)
        self.sources = sources or open_sources(self.refs)
        self.device = resolve_device(device)
        self.model_dtype = model_dtype or torch.float32
        self._tensors: dict[tuple[str, str], object] = {}
        self._rotary: dict[tuple[str, str], object] = {}
        self._tokenizer = None
        self.last_stats: dict[str, float] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            first = self.refs[0] if self.refs else next(iter(self.sources))
            self._tokenizer = AutoTokenizer.from_pretrained(self.sources[first].path, trust_remote_code=False)
        return self._tokenizer

    def plan(self, recipe) -> MergePlan:
        from .recipe import load_recipe

        from .sources import open_sources

        r = load_recipe(recipe)
        new = [k for k in r.all_refs() if k not in self.sources]
        if new:  # a model first used by this candidate (e.g. a parameter-space merge's output)
            self.sources.update(open_sources(new))
        return build_stack_plan(r, {k: self.sources[k] for k in r.all_refs()})

    def _source(self, ref: str, name: str):
        key = (ref, name)
        t = self._tensors.get(key)
        if t is None:
            t = self.sources[ref].get(name).to(device=self.device, dtype=self.model_dtype)
            self._tensors[key] = t
        return t

    def _value(self, job: TensorJob, plan: MergePlan):
        """The job's tensor as the model holds it: the cached source itself, or (scaled, or cut
        to another vocabulary) the disk merge's arithmetic: float32, rounded to the output dtype."""
        import torch

        read = job.models[0]
        src = self._source(read.ref, read.tensor)
        from operators import get_operator

        stacking = get_operator(plan.recipe.merge_method).layer_stacking
        scale = job.model_params[0].get("scale") if stacking else None
        exact = scale is None and (job.rows is None or src.shape[0] == job.rows)
        if exact and src.dtype == self.model_dtype and job.out_dtype == self.sources[read.ref].tensors[read.tensor].dtype:
            return src
        from .engine import fit_rows

        x = fit_rows(src, job.rows, None).to(torch.float32)
        if scale is not None:
            x = x * float(scale)
        return x.to(job.out_dtype).to(self.model_dtype)

    def _rotary_for(self, module, config, reference: str):
        key = (type(module).__name__, reference)  # the rotary tables depend on the config only
        if key not in self._rotary:
            import torch

            with torch.device(self.device):
                self._rotary[key] = type(module)(config=config)
        return self._rotary[key]

    def build(self, recipe):
        """The candidate model (transformers, eval mode) for a passthrough stack recipe."""
        import time

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        t0 = time.perf_counter()
        plan = self.plan(recipe)
        from operators import get_operator

        if not get_operator(plan.recipe.merge_method).layer_stacking:
            raise MergelabError(
                f"The stack builder builds passthrough stacks; this recipe merges with "
                f"`{plan.recipe.merge_method}`. Merge it with the trial merger or `mergelab merge`."
            )
        config = AutoConfig.from_pretrained(self.sources[plan.reference].path, trust_remote_code=False)
        text = getattr(config, "text_config", None) or config
        for k, v in plan.config_updates.items():
            if k != "text_config":
                setattr(text, k, v)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.model_dtype)
        params = dict(model.named_parameters())
        for job in plan.jobs:
            if job.name not in params:
                continue  # an lm_head the config ties to the embeddings
            owner, leaf = _owner(model, job.name)
            owner._parameters[leaf] = torch.nn.Parameter(self._value(job, plan), requires_grad=False)
        if getattr(text, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            model.lm_head._parameters["weight"] = model.get_input_embeddings().weight
        for name, mod in model.named_modules():
            if any(b is not None and b.is_meta for b in mod._buffers.values()):
                if "Rotary" not in type(mod).__name__:
                    raise MergelabError(f"The stacked model's module {name} ({type(mod).__name__}) has buffers "
                                        "the stack builder cannot rebuild; merge the recipe to disk instead.")
                parent, leaf = _owner(model, name)
                parent._modules[leaf] = self._rotary_for(mod, text, plan.reference)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise MergelabError(f"The stack plan leaves {len(left)} parameter(s) unset ({left[:3]}); "
                                "the model's checkpoint and config disagree.")
        model.eval()
        self.last_stats = {"build_seconds": time.perf_counter() - t0, "layers": float(plan.num_layers or 0),
                           "tensors": float(sum(1 for job in plan.jobs if job.name in params))}
        return model

    apply = build


def _owner(model, name: str):
    """(module holding the dotted `name`'s last part, that part)."""
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
    return mod, parts[-1]
