"""`mergelab push`: upload a merged model (or a run's best trial) to the Hugging Face Hub.

The work is in mergelab.hub.push_folder; this module parses options and prints. A dry run of a
run directory whose best trial is not exported yet plans the export instead of running it: it
writes nothing and makes no request (Hub-id sources are looked up in the local cache only).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import click

from ..errors import MergelabError

def is_run_dir(path: Path) -> bool:
    from search.rundir import RunDir

    return RunDir.is_run_dir(path)


def resolve_model_dir(path: Path) -> Path:
    """MODEL_DIR itself, or for a run directory the export of its best trial (runs/NAME/best/model,
    reused when it already holds the current best)."""
    if not is_run_dir(path):
        return path
    from search.export import export_best
    from search.rundir import RunDir

    from .progress import count_bar

    with count_bar("export") as on_tensor:
        return Path(export_best(RunDir.open(path), on_tensor=on_tensor))


@contextlib.contextmanager
def _offline():
    """huggingface_hub makes no request inside (it reads the flag from its constants module)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def current_export(run_path: Path) -> Path | None:
    """runs/NAME/best/model when it holds an export of the run's current best trial, else None."""
    from search.rundir import RunDir

    rd = RunDir.open(run_path)
    number = rd.run_summary().best_number
    if number is None:
        raise MergelabError(f"Run {run_path} has no finished trial yet; nothing to export.")
    target = rd.path / "best" / "model"
    meta = target / "mergelab_search.json"
    if not target.is_symlink() and meta.is_file() and any(target.glob("*.safetensors")):
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("best_trial") == number:
                return target
        except (OSError, ValueError, AttributeError):
            return None
    return None


def planned_run_push(run_path: Path, repo_id: str, revision: str | None):
    """What `push RUN` would upload when the best trial is not exported yet, without exporting:
    the files of the planned export (weights sized from the plan, when the sources can be read
    offline) and the card it would carry. Returns (PushResult, notes)."""
    from search.export import search_metadata
    from search.rundir import RunDir

    from ..card import CARD_FILE, RECIPE_FILE, SEARCH_FILE, model_card_files, sources_info_from_local
    from ..hub import DEFAULT_ENDPOINT, PushResult, check_repo_id, resolve_token

    check_repo_id(repo_id)
    rd = RunDir.open(run_path)
    number = rd.run_summary().best_number
    rec = next((r for r in rd.trial_records() if r.number == number and r.recipe), None)
    if rec is None:
        raise MergelabError(f"Run {run_path}: trials.jsonl has no recipe for the best trial {number}.")
    target = rd.path / "best" / "model"
    search = search_metadata(rd, rec)
    recipe = rec.recipe
    notes = [f"The best trial ({number}) is not exported yet; a real push exports it to {target} first."]
    files: list[tuple[str, int]] = []
    with _offline():
        card_files = model_card_files(target, recipe, search, sources_info_from_local(recipe))
        card = card_files.pop(CARD_FILE)
        files += [(name, len(data)) for name, data in card_files.items()]
        try:
            from ..engine import prepare
            from ..writer import shard_layout

            plan, sources = prepare(recipe)
            layout = shard_layout([j.nbytes for j in plan.jobs], 5 * 10**9)
            n = layout[-1][0] + 1 if layout else 1
            sizes = [0] * n
            for job, (shard, _) in zip(plan.jobs, layout):
                sizes[shard] += job.nbytes
            names = (["model.safetensors"] if n == 1 else
                     [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
            files += list(zip(names, sizes))
            ref = sources[plan.reference]
            files += [(f.name, f.stat().st_size) for f in ref.tokenizer_files()]
        except MergelabError as e:
            notes.append(f"Weight sizes unknown without the network ({e})")
    files += [("config.json", 0), (RECIPE_FILE, 0), (SEARCH_FILE, 0), (CARD_FILE, len(card.encode()))]
    notes.append("config.json, the recipe and the search record are small; their sizes show as 0 B until exported.")
    _, token_source = resolve_token(None)
    result = PushResult(
        repo_id=repo_id, revision=revision or "main",
        endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        files=sorted(files), card=card, card_rendered=True, card_written=False, dry_run=True,
        token_source=token_source,
    )
    return result, notes


@click.command("push")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME",
              help="Hub repository to push to (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private (ignored if it exists).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Branch to commit to (created if missing); default main.")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="List the files and print the card; no network access.")
def push(model_dir: Path, repo_id: str, private: bool, revision: str | None, message: str | None,
         dry_run: bool) -> None:
    """Push MODEL_DIR to the Hub in one commit, with a model card saying how it was made.

    MODEL_DIR is a folder written by `mergelab merge` / `mergelab export`, or a run directory
    (its best trial is exported first). The token comes from HF_TOKEN or `hf auth login`;
    the endpoint from HF_ENDPOINT.
    """
    from ..hub import describe_upload, push_folder

    notes: list[str] = []
    if dry_run and is_run_dir(model_dir) and current_export(model_dir) is None:
        result, notes = planned_run_push(model_dir, repo_id, revision)
    else:
        folder = current_export(model_dir) if dry_run and is_run_dir(model_dir) else resolve_model_dir(model_dir)

        from ..hub import list_upload_files
        from .progress import progress_bar

        def progress(stage: str, msg: str) -> None:
            click.echo(f"[{stage}] {msg}", err=True)

        total = sum(size for _, size in list_upload_files(folder)) if folder.is_dir() else 0
        with progress_bar("push", total, quiet=dry_run) as advance:
            result = push_folder(folder, repo_id, private=private, revision=revision, message=message,
                                 dry_run=dry_run, progress=progress, on_bytes=advance)
    if dry_run:
        click.echo(describe_upload(result))
        for note in notes:
            click.echo(note)
        click.echo("")
        click.echo("Model card (README.md):" + (" rendered, not yet written" if result.card_rendered else ""))
        click.echo("-" * 72)
        click.echo(result.card.rstrip("\n"))
        click.echo("-" * 72)
        click.echo("Dry run: nothing was uploaded or written.")
        return
    click.echo(result.commit_url)
