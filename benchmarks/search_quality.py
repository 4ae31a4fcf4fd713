"""Search quality: the bundled family (does a searched merge beat the equal-weight ties merge?) and,
with --real, the real-weights family of benchmarks/real_family.py (mergelab's search over seeds, the
same family and splits as benchmarks/baseline_pycma.py).

Fitness is the VAL split's score; every number in the tables is the TEST split (items the search
never scored). Usage:
    python benchmarks/search_quality.py [--family DIR] [--cmaes 20 100]
    nice -n 10 python benchmarks/search_quality.py --real [--seeds 0 1 2] [--trials 32]
        [--extra '{optimizer: {popsize: 8}}'] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SKILLS = ("addition", "sort", "reverse")


def _scorer(ev, tm, recipe: dict | None = None, model_dir: Path | None = None):
    """The combined test result of a recipe (merged in memory) or of a model directory."""
    from mergelab.eval.models import HFLogitModel, load_model

    if recipe is not None:
        return ev.evaluate(HFLogitModel(tm.apply(recipe), tm.tokenizer))
    model, tok = load_model(model_dir, "cpu")
    return ev.evaluate(HFLogitModel(model, tok))


def _search(name: str, optimizer: str, trials: int, args, work: Path) -> tuple[dict, float, dict]:
    """Run one search on the VAL spec; (best trial record, seconds, config written)."""
    from benchmarks.real_family import skill_spec
    from search.loop import prepare_run, run_search

    fam = args.family
    cfg = {
        "base_model": str(fam / "base"),
        "models": [str(fam / s) for s in SKILLS],
        "method": args.method,
        "space": {"weight": [0.0, 1.0], "density": [0.1, 1.0], "lambda": list(args.lambda_range)}
        if args.method == "ties" else {"weight": [0.0, 2.0]},
        "layer_groups": args.layer_groups,
        "eval": str(args.val),
        "optimizer": {"name": optimizer},
        "budget": {"trials": trials},
        "seed": args.seed,
        "device": "cpu",
    }
    if args.warm_start is not None:
        cfg["warm_start"] = str(args.warm_start)
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rd = prepare_run(path, work / "runs" / name)
    t0 = time.perf_counter()
    run_search(rd, install_signals=False)
    secs = time.perf_counter() - t0
    best = json.loads((rd.path / "best" / "trial.json").read_text())
    return best, secs, cfg


def _fingerprint(fam: Path) -> dict:
    """Size and mtime of every weight file: the table is only valid if the family did not
    change while the benchmark ran (each search loads the models afresh)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(fam.glob("*/*.safetensors"))}


REAL_SKILLS = ("date", "rev", "time")


def real_config(fam: Path, seed: int, trials: int, extra: dict, models, val_spec: Path) -> dict:
    """The search a user writes for this family: ties over the three fine-tunes, weight, density and
    lambda searched in the registry's ranges, 3 layer groups; `extra` overrides (a variant)."""
    cfg = {
        "base_model": str(fam / "base"),
        "models": [str(fam / s) for s in models],
        "method": "ties",
        "space": {"weight": None, "density": None, "lambda": None},
        "layer_groups": 3,
        "eval": str(val_spec),
        "budget": {"trials": trials},
        "seed": seed,
        "device": "cpu",
    }
    for k, v in extra.items():
        if k.endswith("!"):  # `space!: {...}` replaces the key instead of merging into it
            cfg[k[:-1]] = v
        else:
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def real_main(args) -> int:
    """mergelab's search on the real family, one run per seed; best-by-val scored on test."""
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.models import HFLogitModel
    from mergelab.eval.spec import EvalSpec
    from mergelab.trial import TrialMerger
    from benchmarks.real_family import require_family, skill_spec
    from search.loop import prepare_run, run_search

    fam = args.family
    require_family(fam, args.models)
    extra = yaml.safe_load(args.extra) if args.extra else {}
    work = args.work or Path(tempfile.mkdtemp(prefix="search_quality_real-"))
    work.mkdir(parents=True, exist_ok=True)
    val_spec = skill_spec(fam, "val", args.models, work / "eval_val.yml", args.fitness, args.combine)
    test_spec = skill_spec(fam, "test", args.models, work / "eval_test.yml")
    rows = []
    for seed in args.seeds:
        cfg = real_config(fam, seed, args.trials, extra, args.models, val_spec)
        name = f"{args.label}-s{seed}"
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rd = prepare_run(path, work / "runs" / name)
        t0 = time.perf_counter()
        run_search(rd, install_signals=False)
        secs = time.perf_counter() - t0
        best = json.loads((rd.path / "best" / "trial.json").read_text())
        tm = TrialMerger(cfg["base_model"], cfg["models"], device="cpu")
        test = Evaluator(EvalSpec.load(test_spec), tm.tokenizer, "cpu")
        r = test.evaluate(HFLogitModel(tm.apply(best["recipe"]), tm.tokenizer))
        skills = {s: r.scores[s] for s in args.models}
        del tm
        row = {"label": args.label, "seed": seed, "trials": args.trials, "best_trial": best["number"],
               "fitness": args.fitness, "val": best["value"] / (len(skills) if args.combine == "sum" else 1),  # the mean skill / geometric mean
               "val_skills": {s: best["scores"][s] for s in args.models},
               "val_accuracy": sum(best["metrics"][f"{s}/accuracy"] for s in args.models) / len(skills),
               "test": sum(skills.values()) / len(skills),
               "test_skills": skills, "seconds": secs, "config": cfg}
        rows.append(row)
        print(f"{args.label} seed {seed}: best trial {row['best_trial']} val {row['val']:.3f} "
              f"(accuracy {row['val_accuracy']:.3f}) "
              f"test {row['test']:.3f} ({' '.join(f'{k} {v:.2f}' for k, v in skills.items())}) "
              f"{secs / args.trials:.1f} s/trial", flush=True)
    print(f"{args.label}: mean test over seeds {args.seeds}: "
          f"{sum(r['test'] for r in rows) / len(rows):.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="the real-weights family (benchmarks/real_family.py)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--real: one search per seed")
    ap.add_argument("--trials", type=int, default=32, help="--real: trials per search")
    ap.add_argument("--extra", default=None, help="--real: YAML mapping merged into the search config (a key ending in `!`, e.g. `space!`, replaces it)")
    ap.add_argument("--label", default="default", help="--real: the variant's name in the output")
    ap.add_argument("--models", nargs="+", default=list(REAL_SKILLS), help="--real: the fine-tunes merged")
    ap.add_argument("--combine", choices=["sum", "geometric"], default="sum",
                    help="how the val skills' scores combine into the fitness")
    ap.add_argument("--fitness", choices=["accuracy", "answer_prob"], default="accuracy",
                    help="--real: the val scorers' score (answer_prob: exact_match mode forced)")
    ap.add_argument("--family", type=Path, default=REPO / "mergelab/demo/family")
    ap.add_argument("--val", type=Path, default=REPO / "mergelab/demo/data/eval_val.yml")
    ap.add_argument("--test", type=Path, default=REPO / "mergelab/demo/data/eval_test.yml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", type=int, default=20, help="random-search trials")
    ap.add_argument("--cmaes", type=int, nargs="+", default=[20, 100], help="cmaes budgets")
    ap.add_argument("--layer-groups", type=int, default=2)
    # the registry's lambda range: CMA-ES starts at its middle (1.25), not below 1 where the
    # merge shrinks towards a base that is worse than every fine-tune on this family
    ap.add_argument("--lambda-range", type=float, nargs=2, default=[0.5, 2.0])
    ap.add_argument("--no-warm-start", action="store_true",
                    help="do not enqueue the equal-weight ties merge as every search's trial 0")
    ap.add_argument("--density", type=float, default=0.5, help="density of the equal-weight ties merge")
    ap.add_argument("--method", choices=["ties", "tsv"], default="ties",
                    help="bundled family: the searched operator (tsv: weight [0, 2] per model and group, lambda 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep run directories here")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.real:
        if args.family == REPO / "mergelab/demo/family":
            from benchmarks.real_family import DEFAULT_OUT
            args.family = DEFAULT_OUT
        return real_main(args)

    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.spec import EvalSpec
    from mergelab.trial import TrialMerger

    fam = args.family
    for d in ["base", *SKILLS]:
        if not (fam / d / "config.json").is_file():
            raise SystemExit(f"{fam / d} is not a model directory; train the family first "
                             "(python -m mergelab.demo.train_family) or pass --family.")
    fingerprint = _fingerprint(fam)
    work = args.work or Path(tempfile.mkdtemp(prefix="search_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tm = TrialMerger(str(fam / "base"), [str(fam / s) for s in SKILLS], device="cpu")
    test = Evaluator(EvalSpec.load(args.test), tm.tokenizer, "cpu")
    val = Evaluator(EvalSpec.load(args.val), tm.tokenizer, "cpu")
    rows: list[dict] = []

    def row(label: str, recipe=None, model_dir=None, val_score=None, trials=None, secs=None):
        r = _scorer(test, tm, recipe, model_dir)
        if val_score is None:
            val_score = _scorer(val, tm, recipe, model_dir).combined
        rows.append({"model": label, **{s: r.scores[s] for s in SKILLS}, "test": r.combined,
                     "val": val_score, "trials": trials, "seconds": secs})
        print(f"  {label}: test {r.combined:.4f} val {val_score:.4f}", file=sys.stderr, flush=True)

    row("base", model_dir=fam / "base")
    for s in SKILLS:
        row(f"fine-tune `{s}`", model_dir=fam / s)
    if args.method == "ties":
        eq = {"merge_method": "ties", "base_model": str(fam / "base"),
              "models": [{"model": str(fam / s), "parameters": {"weight": 1.0, "density": args.density}}
                         for s in SKILLS]}
        eq_label = f"ties, equal weights (w=1, d={args.density:g}, lambda=1)"
    else:
        eq = {"merge_method": "tsv", "base_model": str(fam / "base"),
              "models": [{"model": str(fam / s), "parameters": {"weight": 1.0}} for s in SKILLS]}
        eq_label = "tsv, equal weights (w=1)"
    row(eq_label, recipe=eq)
    args.warm_start = None
    if not args.no_warm_start:
        args.warm_start = work / f"equal_weight_{args.method}.yaml"
        args.warm_start.write_text(yaml.safe_dump(eq, sort_keys=False))
    searches = [("random", args.random)] + [("cmaes", n) for n in args.cmaes]
    configs = {}
    for opt, n in searches:
        best, secs, cfg = _search(f"{opt}-{n}", opt, n, args, work)
        configs[f"{opt}-{n}"] = cfg
        row(f"best of {n} `{opt}` trials (trial {best['number']})", recipe=best["recipe"],
            val_score=best["value"], trials=n, secs=secs)

    total = time.perf_counter() - t_start
    if _fingerprint(fam) != fingerprint:
        raise SystemExit(f"The model files under {fam} changed while the benchmark ran; the rows "
                         "mix two families. Run it again once the family is final.")
    cmd = "python benchmarks/search_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Search quality on the bundled family (exact match, fraction correct per skill; "
          f"combined = sum of the three). Fitness: VAL split ({args.val.name}); every number below "
          f"is the TEST split ({args.test.name}), items no search scored. Space: "
          + (f"ties, {args.layer_groups} layer groups, weight [0, 1] and density [0.1, 1] per model and "
             f"group, lambda {list(args.lambda_range)}; " if args.method == "ties" else
             f"tsv, {args.layer_groups} layer groups, weight [0, 2] per model and group, lambda 1; ")
          + f"{f'warm start: the equal-weight {args.method} merge is trial 0 of every search; ' if args.warm_start else ''}"
          f"seed {args.seed}; CPU, {args.threads} thread(s).\n")
    print("| model | addition | sort | reverse | combined (test) | combined (val) | search time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        print(f"| {r['model']} | {r['addition']:.3f} | {r['sort']:.3f} | {r['reverse']:.3f} | "
              f"**{r['test']:.3f}** | {r['val']:.3f} | {t} |")
    print(f"\nCommand: `{cmd.strip()}` ({total:.0f} s in all; run directories in {work}).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "configs": configs, "seconds": total}, indent=2))
    eq_test = next(r["test"] for r in rows if r["model"].startswith(f"{args.method}, equal"))
    best_cmaes = max(r["test"] for r in rows if "`cmaes`" in r["model"])
    print(f"\nsearched (best cmaes) {best_cmaes:.4f} vs equal-weight {args.method} {eq_test:.4f}: "
          f"{'BEATS' if best_cmaes > eq_test else 'does NOT beat'} it.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
