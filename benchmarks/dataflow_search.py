"""Data-flow search (DFS) against the parameter-space search (PS) on the bundled family.

PS: ties over 2 layer groups (weight, density per model and group, λ), trial 0 the equal-weight
merge. DFS: the fine-tunes' layers laid out `--repeats` times, trial 0 the first fine-tune as it
is. PS+DFS: DFS whose pool starts with the PS run's best merge (its trial 0 is that merge); it
runs after the PS run, so it has spent twice the budget in all. Fitness is the VAL split; the
table's test columns are the TEST split, which no search scored.

Usage: python benchmarks/dataflow_search.py [--trials 10] [--repeats 3] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SKILLS = ("addition", "sort", "reverse")
FAMILY = REPO / "mergelab" / "demo" / "family"
DATA = REPO / "mergelab" / "demo" / "data"


def _search(name: str, cfg: dict, work: Path) -> tuple[dict, float]:
    from search.loop import prepare_run, run_search

    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rd = prepare_run(path, work / "runs" / name)
    t0 = time.perf_counter()
    run_search(rd, install_signals=False)
    secs = time.perf_counter() - t0
    return json.loads((rd.path / "best" / "trial.json").read_text()), secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scales", action="store_true", help="dataflow.scales: false (no scaling at jumps)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab_dataflow_bench"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.spec import EvalSpec
    from mergelab.eval.models import HFLogitModel, load_model
    from mergelab.trial import TrialMerger

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base, fts = str(FAMILY / "base"), [str(FAMILY / s) for s in SKILLS]
    equal = {"merge_method": "ties", "base_model": base, "parameters": {"lambda": 1.0},
             "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]}
    (work / "equal.yml").write_text(yaml.safe_dump(equal, sort_keys=False))
    common = {"base_model": base, "models": fts, "eval": str(DATA / "eval_val.yml"),
              "optimizer": {"name": "cmaes"}, "budget": {"trials": args.trials}, "seed": args.seed, "device": "cpu"}
    rows: list[tuple[str, dict | None, Path | None, float | None, float | None]] = []
    ps_cfg = {**common, "method": "ties", "layer_groups": 2, "warm_start": str(work / "equal.yml"),
              "space": {"weight": [0.0, 1.0], "density": [0.1, 1.0], "lambda": [0.5, 2.0]}}
    ps, ps_s = _search("ps", ps_cfg, work)
    (work / "ps_best.yml").write_text(yaml.safe_dump(ps["recipe"], sort_keys=False))
    dfs, dfs_s = _search("dfs", {**common, "dataflow": {"repeats": args.repeats, "scales": not args.no_scales}}, work)
    both, both_s = _search("ps_dfs", {**common, "dataflow": {
        "repeats": args.repeats, "scales": not args.no_scales, "ps_recipe": str(work / "ps_best.yml"), "ps_model": str(work / "ps_model")}}, work)

    tm = TrialMerger(base, fts, device="cpu")
    ev = Evaluator(EvalSpec.load(DATA / "eval_test.yml"), tm.tokenizer, tm.device)

    def test_of(recipe: dict | None = None, model_dir: Path | None = None) -> dict:
        if recipe is not None:
            res = ev.evaluate(HFLogitModel(tm.apply(recipe), tm.tokenizer))
        else:
            model, tok = load_model(model_dir, "cpu")
            res = ev.evaluate(HFLogitModel(model, tok))
        return res.to_dict()

    print(f"bundled family, {args.trials} trials per search, seed {args.seed}, repeats {args.repeats}, "
          f"scales {'off' if args.no_scales else 'on'}, CPU 1 thread "
          "(shared machine)\n")
    print(f"| model | addition | sort | reverse | combined (test) | combined (val) | layers | search time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(label: str, res: dict, val: float | None, layers: int | None, secs: float | None) -> None:
        sc = res["scores"]
        cells = [f"{sc[s]:.3f}" for s in SKILLS] + [f"{res['combined']:.3f}",
                                                      f"{val:.3f}" if val is not None else "",
                                                      str(layers) if layers else "", f"{secs:.0f} s" if secs else ""]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    for s, d in zip(SKILLS, fts):
        row(f"fine-tune `{s}`", test_of(model_dir=Path(d)), None, 4, None)
    row("ties, equal weights", test_of(recipe=equal), None, 4, None)
    for label, best, secs in (("PS: best of cmaes (ties, 2 groups)", ps, ps_s),
                              ("DFS: best of cmaes", dfs, dfs_s), ("PS+DFS: best of cmaes", both, both_s)):
        path = best.get("path")
        row(label, test_of(recipe=best["recipe"]), best["value"], len(path) if path else 4, secs)
        if path:
            print(f"|   path of trial {best['number']}: " + " → ".join(
                f"{Path(p[0]).name}[{p[1]}]" + (f"×{p[2]:.2f}" if p[2] != 1.0 else "") for p in path) + " |||||||")


if __name__ == "__main__":
    main()
