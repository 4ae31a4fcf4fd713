"""Which fine-tune of the bundled family logit fusion (PackLLM) weights most, per skill and prompt form.

Builds k-shot prompts (solved VAL examples, then a TEST prompt) and prints mean weights and top-1 rates.

Run from the repository root: `python -m benchmarks.fusion_family_weights [--items N] [--shots 0 3]`.
Columns: mean sim/opt weight of each model (tau 1), the share of prompts where the skill's fine-tune
gets the largest weight, mean prompt log-perplexity ℓ per model (what PackLLM weighs by), and, as a
diagnostic, ℓ over the shots' answer tokens alone (the base was trained on answers only; the prompt-aware
fine-tunes on answers plus a 0.002-weighted loss on their own skill's prompts, `ft_prompt_loss`)
with the top-1 share that sim weights from it would give.
Default: the prompt-aware fine-tunes (mergelab/demo/family_prompt) with the demo base;
`--family mergelab/demo/family` measures the demo family's answer-only fine-tunes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergelab.fusion import FusedLogitModel, load_models, log_perplexities, sim_weights

REPO = Path(__file__).resolve().parents[1]
FAMILY = REPO / "mergelab" / "demo" / "family_prompt"  # the prompt-aware fine-tunes
BASE = REPO / "mergelab" / "demo" / "family" / "base"  # their base (the demo family's)
DATA = REPO / "mergelab" / "demo" / "data"
MODELS = ("base", "addition", "sort", "reverse")
SKILLS = ("addition", "sort", "reverse")


def read_items(skill: str, split: str) -> list[tuple[str, str]]:
    with open(DATA / skill / f"{split}.jsonl") as f:
        return [(r["prompt"], str(r["answer"])) for r in map(json.loads, f)]


def shots_for(val: list[tuple[str, str]], i: int, shots: int, mode: str) -> list[tuple[str, str]]:
    """Solved examples for test item i: the first `shots` VAL items ("fixed"), or a window that moves with i."""
    if mode == "fixed":
        return val[:shots]
    start = (i * shots) % len(val)
    return [val[(start + j) % len(val)] for j in range(shots)]


def few_shot_pieces(shots: list[tuple[str, str]], prompt: str) -> list[tuple[str, bool]]:
    """The prompt as (text, is a shot's answer) pieces; their concatenation is the prompt text.

    The family's own format: examples back to back as prompt + answer + "\\n" (how train_family
    packed its training rows, and where the eval specs stop), then the new prompt.
    """
    pieces = []
    for p, a in shots:
        pieces += [(p, False), (a + "\n", True)]
    return pieces + [(prompt, False)]


def encode(tok, pieces) -> tuple[list[int], list[bool]]:
    """Token ids as the scorers make them (BOS + the text; this tokenizer is one token per
    character, checked) and which tokens belong to a shot's answer (trained targets)."""
    ids, answer = [tok.bos_token_id], [False]
    for text, is_answer in pieces:
        e = tok(text, add_special_tokens=False)["input_ids"]
        ids += e
        answer += [is_answer] * len(e)
    assert ids == tok("".join(t for t, _ in pieces))["input_ids"]
    return ids, answer


def batch(rows):
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for r, (e, a) in enumerate(rows):  # left padding, as the scorers batch
        ids[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
        answer[r, width - len(e):] = torch.tensor(a)
    return ids, mask, answer


@torch.inference_mode()
def own_logits(models, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return [m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() for m in models]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", type=Path, default=FAMILY,
                    help="folder with addition/ sort/ reverse/ (and base/, else --base)")
    ap.add_argument("--base", type=Path, default=None, help=f"base model dir (default FAMILY/base if present, else {BASE})")
    ap.add_argument("--items", type=int, default=20, help="test items per skill (first N of test.jsonl)")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--modes", nargs="+", default=["moving", "fixed"], choices=["fixed", "moving"])
    ap.add_argument("--tau", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = args.base or (args.family / "base" if (args.family / "base").is_dir() else BASE)
    models, toks = load_models([str(base)] + [str(args.family / m) for m in MODELS[1:]], device="cpu")
    fused = FusedLogitModel(models, "sim", args.tau, tokenizers=toks, names=list(MODELS))
    tok, max_len = toks[0], models[0].config.max_position_embeddings
    print(f"{args.family}: loaded in {time.perf_counter() - t0:.2f} s; tau {args.tau}; "
          f"first {args.items} test items per skill; shots from the VAL split")
    cols = ["shots", "shot choice", "skill", "weighting"] + [f"w {m}" for m in MODELS] + ["right top"]
    cols += ["ℓ prompt " + "/".join(MODELS), "ℓ shot answers only", "right top on answers"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for shots in args.shots:
        for mode in args.modes if shots else ["-"]:
            for skill in SKILLS:
                val, test = read_items(skill, "val"), read_items(skill, "test")[: args.items]
                rows = [encode(tok, few_shot_pieces(shots_for(val, i, shots, mode), p)) for i, (p, _) in enumerate(test)]
                if max(len(r[0]) for r in rows) > max_len:
                    print(f"| {shots} | {mode} | {skill} | longer than {max_len} tokens: skipped |")
                    continue
                ids, mask, answer = batch(rows)
                right = MODELS.index(skill)
                # Diagnostic: ℓ on the shots' answer tokens only (the tokens the family was trained on).
                if shots:
                    ell_a = log_perplexities(own_logits(models, ids, mask), ids, answer)
                    diag = " / ".join(f"{x:.3f}" for x in ell_a.mean(0).tolist())
                    diag_top = f"{(sim_weights(ell_a).argmax(-1) == right).double().mean().item() * 100:.0f}%"
                else:
                    diag, diag_top = "-", "-"
                for weighting in ("sim", "opt"):
                    fused.weighting = weighting
                    fw = fused.weights(ids, mask, mask.sum(-1))
                    w = fw.weights.double()
                    top = (w.argmax(-1) == right).double().mean().item()
                    print(
                        f"| {shots} | {mode} | {skill} | {weighting} | "
                        + " | ".join(f"{x:.3f}" for x in w.mean(0).tolist())
                        + f" | {top * 100:.0f}% | " + " / ".join(f"{x:.2f}" for x in fw.log_ppl.mean(0).tolist())
                        + f" | {diag} | {diag_top} |"
                    )
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
