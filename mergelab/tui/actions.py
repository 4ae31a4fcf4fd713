"""What the dashboard's keys do besides showing: export a trial's merged model, and push the best
one to the Hub, on the same code paths as the command line (engine.merge_to_dir, hub.push_folder)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from search.rundir import RunDir

from ..errors import MergelabError

BEST_MODEL_DIR = "model"  # runs/NAME/best/model: where `u` exports the best trial before pushing


def search_provenance(rd: RunDir, record: dict) -> dict:
    """The `mergelab_search.json` the model card reads: how the exported recipe was found."""
    return rd.search_metadata(record)


def export_trial(rd: RunDir, record: dict, out_dir: str | Path, *,
                 on_tensor: Callable[[int, int], None] | None = None, overwrite: bool = False) -> Path:
    """Write the merged model of one trial of a run to out_dir (streaming engine, atomic); a
    hybrid trial (search `fusion:`) also gets fusion_recipe.yaml, which `mergelab eval` scores."""
    from ..engine import merge_to_dir

    recipe = record.get("recipe")
    if not recipe:
        raise MergelabError(
            f"Trial {record.get('number')} of {rd.path} has no recipe (it was interrupted before it "
            "was built), so it cannot be exported. Pick a COMPLETE trial."
        )
    prov = search_provenance(rd, record)
    extra = {}
    if record.get("fusion"):
        # a hybrid: the score is the merge's fused with other models at inference time, so the
        # fusion recipe that reproduces it goes beside the merge's weights
        from search.rundir import EXPORT_MERGE_REF, FUSION_RECIPE_FILE, fusion_recipe

        from ..recipe import dump_yaml

        prov["fusion"] = record["fusion"]
        extra[FUSION_RECIPE_FILE] = dump_yaml(fusion_recipe(record["fusion"], EXPORT_MERGE_REF))
    extra["mergelab_search.json"] = json.dumps(prov, indent=2) + "\n"
    device = rd.resolved().get("device") or "auto"
    report = merge_to_dir(recipe, out_dir, device=device, on_tensor=on_tensor, overwrite=overwrite,
                          extra_files=extra)
    return Path(getattr(report, "out_dir", out_dir))


def best_export(rd: RunDir, *, on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """runs/NAME/best/model holding the current best trial's merge; exported only when missing or
    when it holds an older best."""
    best = (rd.summary().get("best") or {}).get("number")
    if best is None:
        raise MergelabError(f"{rd.path} has no completed trial yet, so there is no best model to push.")
    record = next((r for r in rd.trials() if r.get("number") == best), None)
    if record is None:
        raise MergelabError(f"{rd.path}: the best trial {best} is missing from trials.jsonl; the run directory is damaged.")
    out = rd.path / "best" / BEST_MODEL_DIR
    prov = out / "mergelab_search.json"
    if prov.is_file() and any(out.glob("*.safetensors")):
        try:
            if json.loads(prov.read_text(encoding="utf-8")).get("best_trial") == best:
                return out
        except ValueError:
            pass  # unreadable: export again
    return export_trial(rd, record, out, on_tensor=on_tensor, overwrite=True)


def push_best(rd: RunDir, repo_id: str, *, on_tensor: Callable[[int, int], None] | None = None,
              progress: Callable[[str, str], None] | None = None, private: bool = False):
    """Export the best trial if needed, then push it exactly as `mergelab push` does."""
    from ..hub import check_repo_id, push_folder

    check_repo_id(repo_id)  # before the export, which may take minutes
    folder = best_export(rd, on_tensor=on_tensor)
    return push_folder(folder, repo_id, private=private, progress=progress)
