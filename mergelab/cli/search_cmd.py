"""`mergelab search / resume / runs / show / export`: run recipe searches and look at their runs.

The search itself lives in search.loop; these commands parse options and print plain lines.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

from ..errors import MergelabError

STORAGE_ENV = "MERGELAB_STORAGE"  # = search.storage.STORAGE_ENV (not imported: the CLI loads search lazily)


@click.command()
@click.argument("config", type=click.Path())
@click.option("--run", "run", type=click.Path(), default=None, help="Run directory (default runs/CONFIG-TIMESTAMP).")
@click.option("--storage", default=None, help="Shared Optuna storage: postgresql+psycopg2://..., mysql+pymysql://..., journal:PATH.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Start this many worker processes on this machine.")
@click.option("--worker", is_flag=True, help="Join the run's shared study as one more worker.")
@click.option("--no-tui", is_flag=True, help="Plain log lines instead of the dashboard.")
@click.option("--dry-run", is_flag=True, help="Validate the config and print the search space; run nothing.")
@click.option("--device", default=None, help="Override the config's device (cpu, cuda, cuda:1, auto).")
@click.option("--share-gpus", is_flag=True, help="With --workers N and a CUDA device: more workers than GPUs, round-robin.")
def search(config, run, storage, workers, worker, no_tui, dry_run, device, share_gpus):
    """Search merge recipes for CONFIG (a search YAML); results go to a run directory."""
    from search.config import load_search_config
    from search.loop import prepare_run
    from search.validate import validate_config, worker_devices

    if worker and storage is None:
        storage = os.environ.get(STORAGE_ENV)  # how `--workers N` hands its workers the URL

    if dry_run:
        cfg, _ = load_search_config(config)
        if device:
            cfg.device = device
        cfg, space = validate_config(cfg, base_dir=Path(config).parent.resolve())
        click.echo(f"config OK: {', '.join(space.methods)} over {len(space.models)} models, "
                   f"{space.size_text()}, optimizer {cfg.optimizer.name}, budget "
                   f"{cfg.budget.trials or '-'} trials / {cfg.budget.timeout or '-'} s")
        from search.labels import param_labels

        labels = param_labels(space)  # as the dashboard, `show` and the card name them
        width = max((len(labels[p.name]) for p in space.params), default=0)
        for p in space.params:
            click.echo(f"  {labels[p.name]:<{width}}  [{p.low:g}, {p.high:g}]")
        return
    if workers > 1:
        if storage is None:
            raise MergelabError(
                "--workers N needs a storage several processes can share: add --storage "
                "journal:runs/NAME.journal (one machine) or a PostgreSQL/MySQL URL."
            )
    if workers > 1:
        import torch

        cfg_device = device or load_search_config(config)[0].device
        devices = worker_devices(cfg_device, workers, torch.cuda.device_count(), share_gpus)
    rd = prepare_run(config, run, storage=storage, device=device)
    click.echo(f"run directory: {rd.path}")
    if workers > 1:
        # the URL (and its password) goes to the workers in their environment, not their
        # command lines, which any user of the machine can list
        cmd = [sys.executable, "-c", "from mergelab.cli import run; run()", "search", config, "--run", str(rd.path),
               "--worker", "--no-tui"]
        env = {**os.environ, STORAGE_ENV: storage}
        procs = []
        for dev in devices:  # each worker its own GPU (or the config's device when not CUDA)
            click.echo(f"worker {len(procs)}: device {dev}")
            procs.append(subprocess.Popen(cmd + ["--device", dev], env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise MergelabError(f"{sum(1 for c in codes if c)} of {workers} workers failed; see {rd.path / 'log.txt'}.")
        _print_result(rd)
        return
    res = _run(rd, worker, no_tui, storage, device)
    click.echo(f"{res.status}: {res.detail}; {res.trials_done} trials")
    _print_result(rd, worker)


def _run(rd, worker: bool, no_tui: bool, storage: str | None = None, device: str | None = None):
    """The search in this process: under the live dashboard on a terminal, else log lines."""
    from search.loop import run_search

    if not no_tui and sys.stdout.isatty() and sys.stdin.isatty():
        from mergelab.tui import search_with_dashboard

        # the same search as without the dashboard: the run's storage (with its password) and
        # this process's device go to run_search either way
        return search_with_dashboard(rd, worker=worker, storage=storage, device=device)
    return run_search(rd, worker=worker, log=click.echo, storage=storage, device=device)


def _print_result(rd, worker: bool = False) -> None:
    s = rd.run_summary()
    if s.best and s.best_value is not None:
        click.echo(f"best: trial {s.best_number} score {s.best_value:.6g} -> {rd.path / 'best' / 'recipe.yaml'}")
    if s.best and not worker and rd.resolved_run().test_eval is not None and rd.status().status == "finished":
        from search.heldout import held_out, held_out_table

        click.echo("scoring the best trial and the source models on the held-out `test_eval` ...")
        h = held_out(rd)
        click.echo(f"held-out (test_eval, never scored by the search; {rd.path / 'heldout.json'}):")
        click.echo(held_out_table(h))


@click.command()
@click.argument("run", type=click.Path())
@click.option("--worker", is_flag=True, help="Join as one more worker instead of taking the run over.")
@click.option("--no-tui", is_flag=True, help="Plain log lines instead of the dashboard.")
@click.option("--storage", default=None,
              help="The run's storage URL with its password (the run keeps it without); or set MERGELAB_STORAGE.")
@click.option("--trials", "trials", type=click.IntRange(min=1), default=None,
              help="Give the run this trial budget (more than it has done), e.g. to continue a finished run.")
def resume(run, worker, no_tui, storage, trials):
    """Continue the search of run directory RUN until its budget is met."""
    from search.recovery import set_budget_trials
    from search.rundir import RunDir

    rd = RunDir.open(run)
    if trials is not None:
        set_budget_trials(rd, trials)
        click.echo(f"budget: {trials} trials")
    res = _run(rd, worker, no_tui, storage)
    click.echo(f"{res.status}: {res.detail}; {res.trials_done} trials")
    _print_result(rd, worker)


@click.command()
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path())
def runs(runs_dir):
    """List run directories: status, trials done / budget, best score, last activity."""
    from search.rundir import RunDir, fmt_age

    found = RunDir.list(runs_dir)
    if not found:
        click.echo(f"no run directories under {runs_dir}")
        return
    click.echo(f"{'NAME':30} {'STATUS':9} {'TRIALS':>9} {'BEST':>10} {'OPTIMIZER':9} LAST ACTIVITY")
    for r in found:
        s = r.status()
        budget = f"{s.trials_done}/{s.budget_trials if s.budget_trials else '-'}"
        best = f"{s.best_value:.4g}" if s.best_value is not None else "-"
        click.echo(f"{s.name[:30]:30} {s.status + ('*' if s.paused else ''):9} {budget:>9} {best:>10} "
                   f"{(s.optimizer or '-'):9} {fmt_age(s.last_activity, time.time())}")


@click.command()
@click.argument("run", type=click.Path())
@click.option("--top", default=10, show_default=True, help="How many trials to list.")
def show(run, top):
    """Print the top trials of run directory RUN and its best recipe."""
    from search.rundir import RunDir

    rd = RunDir.open(run)
    s = rd.status()
    click.echo(f"{s.name}: {s.status} ({s.detail}), {s.trials_done}/"
               f"{s.budget_trials or '-'} trials, optimizer {s.optimizer}")
    recs = [r for r in rd.trial_records() if r.value is not None]
    recs.sort(key=lambda r: r.value, reverse=True)
    for r in recs[:top]:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in r.scores.items() if isinstance(v, (int, float)))
        click.echo(f"  trial {r.number:4d}  {r.value:.6g}  {scores}")
    from search.heldout import cached_held_out, held_out_table

    h = cached_held_out(rd)
    if h is not None:
        click.echo("held-out (test_eval, never scored by the search):")
        click.echo(held_out_table(h))
    best = rd.summary().get("best") or {}
    if best.get("params"):
        click.echo(f"best trial {best.get('number')}, searched values:")
        click.echo(searched_values_text(best["params"], rd.resolved_run()))
    text = rd.best_recipe_text()
    if text:
        click.echo("best recipe:")
        click.echo(text.rstrip())


def searched_values_text(params: dict, resolved) -> str:
    """A trial's searched values under the labels the dashboard, compare and the card use
    (`addition · weight · layers 0–1`), not the search space's compact names (`m0.weight.g0`):
    one indented line each, the values in a column. `resolved`: the run's search.records.ResolvedRun."""
    from search.labels import label_of, param_labels

    labels = param_labels(resolved)
    rows = [(label_of(name, labels, resolved), value) for name, value in params.items()]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {_fmt_value(value)}" for label, value in rows)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@click.command()
@click.argument("run", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--trial", "trial", type=int, default=None, help="Trial number (default: the best).")
@click.option("--device", default=None, help="Device for the merge (default: the run's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(run, out_dir, trial, device, quiet):
    """Write the merged model of the best (or --trial N) trial of RUN to OUT_DIR."""
    from search.export import export_trial

    from .progress import count_bar

    with count_bar("export", quiet=quiet) as on_tensor:
        path, rec = export_trial(run, out_dir, trial=trial, device=device, on_tensor=on_tensor)
    click.echo(f"trial {rec.number} (score {rec.value:.6g}) written to {path}")
    if rec.fusion:
        click.echo(f"that score is of a logit-fusion hybrid over this merge: `mergelab eval "
                   f"{Path(path) / 'fusion_recipe.yaml'} --eval SPEC` reproduces it")
