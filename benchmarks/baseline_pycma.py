"""The baseline every search-quality claim is measured against: a plain pycma task-arithmetic search.

What a user would write in forty lines without mergelab: per model, one task-arithmetic weight for
the embeddings/final norm (SmolLM2 ties the head to the embeddings) and one per group of layers
(3 contiguous groups), so 2+ models x 4 values; pycma from x0 = 0.5 everywhere, sigma 0.3, popsize 8,
bounds [0, 1]; theta = base + sum_i w_i (theta_i - base) merged in place with torch; fitness the VAL
split's mean exact match; the best-by-val candidate is scored on the TEST split at the end. Scoring
goes through mergelab's evaluator so both searches read the same items the same way.

Usage: nice -n 10 python benchmarks/baseline_pycma.py [--family ~/.cache/mergelab/real_family]
       [--seeds 1 2 3] [--trials 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.real_family import DEFAULT_OUT, require_family, skill_spec  # noqa: E402


@dataclass
class BaselineResult:
    seed: int
    trials: int
    best_trial: int
    val: float          # mean of the skills' val accuracy of the best candidate
    test: float         # mean of the skills' test accuracy of the same candidate
    test_skills: dict
    weights: list       # [model][group], group 0 = embeddings/final norm
    seconds: float      # the search's wall time (val scoring of every trial)


class TaskArithmetic:
    """The base model's tensors overwritten in place with base + sum_i w[i][g] * delta_i."""

    def __init__(self, family: Path, models: list[str], groups: int):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(family / "base", dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(family / "base")
        self.params = dict(self.model.named_parameters())
        base = load_file(family / "base" / "model.safetensors")
        self.base = {k: base[k] for k in self.params}
        self.deltas = []
        for m in models:
            ft = load_file(family / m / "model.safetensors")
            self.deltas.append({k: ft[k] - self.base[k] for k in self.params})
        n_layers = self.model.config.num_hidden_layers
        self.group = {k: self._group(k, n_layers, groups) for k in self.params}

    @staticmethod
    def _group(name: str, n_layers: int, groups: int) -> int:
        """0 for tensors outside the layers (embeddings, final norm); 1..groups by layer index."""
        parts = name.split(".")
        if "layers" in parts:
            layer = int(parts[parts.index("layers") + 1])
            return 1 + layer * groups // n_layers
        return 0

    @torch.no_grad()
    def set(self, w) -> None:
        for k, p in self.params.items():
            g = self.group[k]
            p.copy_(self.base[k])
            for i, d in enumerate(self.deltas):
                p.add_(d[k], alpha=float(w[i][g]))


def run(args, seed: int, ta: TaskArithmetic, val, test) -> BaselineResult:
    import cma

    from mergelab.eval.models import HFLogitModel

    n_models, n_values = len(args.models), 1 + args.groups
    es = cma.CMAEvolutionStrategy(
        [args.x0] * (n_models * n_values), args.sigma,
        {"popsize": args.popsize, "bounds": list(args.bounds), "seed": seed, "verbose": -9},
    )
    best = (-1.0, None, -1)
    t0, n = time.perf_counter(), 0
    while n < args.trials:
        xs = es.ask()[: args.trials - n]
        losses = []
        for x in xs:
            w = [list(x[i * n_values:(i + 1) * n_values]) for i in range(n_models)]
            ta.set(w)
            r = val.evaluate(HFLogitModel(ta.model, ta.tokenizer))
            # the mean of the skills (sum) or the spec's geometric mean (combine geometric)
            fit = r.combined if r.combine == "geometric" else sum(r.scores.values()) / len(r.scores)
            losses.append(-fit)
            if fit > best[0]:
                best = (fit, w, n)
            print(f"  seed {seed} trial {n}: val {fit:.3f}", file=sys.stderr, flush=True)
            n += 1
        if len(xs) == args.popsize:
            es.tell(xs, losses)
    secs = time.perf_counter() - t0
    ta.set(best[1])
    r = test.evaluate(HFLogitModel(ta.model, ta.tokenizer))
    skills = dict(r.scores)
    return BaselineResult(seed, args.trials, best[2], best[0], sum(skills.values()) / len(skills), skills,
                          [[round(v, 4) for v in row] for row in best[1]], secs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--models", nargs="+", default=["date", "rev", "time"],
                    help="the fine-tunes merged; fitness and test score their skills only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--groups", type=int, default=3, help="layer groups (plus one for embeddings/norm)")
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.3)
    ap.add_argument("--x0", type=float, default=0.5)
    ap.add_argument("--bounds", type=float, nargs=2, default=[0.0, 1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--combine", choices=["sum", "geometric"], default="sum",
                    help="how the val skills' scores combine into the fitness")
    ap.add_argument("--fitness", choices=["accuracy", "answer_prob"], default="accuracy",
                    help="the val scorers' score (answer_prob: exact_match mode forced, p(answer))")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    require_family(args.family, args.models)

    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.spec import EvalSpec

    ta = TaskArithmetic(args.family, args.models, args.groups)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="baseline_pycma-"))
    val = Evaluator(EvalSpec.load(skill_spec(args.family, "val", args.models, tmp / "val.yml", args.fitness, args.combine)),
                    ta.tokenizer, "cpu")
    test = Evaluator(EvalSpec.load(skill_spec(args.family, "test", args.models, tmp / "test.yml")), ta.tokenizer, "cpu")
    results = []
    for seed in args.seeds:
        r = run(args, seed, ta, val, test)
        results.append(r)
        print(f"seed {seed}: best trial {r.best_trial} val {r.val:.3f} test {r.test:.3f} "
              f"({' '.join(f'{k} {v:.2f}' for k, v in r.test_skills.items())}) "
              f"{r.seconds / r.trials:.1f} s/trial", flush=True)
    mean = sum(r.test for r in results) / len(results)
    print(f"mean test over seeds {args.seeds}: {mean:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
