"""The data-flow search space (DFS) of evolutionary model merging (Akiba et al., arXiv 2403.13187):
which layers, in which order, a token passes through. The pool's layers are laid out `repeats`
times; each slot has an indicator (its logit is a searched number, on when > 0), jumps between
layers are damped by a scale per model pair, and a path becomes an ordinary passthrough recipe
(slices + `scale` filters) that `mergelab merge` and `mergekit-yaml` reproduce.

Candidates are built in memory from cached layers (mergelab.stack.StackBuilder, reached through
TrialMerger.apply), so a candidate costs references plus the scaled projections, no disk merge.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

from .space import ParamDef, Space

SCALED = ("o_proj", "down_proj")  # a layer's writes into the residual stream
# The indicators' logits (a slot is on when its logit is > 0) range over [-0.5, 1.5] on the
# identity path's slots and [-1.5, 0.5] elsewhere: the middle of the space, where CMA-ES starts,
# is the identity path, and σ₀ = 1/6 of the range flips each slot with probability ≈ 7%, a local
# search around the first model instead of random 50%-dense paths (which score 0 on the family).
ON, OFF = (-0.5, 1.5), (-1.5, 0.5)


@dataclass(frozen=True)
class PathStep:
    model: int  # index into the pool
    layer: int  # layer of that model
    scale: float  # 1.0: as it is


@dataclass
class DataflowSpace(Space):
    """A Space whose candidates are layer paths (the loop, run directory and dashboard use it
    like any other space; `path_of` gives the path a candidate's recipe encodes)."""

    pool: list[str] = field(default_factory=list)
    pool_layers: list[int] = field(default_factory=list)
    repeats: int = 3
    max_layers: int = 1
    scales: bool = True

    # -- layout ---------------------------------------------------------------------------------
    @property
    def slots(self) -> list[tuple[int, int, int]]:
        """(repeat, model, layer) in path order: every model's layers, the whole pool `repeats` times."""
        return [(r, m, l) for r in range(self.repeats) for m in range(len(self.pool))
                for l in range(self.pool_layers[m])]

    def size_text(self) -> str:
        return (f"{len(self.params)} searched numbers (data flow: {len(self.slots)} slots = "
                f"{len(self.pool)} models x layers x {self.repeats} repeats, path of at most {self.max_layers} layers)")

    def method_of(self, values: dict[str, float]) -> str:
        return "passthrough"

    def path_of(self, values: dict[str, float]) -> list[PathStep]:
        on = [(k, float(values[_slot_name(*s)])) for k, s in enumerate(self.slots) if float(values[_slot_name(*s)]) > 0]
        if not on:  # an empty model does not exist: the most likely slot alone
            k = max(range(len(self.slots)), key=lambda i: (float(values[_slot_name(*self.slots[i])]), -i))
            on = [(k, 0.0)]
        if len(on) > self.max_layers:  # the budget keeps the slots the optimizer is surest of
            on = sorted(sorted(on, key=lambda kv: -kv[1])[: self.max_layers])
        steps: list[PathStep] = []
        for k, _ in on:
            _, m, l = self.slots[k]
            prev = steps[-1] if steps else None
            jump = prev is not None and not (prev.model == m and prev.layer + 1 == l)
            scale = float(values[_scale_name(prev.model, m)]) if (jump and self.scales) else 1.0
            steps.append(PathStep(m, l, scale))
        return steps

    def path_record(self, values: dict[str, float]) -> list[list[Any]]:
        """The trial record's `path`: [[model reference, layer, scale], ...] in the order a token
        passes through them."""
        return [[self.pool[s.model], s.layer, s.scale] for s in self.path_of(values)]

    def recipe(self, values: dict[str, float]) -> dict[str, Any]:
        return stack_recipe(self.path_of(values), self.pool, self.recipe_extra)

    def identity_values(self) -> dict[str, float]:
        """Trial 0: the first model of the pool as it is (its layers once, no scaling)."""
        out = {}
        for p in self.params:
            if p.kind == "slot":
                out[p.name] = (p.low + p.high) / 2
            else:
                out[p.name] = 1.0 if p.low <= 1.0 <= p.high else (p.low + p.high) / 2
        return out

    def values_from_recipe(self, recipe) -> tuple[dict[str, float], list[str]]:
        raise MergelabError(
            "search config: `warm_start` does not apply to a data-flow search; its trial 0 is the "
            "identity path. To start the data flow from a merge, set `dataflow.ps_recipe`."
        )


def _slot_name(repeat: int, model: int, layer: int) -> str:
    return f"slot.r{repeat}.m{model}.l{layer}"


def _scale_name(a: int, b: int) -> str:
    return f"scale.m{a}.m{b}"


def stack_recipe(path: list[PathStep], pool: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A path as a passthrough recipe: runs of consecutive layers of one model become one slice;
    a scaled layer is a slice of its own with `scale` on its o_proj / down_proj."""
    slices: list[dict[str, Any]] = []
    run: list[PathStep] = []

    def flush() -> None:
        if not run:
            return
        sl: dict[str, Any] = {"sources": [{"model": pool[run[0].model],
                                           "layer_range": [run[0].layer, run[-1].layer + 1]}]}
        if run[0].scale != 1.0:
            sl["parameters"] = {"scale": [{"filter": f, "value": run[0].scale} for f in SCALED] + [{"value": 1.0}]}
        slices.append(sl)
        run.clear()

    for s in path:
        if run and (s.scale != 1.0 or run[-1].scale != 1.0 or s.model != run[-1].model or s.layer != run[-1].layer + 1):
            flush()
        run.append(s)
    flush()
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    for k, v in (extra or {}).items():
        recipe[k] = copy.deepcopy(v)
    return recipe


def _layers_of(path: Path, where: str) -> int:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise MergelabError(f"{where}: {path} has no readable config.json.") from None
    cfg = cfg.get("text_config", cfg)
    n = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)
    if n is None:
        raise MergelabError(f"{where}: {path}/config.json gives no layer count (num_hidden_layers).")
    return n


def build_dataflow_space(cfg, base_path: Path | None = None) -> DataflowSpace:
    """Check the `dataflow:` block (paths made absolute in place, so the run's resolved config
    holds them) and lay out the space. Reads configs only; the PS merge is made by ensure_ps_model."""
    from mergelab.recipe import load_recipe
    from mergelab.sources import resolve_local_path

    df = cfg.dataflow
    if cfg.warm_start is not None:
        raise MergelabError(
            "search config: `warm_start` does not apply with `dataflow`; trial 0 is the identity path "
            "(the first model as it is). To start the data flow from a merge, set `dataflow.ps_recipe`."
        )
    if cfg.fusion is not None or cfg.layer_sources:
        raise MergelabError("search config: `dataflow` searches layer paths; it does not combine with "
                            "`fusion` or `layer_sources`. Remove those keys.")
    lo, hi = df.scale_range
    if not (0 < lo < hi):
        raise MergelabError(f"search config `dataflow.scale_range`: {[lo, hi]} must be two numbers 0 < low < high.")
    if (df.ps_recipe is None) != (df.ps_model is None):
        raise MergelabError(
            "search config `dataflow`: `ps_recipe` (the parameter-space merge to start from) and "
            "`ps_model` (the directory it is merged into, once) go together; give both or neither."
        )
    pool: list[str] = []
    layers: list[int] = []
    if df.ps_recipe is not None:
        rp = Path(df.ps_recipe).resolve()
        r = load_recipe(rp, f"dataflow.ps_recipe {rp}")
        if r.is_stack:
            raise MergelabError(f"search config `dataflow.ps_recipe`: {rp} is a layer stack; give a parameter-space merge recipe.")
        df.ps_recipe, df.ps_model = str(rp), str(Path(df.ps_model).resolve())
        first = r.base_model or r.models[0].model
        pool.append(df.ps_model)
        layers.append(_layers_of(resolve_local_path(first), "dataflow.ps_recipe"))
    for ref in cfg.models:
        pool.append(ref)
        layers.append(_layers_of(resolve_local_path(ref), f"search config model {ref}"))
    widths = {json.dumps({k: json.loads((resolve_local_path(ref) / "config.json").read_text()).get(k)
                          for k in ("model_type", "hidden_size")}) for ref in cfg.models}
    if len(widths) > 1:
        raise MergelabError(f"search config `dataflow`: the models' widths differ ({sorted(widths)}); "
                            "layers can be stacked only across models of one architecture and width.")
    max_layers = df.max_layers or 2 * layers[0]
    params: list[ParamDef] = []
    for r in range(df.repeats):
        for m, n in enumerate(layers):
            for l in range(n):
                lo_hi = ON if (r == 0 and m == 0) else OFF
                params.append(ParamDef(_slot_name(r, m, l), *lo_hi, "slot", model=m, group=r))
    if df.scales:
        for a in range(len(pool)):
            for b in range(len(pool)):
                params.append(ParamDef(_scale_name(a, b), lo, hi, "scale", model=b, group=a))
    return DataflowSpace(
        base_model=cfg.base_model, models=list(cfg.models), methods=["passthrough"], num_layers=layers[0],
        layer_groups=1, filters=[], io_names=[], io_group=False, layer_sources=False, params=params,
        recipe_extra=dict(cfg.recipe), seed=cfg.seed, pool=pool, pool_layers=layers, repeats=df.repeats,
        max_layers=max_layers, scales=df.scales,
    )


def ensure_ps_model(cfg, log=None) -> None:
    """PS + DFS: merge `ps_recipe` into `ps_model` once (the streaming engine, atomic); an existing
    ps_model must hold that very recipe, or the search would stack layers of another model."""
    from mergelab.engine import RECIPE_FILE, merge_to_dir
    from mergelab.recipe import load_recipe

    df = cfg.dataflow
    if df is None or df.ps_recipe is None:
        return
    out = Path(df.ps_model)
    want = load_recipe(df.ps_recipe).to_dict()
    if out.exists():
        have = out / RECIPE_FILE
        got = load_recipe(have).to_dict() if have.is_file() else None
        strip = lambda d: {k: v for k, v in (d or {}).items() if k not in ("dtype", "out_dtype", "seed")}  # noqa: E731
        if got is None or strip(got) != strip(want):
            raise MergelabError(
                f"search config `dataflow.ps_model`: {out} exists but was not merged from "
                f"{df.ps_recipe}. Point ps_model at a new directory (it is merged there once) or remove it."
            )
        return
    if log:
        log(f"dataflow: merging the parameter-space recipe {df.ps_recipe} into {out} (once)")
    merge_to_dir(df.ps_recipe, out, device=cfg.device)
