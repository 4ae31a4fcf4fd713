"""Score against trial number with the best-so-far line (or, for multi-objective runs, each objective
and the Pareto front), drawn with textual-plotext and downsampled so 10,000 trials stay cheap."""
from __future__ import annotations

from textual_plotext import PlotextPlot

from ..state import RunState, best_so_far, downsample, downsample_monotone

MAX_POINTS = 400  # points per series handed to plotext (a terminal is narrower than that)


class ScorePlot(PlotextPlot):
    """Plots a RunState; `mode` is "history" (score vs trial) or "pareto" (objective 1 vs 2)."""

    def __init__(self, *args, max_points: int = MAX_POINTS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_points = max_points
        self.mode = "history"
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
            plt.title("Pareto front (v: by trial)")
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
                bx, by = downsample_monotone(xs, best_so_far(ys), self.max_points)
                sx, sy = downsample(xs, ys, self.max_points)
                plt.scatter(sx, sy, marker="dot", color="cyan", label="score")
                plt.plot(bx, by, marker="braille", color="red", label="best so far")
                n += len(sx) + len(bx)
            plt.xlabel("trial")
            plt.title("score by trial" if not state.multi else "objectives by trial (v: Pareto front)")
        self.points_plotted = n
        self.refresh()
