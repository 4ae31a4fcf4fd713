"""`mergelab eval`: score a model directory, a merge recipe (merged in memory) or a fusion recipe.

Prints one row per metric with its direction and the weighted combined score; --json saves it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import yaml

from ..errors import MergelabError


def _recipe_method(path: Path) -> str | None:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MergelabError(
            f"{path} is a file but not a YAML recipe ({e}). Give a model directory or a recipe YAML."
        ) from e
    if not isinstance(raw, dict):
        raise MergelabError(f"{path} is not a recipe: a recipe YAML is a mapping with `merge_method:` and `models:`.")
    method = raw.get("merge_method")
    return method if isinstance(method, str) else None


def load_for_eval(target: Path, device, scoring: str | None = None):
    """(LogitModel, tokenizer) for a model directory, a merge recipe or a logit_fusion recipe.

    `scoring` names a scorer that reads logits at every position (perplexity, multiple choice):
    a cross-tokenizer fusion recipe is refused for it before its weights load."""
    from ..eval.models import HFLogitModel, load_model

    if target.is_dir():
        model, tokenizer = load_model(target, device=device)
        return HFLogitModel(model, tokenizer), tokenizer
    if not target.is_file():
        raise MergelabError(
            f"{target} does not exist. Give a Hugging Face model directory or a recipe YAML file."
        )
    if _recipe_method(target) == "logit_fusion":
        from ..fusion import load_fusion

        return load_fusion(target, device=device, scoring=scoring)
    from ..trial import load_recipe_model

    model, tokenizer = load_recipe_model(target, device=device)
    model.eval()
    return HFLogitModel(model, tokenizer), tokenizer


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def render_table(result) -> str:
    rows = [("scorer", "metric", "value", "direction", "weight")]
    for scorer, weight in result.weights.items():
        for key, value in result.metrics.items():
            if key.startswith(scorer + "/"):
                rows.append((scorer, key[len(scorer) + 1:], _fmt(value), result.directions.get(key, "?") + " is better", ""))
        rows.append((scorer, f"score = {result.score_definitions[scorer]}", _fmt(result.scores[scorer]), "higher is better", _fmt(weight)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    rule = "sum of weight x score" if result.combine == "sum" else "weighted geometric mean of the scores"
    lines.append(f"combined score ({rule}, higher is better): {_fmt(result.combined)}")
    return "\n".join(lines)


@click.command("eval")
@click.argument("target", metavar="MODEL_DIR_OR_RECIPE", type=click.Path(path_type=Path))
@click.option("--eval", "eval_path", required=True, type=click.Path(path_type=Path), help="Eval spec YAML.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full result here as JSON.")
@click.option("--limit", type=int, help="Score at most N items per scorer (overrides the spec).")
@click.option("--batch-size", type=int, help="Rows per forward pass (overrides the spec).")
def eval_cmd(target: Path, eval_path: Path, device: str, json_path: Path | None, limit: int | None,
             batch_size: int | None) -> None:
    """Score a model directory or a recipe (merged in memory, nothing written) with an eval spec."""
    from ..eval.evaluator import Evaluator, load_data
    from ..eval.models import resolve_device
    from ..eval.spec import EvalSpec

    if batch_size is not None and batch_size < 1:
        raise MergelabError(f"--batch-size must be at least 1, got {batch_size}.")
    # Everything a user can get wrong in the spec or its data fails here, before any model work.
    spec = EvalSpec.load(eval_path).with_limit(limit)
    data = load_data(spec)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    positional = [s for s in spec.scorers if s.type in ("perplexity", "multiple_choice")]
    scoring = (f"the eval spec's {positional[0].type.replace('_', '-')} scorer '{positional[0].name}'"
               if positional else None)
    model, tokenizer = load_for_eval(target, dev, scoring)
    load_s = time.perf_counter() - t0
    evaluator = Evaluator(spec, tokenizer, device=model.device, batch_size=batch_size, data=data)
    from .progress import progress_bar

    steps = sum(len(getattr(s, "batches", None) or [None]) for s in evaluator.scorers)  # lm-eval: one step
    with progress_bar("eval", steps, unit="batches") as advance:
        result = evaluator.evaluate(model, report=lambda name, step, score: advance(1))
    result.timings["load"] = load_s
    click.echo(render_table(result))
    click.echo(f"({sum(result.counts.values())} items on {dev}; load {load_s:.1f}s, scoring {result.timings['total']:.1f}s)")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = result.to_dict()
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_path}")
