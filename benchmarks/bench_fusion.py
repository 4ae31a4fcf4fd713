"""Cost of logit fusion against running its K models one after another (their own forwards).

Random Llamas of about 135M parameters built from a config (and the bundled family when present);
prints scoring and greedy-generation times and fusion's overhead over the sum of the K models.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mergelab.eval.models import HFLogitModel
from mergelab.fusion import FusedLogitModel


def _random_llama(hidden, layers, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter  # --clock process: CPU seconds of this process (all its threads)


def _timed(fn, device):
    _sync(device)
    t = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - t


def _compare(baselines, candidates, reps, device):
    """Minimum over reps of sum(baselines) and of each candidate, measured interleaved.

    Interleaving and the minimum keep a busy machine's noise from landing on one side only.
    """
    for fn in baselines + list(candidates.values()):
        fn()  # warm-up
    base, cand = [], {k: [] for k in candidates}
    for _ in range(reps):
        base.append(sum(_timed(fn, device) for fn in baselines))
        for k, fn in candidates.items():
            cand[k].append(_timed(fn, device))
    return min(base), {k: min(v) for k, v in cand.items()}


def bench(models, label, batch, seq, prompt_len, new_tokens, reps, weightings, vocab=None):
    device = next(models[0].parameters()).device
    singles = [HFLogitModel(m) for m in models]
    vocab = vocab or min(s.vocab_size for s in singles)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 4] = 0  # one left-padded row, as the eval sends them
    plen = mask.sum(-1).clamp(max=prompt_len)
    ids, mask, plen = ids.to(device), mask.to(device), plen.to(device)
    gen_ids, gen_mask = ids[:, :prompt_len], mask[:, :prompt_len]
    params = sum(p.numel() for p in models[0].parameters()) / 1e6
    clock = "CPU seconds of the process" if CLOCK is time.process_time else "wall seconds"
    print(f"\n== {label}: K={len(models)} models of {params:.1f}M parameters, batch {batch}, "
          f"seq {seq} (prompt {prompt_len}), {new_tokens} new tokens, device {device}, "
          f"threads {torch.get_num_threads()}, min of {reps} interleaved reps, {clock}", flush=True)
    fused = {w: FusedLogitModel(models, weighting=w) for w in weightings}
    base_score, score = _compare(
        [lambda s=s: s.logits(ids, mask, plen) for s in singles],
        {w: (lambda f=f: f.logits(ids, mask, plen)) for w, f in fused.items()}, reps, device)
    base_gen, gens = _compare(
        [lambda s=s: s.generate_greedy(gen_ids, gen_mask, new_tokens) for s in singles],
        {w: (lambda f=f: f.generate_greedy(gen_ids, gen_mask, new_tokens)) for w, f in fused.items()},
        reps, device)
    print(f"{'':>24} {'seconds':>8} {'overhead':>9}")
    print(f"{'K forwards (sum)':>24} {base_score:8.3f}")
    for w, t in score.items():
        print(f"{'fused scoring, ' + w:>24} {t:8.3f} {100 * (t / base_score - 1):+8.1f}%")
    print(f"{'K generations (sum)':>24} {base_gen:8.3f}")
    for w, t in gens.items():
        print(f"{'fused generation, ' + w:>24} {t:8.3f} {100 * (t / base_gen - 1):+8.1f}%")
    return base_score, score, base_gen, gens


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weightings", default="sim,opt,uniform,top1")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: CPU time of this process, steadier than wall time on a shared machine "
                         "(on the CPU only; a GPU's work is not counted)")
    ap.add_argument("--family", default="mergelab/demo/family",
                    help="Directory of the bundled family (each subdirectory a model); skipped if absent.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    device = torch.device(args.device)
    weightings = args.weightings.split(",")
    models = [_random_llama(args.hidden, args.layers, args.vocab, s).to(device) for s in range(args.k)]
    bench(models, "random Llama", args.batch, args.seq, args.prompt_len, args.new_tokens, args.reps, weightings)
    fam = Path(args.family)
    dirs = sorted(d for d in fam.iterdir() if (d / "config.json").is_file()) if fam.is_dir() else []
    if dirs:
        from mergelab.eval.models import load_model

        loaded = [load_model(d, device=device) for d in dirs]
        bench([m for m, _ in loaded], f"family {fam} ({', '.join(d.name for d in dirs)})", args.batch,
              min(args.seq, 64), min(args.prompt_len, 48), args.new_tokens, args.reps, weightings,
              vocab=len(loaded[0][1]))
    else:
        print(f"\n(no family found under {fam}; skipped)")


if __name__ == "__main__":
    main()
