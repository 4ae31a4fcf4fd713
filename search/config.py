"""The search config (YAML): base, sources, operator(s), searched ranges, layer groups, eval, optimizer.

`load_search_config` parses it with pydantic and `validate_search_config` checks everything a
search needs (ranges, parameter names against the operator registry, files) before any trial.

Example::

    base_model: mergelab/demo/family/base
    models: [mergelab/demo/family/addition, mergelab/demo/family/sort, mergelab/demo/family/reverse]
    method: ties                     # default tsv; or a list to choose from: [tsv, ties, dare_ties]
    space:
      weight: [0, 1.5]               # model parameter: one value per model (x layer groups)
      density: [0.1, 1.0]
      lambda: [0.5, 2.0]             # global parameter: one value
      normalize: true                # a plain value is fixed, not searched
      gamma:                         # no range: the operator registry's search_range
    model_space:                     # per-model overrides, by model reference
      mergelab/demo/family/sort: {weight: [0, 1.0]}
    layer_groups: 4                  # K contiguous groups of transformer layers
    filters: [self_attn, mlp]        # optional: separate values per tensor family
    io_group: false                  # embeddings/head/final norm: tied to the first group
    layer_sources: false             # per group: the merge, or one model's layers
    eval: mergelab/demo/data/eval_val.yml    # or an inline eval spec mapping
    test_eval: mergelab/demo/data/eval_test.yml   # optional held-out spec, never a fitness
    optimizer: {name: cmaes, popsize: null, sigma0: null}   # or just `cmaes`
    budget: {trials: 100, timeout: null}
    seed: 0
    device: cpu
    warm_start: null                 # a recipe YAML enqueued as the first trial
    pruner: null                     # or median / {name: median, n_warmup_steps: 1}
    recipe: {dtype: float32}         # fixed keys copied into every candidate recipe
    fusion: null                     # or a hybrid: {weighting: [sim, opt, uniform, top1],
                                     #   tau: [0.1, 5.0], members: [merge, sources]}

Fusion (optional, off by default): each candidate becomes the merge recipe PLUS an inference-time
logit fusion (mergelab.fusion, PackLLM) over `members` — `merge` (the candidate's merged model),
`sources` (the fine-tunes in `models`), `base` (the base model). `weighting` and `tau` are fixed
(one value) or searched (a list of weightings to choose from; a range [low, high] of tau > 0).

Layer groups: with L transformer layers and K groups, group k covers layers
[floor(k L / K), floor((k+1) L / K)); a candidate's K values become a per-layer gradient list of
L values (mergekit's gradient evaluated exactly at each layer). Tensors outside the layers
(embeddings, lm_head, final norm) resolve at t = 0 in mergekit's rule, so they are TIED TO THE
FIRST GROUP; `io_group: true` gives them their own value (filter entries naming each of those
tensors). With `filters: [f1, f2]`, each filter gets its own K values and tensors that match no
filter (layer norms) a further "other" set: (len(filters) + 1) x K values per model parameter.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergelab.errors import MergelabError, pydantic_problems

from .dataflow_config import DataflowConfig

OPTIMIZERS = ("cmaes", "gp", "tpe", "random", "nsga2", "pycma")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband")
FUSION_WEIGHTINGS = ("sim", "opt", "uniform", "top1")  # as mergelab.fusion.WEIGHTINGS
FUSION_MEMBERS = ("merge", "sources", "base")

Range = list[float]


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["cmaes", "gp", "tpe", "random", "nsga2", "pycma"] = "cmaes"
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float | None = Field(default=None, gt=0)  # in the normalized [0, 1] space
    n_startup_trials: int | None = Field(default=None, ge=0)  # tpe and gp: random trials first


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0)  # seconds of search time, over sessions


class PrunerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["median", "percentile", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    percentile: float = 25.0


class FusionSearchConfig(BaseModel):
    """`fusion:` — the hybrid candidate (merge + logit fusion over it and other models)."""

    model_config = ConfigDict(extra="forbid")
    weighting: Union[str, list[str]] = "sim"
    tau: Union[float, list[float]] = 1.0
    members: list[str] = Field(default_factory=lambda: ["merge", "sources"])
    grid_step: float = Field(default=0.05, gt=0, le=1)

    @property
    def weightings(self) -> list[str]:
        return [self.weighting] if isinstance(self.weighting, str) else list(self.weighting)


class SearchConfig(BaseModel):
    """A search config as read from YAML (before validation against registry and disk)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    models: list[str] = Field(min_length=1)
    # tsv by default: on the real family (benchmarks/README.md, issue 17) the only operator whose
    # searched merges keep every fine-tune's skill at once
    method: Union[str, list[str]] = "tsv"
    space: dict[str, Any] = Field(default_factory=dict)
    model_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    layer_groups: int = Field(default=1, ge=1)
    filters: list[str] | None = None
    io_group: bool = False
    layer_sources: bool = False
    eval: Union[str, dict[str, Any]]
    # Held-out items the search never scores: the best trial and the source models are scored on
    # them when the search ends and on export/push, and those are the numbers the card reports.
    test_eval: Union[str, dict[str, Any], None] = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(trials=20))
    seed: int = 0
    device: str = "cpu"
    warm_start: str | None = None
    pruner: PrunerConfig | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    fusion: FusionSearchConfig | None = None
    dataflow: DataflowConfig | None = None  # the data-flow search (search/dataflow.py)

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion_switch(cls, v):
        if v in (None, False, "off", "none"):
            return None
        return {} if v is True else v

    @field_validator("optimizer", mode="before")
    @classmethod
    def _opt_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_str(cls, v):
        if v in (None, False, "off", "none"):
            return None
        return {"name": v} if isinstance(v, str) else v

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


def parse_search_config(data: Any, where: str = "search config") -> SearchConfig:
    if not isinstance(data, dict):
        raise MergelabError(
            f"{where} must be a YAML mapping with at least `base_model`, `models` and `eval`."
        )
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        raise MergelabError(
            f"Invalid {where}: {pydantic_problems(e)}. See `search/config.py` for the fields "
            "(base_model, models, method, space, layer_groups, eval, optimizer, budget, seed, fusion...)."
        ) from None


def load_search_config(path: str | Path) -> tuple[SearchConfig, str]:
    """The parsed config and its text as given (frozen into the run directory)."""
    p = Path(path)
    if not p.is_file():
        raise MergelabError(
            f"The search config {p} does not exist. Give the path of a search YAML "
            f"(relative paths are read from {Path.cwd()})."
        )
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergelabError(f"The search config {p} is not valid YAML: {e}. Fix the syntax and retry.") from None
    cfg = parse_search_config(data, f"search config {p}")
    return cfg, text


def _range(value: Any, field: str) -> tuple[float, float] | None:
    """[lo, hi] -> (lo, hi); a plain value -> None (fixed); raises on a malformed range."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise MergelabError(
                f"search config: `{field}` must be a range [low, high] of two finite numbers, got "
                f"{value!r}."
            )
        lo, hi = float(value[0]), float(value[1])
        if lo >= hi:
            raise MergelabError(
                f"search config: the range `{field}: [{value[0]}, {value[1]}]` is reversed or empty "
                f"(low must be below high). Write it as [{min(lo, hi):g}, {max(lo, hi):g}], or give "
                "a single value to fix the parameter."
            )
        return lo, hi
    return None
