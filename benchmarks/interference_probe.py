"""Where the real family's skills interfere: hand-set task-arithmetic merges of the `date`, `rev`
and `time` fine-tunes (benchmarks/real_family.py), merged in memory and scored on the VAL split
(20 items per skill, generated exact match). A diagnosis of what limits the search, not a search:
weights per model, per layer third (g) or per tensor family (f: self_attn, mlp, everything else).

    python benchmarks/interference_probe.py [--family DIR] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.real_family import DEFAULT_OUT, SKILLS, require_family, skill_spec  # noqa: E402


def g(a, b, c):
    """Per-layer weights: the first, middle and last ten of SmolLM2-135M's 30 layers."""
    return [a] * 10 + [b] * 10 + [c] * 10


def mlp_except(blocks, attn=0.0):
    """date's MLP at weight 1 in every layer except the 3-layer blocks named (block b: layers
    3b..3b+2), its attention at `attn`, everything else 0."""
    lay = [0.0 if i // 3 in blocks else 1.0 for i in range(30)]
    return [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": lay}, {"value": 0.0}]


def f(attn, mlp, other):
    """Per-tensor-family weights (mergekit's filter syntax)."""
    return [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": other}]


PROBES = {
    "pairs": [(0, 0, 1), (1, 0, 1), (0, 1, 1), (0, 0, 1.5), (0.5, 0, 1), (0, 0.5, 1), (0.4, 0.7, 1.3)],
    "date by layer third, with time": [(g(1, 0, 0), 0, 1), (g(0, 1, 0), 0, 1), (g(0, 0, 1), 0, 1),
                                       (g(1, 1, 0), 0, 1), (g(1, 0, 1), 0, 1), (1, 0, g(1, 0, 0))],
    "date by tensor family, with time": [(f(1, 0, 0), 0, 1), (f(0, 1, 0), 0, 1), (f(0, 0, 1), 0, 1),
                                         (f(1, 1, 0), 0, 1), (f(0, 0.7, 0), 0, 1), (f(0, 0.5, 0), 0, 1),
                                         (f(0.3, 0.7, 0), 0, 1), (f(0, 0.7, 0), 0, f(1, 1.3, 1))],
    "date MLP without one 3-layer block, with time": [(mlp_except({b}), 0, 1) for b in range(10)],
    "date MLP without blocks 5-6 (layers 15-20)": [(mlp_except({5, 6}), 0, 1), (mlp_except({5, 6}, 0.3), 0, 1),
                                                    (mlp_except({5, 6}, 0.3), 0.7, 1),
                                                    (mlp_except({5, 6}, 0.3), 1, 1)],
    "all three": [(f(0, 0.7, 0), 0.5, 1), (f(0, 0.7, 0), 0.7, 1), (f(0, 0.7, 0), f(0.3, 0.7, 0.5), 1)],
}


def show(w) -> str:
    if isinstance(w, list) and w and isinstance(w[0], dict):
        if isinstance(w[1]["value"], list):  # mlp_except
            gone = sorted({i // 3 for i, v in enumerate(w[1]["value"]) if v == 0})
            return f"mlp w/o {','.join(map(str, gone))} attn {w[0]['value']:g}"
        return "f(" + ",".join(f"{x['value']:g}" for x in w) + ")"
    if isinstance(w, list):
        return f"g({w[0]:g},{w[10]:g},{w[20]:g})"
    return f"{w:g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    require_family(args.family, SKILLS)
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.models import HFLogitModel
    from mergelab.eval.spec import EvalSpec
    from mergelab.trial import TrialMerger

    fam = args.family
    spec = skill_spec(fam, "val", SKILLS, Path(tempfile.mkdtemp(prefix="probe-")) / "val.yml")
    tm = TrialMerger(str(fam / "base"), [str(fam / s) for s in SKILLS], device="cpu")
    ev = Evaluator(EvalSpec.load(spec), tm.tokenizer, "cpu")
    print(f"| weights ({' / '.join(SKILLS)}) | " + " | ".join(SKILLS) + " |")
    print("|---|" + "---:|" * len(SKILLS))
    for title, probes in PROBES.items():
        print(f"| *{title}* |" + " |" * len(SKILLS))
        for ws in probes:
            recipe = {"merge_method": "task_arithmetic", "base_model": str(fam / "base"), "dtype": "float32",
                      "models": [{"model": str(fam / s), "parameters": {"weight": w}} for s, w in zip(SKILLS, ws)]}
            r = ev.evaluate(HFLogitModel(tm.apply(recipe), tm.tokenizer))
            print(f"| {' / '.join(show(w) for w in ws)} | " + " | ".join(f"{r.scores[s]:.2f}" for s in SKILLS)
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
