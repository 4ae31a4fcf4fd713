"""`mergelab fuse`: generate text from several models fused at inference time (PackLLM).

Prints each model's prompt log-perplexity and fusion weight, then the generated text.
"""
from __future__ import annotations

import click

from ..errors import MergelabError

_WEIGHTINGS = ("sim", "opt", "uniform", "top1")


@click.command("fuse")
@click.option("--models", "models_opt", multiple=True, metavar="A [B ...]",
              help="Models to fuse: directories, Hub ids or weight-merge recipe files. "
                   "`--models A B C` works: the values after --models are all models.")
@click.argument("more_models", nargs=-1, metavar="")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="A logit_fusion recipe YAML, instead of --models.")
@click.option("--weights", "weighting", type=click.Choice(_WEIGHTINGS), default=None,
              help="How the models are weighted on the prompt (default sim, or the recipe's).")
@click.option("--tau", type=float, default=None, help="Temperature of the sim weights (default 1).")
@click.option("--grid-step", type=float, default=None, help="Grid step of opt's line search (default 0.05).")
@click.option("--prompt", required=True, help="The prompt to continue.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto.")
@click.option("--cross-tokenizer", is_flag=True, default=False,
              help="Accept models whose tokenizer differs from the first model's: their vocabularies "
                   "are mapped to its by minimum edit distance (weights sim, uniform or top1).")
def fuse(models_opt, more_models, recipe, weighting, tau, grid_step, prompt, max_new_tokens, device,
         cross_tokenizer):
    """Generate from models fused by perplexity-weighted logits (each keeps its own KV cache)."""
    from ..fusion import FusedLogitModel, load_fusion, load_models, validate_fusion_recipe

    # click options take one value each; the extra values of `--models A B C` arrive as arguments.
    names = list(models_opt) + list(more_models)
    if recipe and names:
        raise MergelabError("Give either --recipe or --models, not both.")
    if not recipe and not names:
        raise MergelabError(
            "No models to fuse: give --models A B ... (directories, Hub ids or merge recipe files) "
            "or --recipe FUSION.yml."
        )
    if max_new_tokens < 1:
        raise MergelabError(f"--max-new-tokens must be at least 1; got {max_new_tokens}.")
    if recipe:
        overrides = {k: v for k, v in (("tau", tau), ("grid_step", grid_step)) if v is not None}
        if overrides:  # checked before any model is loaded, as the --models path does
            validate_fusion_recipe({"merge_method": "logit_fusion", "models": [recipe], "parameters": overrides},
                                   where="fuse options")
        # The weighting goes in before loading: opt across tokenizers is refused before any weights.
        fused, tokenizer = load_fusion(recipe, device=device, cross_tokenizer=True if cross_tokenizer else None,
                                       weighting=weighting)
        # Overrides set on the loaded fusion: rebuilding it without the tokenizers would take the
        # vocabulary from the models' row counts, padding rows included.
        fused.tau = fused.tau if tau is None else float(tau)
        fused.grid_step = fused.grid_step if grid_step is None else float(grid_step)
    else:
        params = {"weighting": weighting or "sim", "tau": 1.0 if tau is None else tau,
                  "grid_step": 0.05 if grid_step is None else grid_step}
        validate_fusion_recipe({"merge_method": "logit_fusion", "models": names, "parameters": params},
                               where="fuse options")
        models, tokenizers = load_models(names, device=device, cross_tokenizer=cross_tokenizer,
                                         weighting=params["weighting"])
        fused = FusedLogitModel(models, params["weighting"], params["tau"], params["grid_step"],
                                tokenizers=tokenizers, names=names, cross_tokenizer=cross_tokenizer)
        tokenizer = tokenizers[0]
    enc = tokenizer(prompt, return_tensors="pt")
    new = fused.generate_greedy(
        enc["input_ids"], enc["attention_mask"], max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    fw = fused.last_weights
    width = max(len(n) for n in fused.names)
    click.echo(f"weighting: {fused.weighting}  (tau {fused.tau:g}, prompt tokens scored: "
               f"{int(fw.scored_tokens[0])})")
    click.echo(f"{'model':<{width}}  log-ppl  weight")
    for k, name in enumerate(fused.names):
        click.echo(f"{name:<{width}}  {fw.log_ppl[0, k].item():7.3f}  {fw.weights[0, k].item():.3f}")
    if fused.cross_names:
        click.echo(f"cross-tokenizer: {', '.join(fused.cross_names)} read the text in their own tokens "
                   f"(log-ppl per own token), logits mapped to {fused.names[0]}'s vocabulary")
    click.echo("")
    click.echo(prompt + tokenizer.decode(new[0], skip_special_tokens=True))
