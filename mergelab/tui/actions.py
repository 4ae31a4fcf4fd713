"""What the dashboard's keys do besides showing: export a trial's merged model, and push the best
one to the Hub, on the same code paths as the command line (search.export.export_trial, hub.push_folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from search.rundir import RunDir

from ..errors import MergelabError


def export_trial(rd: RunDir, record: dict, out_dir: str | Path, *,
                 on_tensor: Callable[[int, int], None] | None = None, overwrite: bool = False) -> Path:
    """Write the merged model of one trial of a run to out_dir: `mergelab export`'s code path
    (streaming engine, atomic, card with the search's provenance; a hybrid trial also gets
    fusion_recipe.yaml, which `mergelab eval` scores)."""
    from search.export import export_trial as export

    if not record.get("recipe"):
        raise MergelabError(
            f"Trial {record.get('number')} of {rd.path} has no recipe (it was interrupted before it "
            "was built), so it cannot be exported. Pick a COMPLETE trial."
        )
    path, _ = export(rd, out_dir, trial=record["number"], on_tensor=on_tensor, overwrite=overwrite)
    return path


def best_export(rd: RunDir, *, on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """runs/NAME/best/model holding the current best trial's merge; exported only when missing or
    when it holds an older best (search.export.export_best)."""
    from search.export import export_best

    return export_best(rd, on_tensor=on_tensor)


def push_best(rd: RunDir, repo_id: str, *, on_tensor: Callable[[int, int], None] | None = None,
              progress: Callable[[str, str], None] | None = None, private: bool = False):
    """Export the best trial if needed, then push it exactly as `mergelab push` does."""
    from ..hub import check_repo_id, push_folder

    check_repo_id(repo_id)  # before the export, which may take minutes
    folder = best_export(rd, on_tensor=on_tensor)
    return push_folder(folder, repo_id, private=private, progress=progress)
