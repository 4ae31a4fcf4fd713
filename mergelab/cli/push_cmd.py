"""`mergelab push`: upload a merged model (or a run's best trial) to the Hugging Face Hub.

The work is in mergelab.hub.push_folder; this module parses options and prints.
"""
from __future__ import annotations

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
    from search.rundir import RunDir

    return Path(RunDir.open(path).export_best())


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

    folder = resolve_model_dir(model_dir)

    def progress(stage: str, msg: str) -> None:
        click.echo(f"[{stage}] {msg}", err=True)

    result = push_folder(folder, repo_id, private=private, revision=revision, message=message,
                         dry_run=dry_run, progress=progress)
    if dry_run:
        click.echo(describe_upload(result))
        click.echo("")
        click.echo("Model card (README.md):" + (" rendered, not yet written" if result.card_rendered else ""))
        click.echo("-" * 72)
        click.echo(result.card.rstrip("\n"))
        click.echo("-" * 72)
        click.echo("Dry run: nothing was uploaded or written.")
        return
    click.echo(result.commit_url)
