"""`mergelab merge RECIPE.yml OUT_DIR`: validate, plan and run a streaming merge to disk."""
from __future__ import annotations

import logging

import click
import torch


_COMPUTE = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--compute-dtype", type=click.Choice(sorted(_COMPUTE)), default="float32", show_default=True)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB or bytes.")
@click.option("--seed", type=int, default=None, help="Seed for random operators (overrides the recipe's).")
@click.option("--dry-run", is_flag=True, help="Validate everything and print the plan; merge nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verbose", is_flag=True, help="Log the kernel that merged each tensor.")
def merge(recipe, out_dir, device, compute_dtype, shard_size, seed, dry_run, overwrite, quiet, verbose):
    """Merge the models of RECIPE (mergekit-style YAML) into OUT_DIR, one tensor at a time."""
    from ..engine import merge_to_dir, prepare, resolve_device
    from ..writer import check_output, parse_size, recover_leftovers, shard_layout
    from .progress import progress_bar

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    if verbose:
        logging.getLogger("mergelab").setLevel(logging.DEBUG)
    size = parse_size(shard_size)
    dev = resolve_device(device)
    plan, sources = prepare(recipe, seed)
    if not dry_run:  # a killed earlier merge to OUT: put its old model back, drop its partial files
        try:
            for note in recover_leftovers(out_dir):
                click.echo(note, err=True)
        except OSError as e:  # best effort: check_output names a real problem with OUT
            click.echo(f"could not clean up earlier merges to {out_dir}: {e}", err=True)
    check_output(out_dir, plan.total_bytes, overwrite)  # the dry run refuses what the merge would
    if dry_run:
        layout = shard_layout([j.nbytes for j in plan.jobs], size)
        n_shards = layout[-1][0] + 1 if layout else 1
        click.echo(f"recipe: {recipe} ({plan.recipe.merge_method}, {len(plan.recipe.model_refs)} models, "
                   f"base {plan.recipe.base_model or '-'})")
        for ref, s in sources.items():
            click.echo(f"  source {ref}: {s.path} ({len(s.tensors)} tensors)")
        for note in plan.notes:
            click.echo(f"  note: {note}")
        click.echo(f"tensors: {len(plan.jobs)}  output: {_human(plan.total_bytes)} in {n_shards} shard(s)")
        click.echo(f"largest tensor: {_human(plan.largest_bytes)}  estimated peak tensor memory: "
                   f"{_human(plan.peak_memory_estimate())}  device: {dev}")
        click.echo("dry run: nothing written")
        return
    sizes = [j.nbytes for j in plan.jobs]
    with progress_bar("merge", plan.total_bytes, quiet=quiet) as advance:
        rep = merge_to_dir(plan.recipe, out_dir, device=dev, compute_dtype=_COMPUTE[compute_dtype],
                           shard_size=size, seed=seed, quiet=True, overwrite=overwrite,
                           on_tensor=lambda i, n: advance(sizes[i - 1]), plan_and_sources=(plan, sources))
    click.echo(f"wrote {rep.out_dir} ({rep.tensors} tensors, {_human(rep.bytes)}, {rep.shards} shard(s)) "
               f"in {rep.seconds:.1f}s")
