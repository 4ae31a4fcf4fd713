"""`mergelab demo`: the main job end to end on the bundled model family — a short CMA-ES search
with per-layer groups, the best merge exported, and a table of every model on every skill."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import click

from ..errors import MergelabError

DEMO_ROOT = Path(__file__).resolve().parent.parent / "demo"


def family() -> tuple[Path, list[Path], Path, Path]:
    """(base, fine-tunes, val eval spec, test eval spec) of the bundled family."""
    fam = DEMO_ROOT / "family"
    base = fam / "base"
    fts = sorted(p for p in fam.iterdir() if p.is_dir() and p.name != "base" and (p / "config.json").is_file()) \
        if fam.is_dir() else []
    val, test = DEMO_ROOT / "data" / "eval_val.yml", DEMO_ROOT / "data" / "eval_test.yml"
    if not (base / "config.json").is_file() or not fts or not val.is_file() or not test.is_file():
        raise MergelabError(
            f"The bundled model family is missing from {fam} (or its eval specs from {DEMO_ROOT / 'data'}). "
            "Reinstall mergelab from a full checkout, or rebuild it with "
            "`python -m mergelab.demo.train_family --out mergelab/demo/family`."
        )
    return base, fts, val, test


def demo_config(trials: int, layer_groups: int, seed: int, device: str, val_limit: int | None = None) -> dict:
    base, fts, val, _ = family()
    eval_spec: str | dict = str(val)
    if val_limit:
        from ..eval.spec import EvalSpec

        eval_spec = EvalSpec.load(val).with_limit(val_limit).model_dump(mode="json")
    return {
        "base_model": str(base),
        "models": [str(p) for p in fts],
        "method": "ties",
        "space": {"weight": [0.0, 1.0], "density": [0.1, 1.0], "lambda": [0.5, 2.0]},
        "layer_groups": layer_groups,
        "eval": eval_spec,
        "optimizer": {"name": "cmaes"},
        "budget": {"trials": trials},
        "seed": seed,
        "device": device,
        "recipe": {"dtype": "float32"},
    }


def equal_weight_recipe() -> dict:
    base, fts, _, _ = family()
    return {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts]}


def score_table(rows: list[tuple[str, dict]], metrics: list[str]) -> str:
    head = ["model", *[m.split("/")[0] for m in metrics], "combined"]
    body = [[name, *[f"{r['metrics'][m]:.3f}" for m in metrics], f"{r['combined']:.3f}"] for name, r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def evaluate_all(best_dir: Path, device: str, limit: int | None = None) -> tuple[list[tuple[str, dict]], list[str]]:
    """Score every fine-tune, the base, the equal-weight ties merge and the searched merge (the
    exported directory, loaded from disk) on the TEST split, which the search never scored."""
    from ..eval.evaluator import Evaluator
    from ..eval.models import HFLogitModel, load_model
    from ..eval.spec import EvalSpec
    from ..trial import TrialMerger

    base, fts, _, test = family()
    spec = EvalSpec.load(test)
    if limit:
        spec = spec.with_limit(limit)
    rows: list[tuple[str, dict]] = []
    ev = None
    for name, path in [("base", base), *[(p.name, p) for p in fts]]:
        model, tok = load_model(path, device=device)
        ev = ev or Evaluator(spec, tok, device)
        rows.append((name, ev.evaluate(HFLogitModel(model, tok)).to_dict()))
    tm = TrialMerger(str(base), [str(p) for p in fts], device=device)
    rows.append(("ties, equal weights", ev.evaluate(HFLogitModel(tm.apply(equal_weight_recipe()), tm.tokenizer)).to_dict()))
    model, tok = load_model(best_dir, device=device)
    rows.append(("searched merge", ev.evaluate(HFLogitModel(model, tok)).to_dict()))
    metrics = [m for m in rows[0][1]["metrics"] if m.endswith("/accuracy")] or list(rows[0][1]["metrics"])
    return rows, metrics


def write_warm_start(run_path: Path, recipe: dict) -> Path:
    """The warm-start recipe, written inside the run directory (runs/NAME/warm_start.yml) before
    the run is created there, so deleting the run leaves nothing of it behind. Refused like the
    run itself when RUN is a link, a file or a directory of another run; a planted link at the
    file's name is replaced, never followed."""
    import yaml

    from search.rundir import WARM_START_FILE, RunDir, atomic_write_bytes

    RunDir.check_new(run_path)
    run_path.mkdir(parents=True, exist_ok=True)
    warm = run_path / WARM_START_FILE
    atomic_write_bytes(warm, yaml.safe_dump(recipe, sort_keys=False).encode("utf-8"))
    return warm


@click.command()
@click.option("--headless", is_flag=True, help="No dashboard: plain log lines (CI, scripts).")
@click.option("--trials", type=click.IntRange(min=1), default=100, show_default=True, help="Search budget in trials.")
@click.option("--layer-groups", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--run", "run_path", type=click.Path(path_type=Path), default=None,
              help="Run directory (default runs/demo-TIMESTAMP).")
@click.option("--val-limit", type=click.IntRange(min=1), default=None, help="Score at most N validation items per skill in each trial.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score at most N test items per skill in the final table.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the table as JSON.")
def demo(headless, trials, layer_groups, seed, device, run_path, val_limit, limit, json_path):
    """Search a merge of the bundled model family, export the best, and compare it on every skill."""
    import sys

    import yaml

    from search.export import export_trial
    from search.loop import run_search

    from ..tui.launch import create_run

    import torch

    # the family is tiny (0.7M parameters): one thread is fastest and does not stall when the
    # other core is busy (OpenMP regions wait for their slowest thread)
    torch.set_num_threads(1)
    cfg = demo_config(trials, layer_groups, seed, device, val_limit)
    run_path = run_path or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    # trial 0 is the equal-weight merge, so the search starts from the hand recipe it must beat
    warm = write_warm_start(run_path, equal_weight_recipe())
    cfg["warm_start"] = str(warm.resolve())
    try:
        rd = create_run(yaml.safe_dump(cfg, sort_keys=False), run_path)
    except BaseException:
        warm.unlink(missing_ok=True)  # no run refers to it
        with contextlib.suppress(OSError):
            run_path.rmdir()  # only when empty: the directory the demo made for it
        raise
    click.echo(f"run directory: {rd.path}")
    t0 = time.perf_counter()
    if not headless and sys.stdout.isatty():
        from ..tui import search_with_dashboard

        result = search_with_dashboard(rd)
    else:
        result = run_search(rd, log=lambda m: click.echo(m))
    click.echo(f"search {result.status}: {result.trials_done} trials in {time.perf_counter() - t0:.0f}s")
    if not result.best:
        raise MergelabError(f"The demo search in {rd.path} finished no trial; see {rd.path / 'log.txt'}.")
    best_dir = rd.path / "best" / "model"
    # the demo owns runs/NAME/best/model: an export left there by a push from the dashboard
    # (`u`, failed or not) is replaced, never a reason to stop before the table
    from .progress import count_bar

    with count_bar("export") as on_tensor:
        export_trial(rd, best_dir, device=device, overwrite=True, on_tensor=on_tensor)
    click.echo(f"best merge (trial {result.best['number']}) exported to {best_dir}")
    rows, metrics = evaluate_all(best_dir, device, limit)
    click.echo("\nTest split (held out: the search scored the validation split only):\n")
    click.echo(score_table(rows, metrics))
    if json_path:
        json_path.write_text(json.dumps({"run": str(rd.path), "best_trial": result.best["number"],
                                         "best_dir": str(best_dir), "rows": rows}, indent=2))
