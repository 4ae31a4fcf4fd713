"""Score against trial number with the best-so-far line (or, for multi-objective runs, each objective
and the Pareto front), drawn with textual-plotext and downsampled so 10,000 trials stay cheap."""
from __future__ import annotations

import math

from textual_plotext import PlotextPlot

from ..state import RunState, best_so_far, downsample, downsample_monotone

MAX_POINTS = 400  # points per series handed to plotext (a terminal is narrower than that)


def trial_ticks(lo: int, hi: int, max_ticks: int) -> list[int]:
    """Whole trial numbers for the x axis: lo, hi and round steps between, at most max_ticks."""
    if hi <= lo:
        return [lo]
    span = hi - lo
    raw = span / max(1, max_ticks - 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = list(range(math.ceil(lo / step) * step, hi + 1, step))
    if ticks[0] != lo and ticks[0] - lo < step / 2:
        ticks[0] = lo
    elif ticks[0] != lo:
        ticks.insert(0, lo)
    if ticks[-1] != hi and hi - ticks[-1] <= step / 2:
        ticks[-1] = hi
    elif ticks[-1] != hi:
        ticks.append(hi)
    return ticks


def step_line(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """A best-so-far curve as a step line: flat until the trial that improved it, then up."""
    if not xs:
        return [], []
    ox, oy = [xs[0]], [ys[0]]
    for x, y in zip(xs[1:], ys[1:]):
        if y != oy[-1]:
            ox.append(x)
            oy.append(oy[-1])
        ox.append(x)
        oy.append(y)
    return ox, oy


class ScorePlot(PlotextPlot):
    """Plots a RunState; `mode` is "history" (score vs trial) or "pareto" (objective 1 vs 2)."""

    def __init__(self, *args, max_points: int = MAX_POINTS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_points = max_points
        self.mode = "history"
        self.legend = ""  # what the marks mean, shown in the bottom border (no legend over the points)
        self.points_plotted = 0  # points handed to plotext at the last update (tests read it)

    def update_from(self, state: RunState) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        n = 0
        if self.mode == "pareto" and state.multi:
            names = state.objective_names
            xs0, ys0 = [], []
            for rec in state.trials:
                v = rec.get("values")
                if rec.get("state") == "COMPLETE" and v and len(v) >= 2:
                    xs0.append(float(v[0]))
                    ys0.append(float(v[1]))
            xs0, ys0 = xs0[-self.max_points:], ys0[-self.max_points:]
            front = sorted((p["values"][0], p["values"][1]) for p in state.pareto() if len(p.get("values") or []) >= 2)
            if xs0:
                plt.scatter(xs0, ys0, marker="dot", color="gray", label="trials")
                n += len(xs0)
            if front:
                fx, fy = [f[0] for f in front], [f[1] for f in front]
                plt.plot(fx, fy, marker="braille", color="red")
                plt.scatter(fx, fy, marker="x", color="red", label="Pareto front")
                n += 2 * len(front)
            plt.xlabel(names[0] if names else "objective 1")
            plt.ylabel(names[1] if len(names) > 1 else "objective 2")
            self.legend = "· trials  x Pareto front  (v: by trial)"
        else:
            if state.multi:
                colors = ["cyan", "orange", "green", "magenta"]
                for k, name in enumerate(state.objective_names):
                    xs, ys = state.objective_series(k)
                    xs, ys = downsample(xs, ys, self.max_points)
                    if xs:
                        plt.scatter(xs, ys, marker="dot", color=colors[k % len(colors)], label=name)
                        n += len(xs)
            xs, ys = state.series() if not state.multi else ([], [])
            if xs:
                bx, by = step_line(*downsample_monotone(xs, best_so_far(ys), self.max_points))
                sx, sy = downsample(xs, ys, self.max_points)
                plt.scatter(sx, sy, marker="dot", color="cyan")
                plt.plot(bx, by, marker="braille", color="red")
                n += len(sx) + len(bx)
            numbers = state.series()[0] if not state.multi else sorted(
                {x for k in range(len(state.objective_names)) for x in state.objective_series(k)[0]})
            if numbers:
                lo, hi = int(min(numbers)), int(max(numbers))
                ticks = trial_ticks(lo, hi, max(2, (self.size.width or 40) // 8))
                plt.xticks(ticks, [str(t) for t in ticks])
                plt.xlim(lo - 0.5, hi + 0.5) if hi - lo < 2 else plt.xlim(lo, hi)
            if (self.size.height or 20) >= 14:
                plt.xlabel("trial")
            self.legend = ("· score  ─ best so far" if not state.multi else
                           "  ".join(f"· {n}" for n in state.objective_names) + "  (v: Pareto front)")
        self.border_subtitle = self.legend
        self.points_plotted = n
        self.refresh()
