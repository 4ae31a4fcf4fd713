"""The Evaluator: builds every scorer once from an EvalSpec and scores any LogitModel with it.

Data is read, checked and tokenized once; a search calls evaluate() for each candidate.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..errors import MergelabError
from .data import read_exact_match, read_multiple_choice, read_perplexity
from .protocol import LogitModel
from .scorers import HIGHER, ExactMatchScorer, MultipleChoiceScorer, PerplexityScorer, Scorer
from .spec import EvalSpec, ExactMatchScorerSpec, LmEvalScorerSpec, MultipleChoiceScorerSpec, PerplexityScorerSpec

Report = Callable[[str, int, float], None]


@dataclass
class EvalResult:
    """Every metric, each scorer's higher-is-better score, and their weighted sum."""

    metrics: dict[str, float]  # "scorer/metric" -> value, in the metric's own units
    scores: dict[str, float]  # scorer -> value used in the combination (higher is better)
    combined: float  # the spec's combine rule over the scores (default: sum of weight * score)
    directions: dict[str, str]  # metric -> "higher" | "lower" (which way is better)
    weights: dict[str, float] = field(default_factory=dict)
    score_definitions: dict[str, str] = field(default_factory=dict)  # scorer -> what its score is
    counts: dict[str, int] = field(default_factory=dict)  # scorer -> items scored
    timings: dict[str, float] = field(default_factory=dict)  # scorer -> seconds, plus "total"
    combine: str = "sum"  # the spec's rule that made `combined`

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["combined_direction"] = HIGHER
        return d


def combine(scores: dict[str, float], weights: dict[str, float], how: str = "sum") -> float:
    """The combined score of `scores` (scorer -> score) under the spec's `combine` rule."""
    if how == "sum":
        return sum(weights[k] * v for k, v in scores.items())
    if any(v < 0 or v > 1 for v in scores.values()):
        bad = ", ".join(f"{k} = {v:g}" for k, v in scores.items() if v < 0 or v > 1)
        raise MergelabError(
            f"combine: geometric needs every score in [0, 1], but got {bad}. Use combine: sum in "
            "the eval spec, or scorers whose score is a fraction (accuracy, answer_prob)."
        )
    if any(v == 0 for v in scores.values()):
        return 0.0
    total = sum(weights[k] for k in scores)
    return math.exp(sum(weights[k] * math.log(v) for k, v in scores.items()) / total)


def load_data(spec: EvalSpec) -> dict[str, Any]:
    """Read and check every scorer's data (and load lm-eval tasks): the part that can fail on
    user input, done before any model is loaded."""
    data: dict[str, Any] = {}
    for s in spec.scorers:
        if isinstance(s, PerplexityScorerSpec):
            data[s.name] = read_perplexity(s)
        elif isinstance(s, MultipleChoiceScorerSpec):
            data[s.name] = read_multiple_choice(s)
        elif isinstance(s, ExactMatchScorerSpec):
            data[s.name] = read_exact_match(s)
        elif isinstance(s, LmEvalScorerSpec):
            from .lmeval import load_tasks

            data[s.name] = load_tasks(s)
    return data


def _build(s, tokenizer, device, batch_size, items) -> Scorer:
    if isinstance(s, PerplexityScorerSpec):
        return PerplexityScorer(s, tokenizer, device, batch_size, items)
    if isinstance(s, MultipleChoiceScorerSpec):
        return MultipleChoiceScorer(s, tokenizer, device, batch_size, items)
    if isinstance(s, ExactMatchScorerSpec):
        return ExactMatchScorer(s, tokenizer, device, batch_size, items)
    from .lmeval import LmEvalScorer

    return LmEvalScorer(s, tokenizer, device, batch_size, items)


class Evaluator:
    """Scores LogitModels with one EvalSpec; build once, call evaluate() per candidate."""

    def __init__(
        self,
        spec: EvalSpec,
        tokenizer,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        data: dict[str, Any] | None = None,
    ):
        from .models import resolve_device

        self.spec = spec
        device = resolve_device(device)
        data = data if data is not None else load_data(spec)
        self.scorers: list[Scorer] = [
            _build(s, tokenizer, device, s.batch_size or batch_size or spec.batch_size, data[s.name])
            for s in spec.scorers
        ]

    def evaluate(self, model: LogitModel, report: Report | None = None) -> EvalResult:
        """Run every scorer. `report(scorer, step, running score)` is called after each batch and
        may raise to abort the evaluation (the exception propagates to the caller)."""
        metrics, scores, directions, timings = {}, {}, {}, {}
        start = time.perf_counter()
        for scorer in self.scorers:
            t0 = time.perf_counter()
            # inference_mode for every LogitModel, not only HFLogitModel: no autograd graph is
            # ever needed while scoring, and fused or merged models skip its bookkeeping too.
            with torch.inference_mode():
                m, score = scorer.run(model, report)
            timings[scorer.name] = time.perf_counter() - t0
            metrics.update(m)
            scores[scorer.name] = score
            directions.update(scorer.directions)
        timings["total"] = time.perf_counter() - start
        return EvalResult(
            metrics=metrics,
            scores=scores,
            combined=combine(scores, {s.name: s.weight for s in self.scorers}, self.spec.combine),
            directions=directions,
            weights={s.name: s.weight for s in self.scorers},
            score_definitions={s.name: s.score_definition for s in self.scorers},
            counts={s.name: s.n_items for s in self.scorers},
            timings=timings,
            combine=self.spec.combine,
        )
