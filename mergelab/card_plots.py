"""The model card's pictures: the search's score by trial and the recipe's parameters as a heat
map, PNG files beside the weights that the card shows on the Hub.

matplotlib is an optional extra (`pip install mergelab[plots]`); without it `card_images`
returns nothing and the card keeps its text chart and YAML recipe only.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, NamedTuple

IMAGE_FILES = {"scores": "mergelab_scores.png", "recipe": "mergelab_recipe.png"}


class HeatRow(NamedTuple):
    label: str  # "ft_a · weight · self_attn"
    values: list[float]  # one per layer group


def _short(ref: str) -> str:
    return Path(ref.split("@", 1)[0].rstrip("/")).name or ref


def _numbers(value: Any) -> list[float] | None:
    """A scalar or a gradient as floats; None for anything else (bools, strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def _spread(values: list[float], k: int) -> list[float]:
    """A gradient of any length read at k evenly spaced layer positions (mergekit's interpolation)."""
    if len(values) == 1:
        return values * k
    out = []
    for j in range(k):
        x = j / (k - 1) * (len(values) - 1) if k > 1 else 0.0
        i0 = min(int(x), len(values) - 2)
        out.append(values[i0] + (x - i0) * (values[i0 + 1] - values[i0]))
    return out


def recipe_rows(recipe: dict) -> list[HeatRow]:
    """The recipe's numeric parameters, one row per model, parameter and filter, spread over as
    many columns as the longest gradient has points (the layer groups)."""
    raw: list[tuple[str, list[float]]] = []

    def add(prefix: str, params: dict) -> None:
        for name, value in (params or {}).items():
            if isinstance(value, dict):
                value = [value]
            if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
                for e in value:
                    nums = _numbers(e.get("value"))
                    if nums is not None:
                        raw.append((f"{prefix} · {name} · {e.get('filter') or 'other'}", nums))
                continue
            nums = _numbers(value)
            if nums is not None:
                raw.append((f"{prefix} · {name}", nums))

    add("all", recipe.get("parameters") or {})
    for entry in recipe.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            add(_short(entry["model"]), entry.get("parameters") or {})
    k = max((len(v) for _, v in raw), default=1)
    return [HeatRow(label, _spread(v, k)) for label, v in raw]


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_points(scores: list | None) -> list[tuple[int, float]]:
    """(trial number, score) of every trial that finished with a score. `scores` is
    mergelab_search.json's list of {number, value, state} (failed and pruned trials have no
    point); a plain list of numbers (None for no score) is read as trials 0, 1, 2, ..."""
    pts = []
    for i, s in enumerate(scores or []):
        if isinstance(s, dict):
            n, v = s.get("number"), s.get("value")
            if s.get("state", "COMPLETE") != "COMPLETE" or not isinstance(n, int) or isinstance(n, bool):
                continue
        else:
            n, v = i, s
        if _finite(v):
            pts.append((n, float(v)))
    return pts


def scores_figure(history: list[float | None], scores: list | None = None):
    """The score plot as a matplotlib Figure, None when no trial has a score: each trial's own
    score as a point (`scores`, see trial_points) and the best so far as a step line. history[i]
    is the best after the i-th counted trial; with a `scores` list of the same trials, the line
    is drawn at their trial numbers, else at 0..n-1."""
    from matplotlib.figure import Figure

    numbers = list(range(len(history)))
    if scores and len(scores) == len(history) and all(isinstance(s, dict) for s in scores):
        numbers = [s.get("number") if isinstance(s.get("number"), int) else i for i, s in enumerate(scores)]
    line = [(numbers[i], float(v)) for i, v in enumerate(history) if _finite(v)]
    pts = trial_points(scores)
    if not line and not pts:
        return None
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color="#8aa4c8", label="trial score", zorder=2)
    if line:
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="#1f4e8c", linewidth=2,
                label="best so far", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("combined score")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def scores_png(history: list[float | None], scores: list | None = None) -> bytes | None:
    """scores_figure as PNG bytes (None when there is nothing to plot)."""
    fig = scores_figure(history, scores)
    return None if fig is None else _png(fig)


def recipe_png(rows: list[HeatRow]) -> bytes | None:
    """The recipe's parameters as a heat map: a row per model and parameter, a column per layer
    group, each cell labelled with its value."""
    from matplotlib.figure import Figure

    if not rows:
        return None
    k = len(rows[0].values)
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * k + 0.08 * max(len(r.label) for r in rows)), 0.9 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow([r.values for r in rows], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    ax.set_xticks(range(k), [f"group {j}" for j in range(k)] if k > 1 else ["all layers"], fontsize=8)
    lo = min(min(r.values) for r in rows)
    hi = max(max(r.values) for r in rows)
    for i, r in enumerate(rows):
        for j, v in enumerate(r.values):
            light = hi == lo or (v - lo) / (hi - lo) < 0.5
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if light else "black")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title("recipe parameters by layer group", fontsize=9)
    return _png(fig)


def card_images(recipe: dict, search: dict | None) -> dict[str, bytes]:
    """{file name: PNG bytes} for the card; empty without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    out: dict[str, bytes] = {}
    if (png := recipe_png(recipe_rows(recipe))) is not None:
        out[IMAGE_FILES["recipe"]] = png
    if search and (png := scores_png(search.get("history") or [], search.get("scores"))) is not None:
        out[IMAGE_FILES["scores"]] = png
    return out
