"""Cost of logit fusion against running its K models one after another (their own forwards).

Random Llamas of about 135M parameters built from a config (and the bundled family when present);
prints scoring and greedy-generation times and fusion's overhead over the sum of the K models.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import statistics
import time
from pathlib import Path

import torch

from mergelab.eval.models import HFLogitModel
from mergelab.fusion import FusedLogitModel, _Workspace, fuse_logits, fusion_weights, prompt_target_mask


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
    """Per-rep times of each baseline (the sum of its K runs) and of each candidate.

    Every rep runs everything once, the order rotated from rep to rep so that no candidate always
    follows the same one. One warm-up run of a baseline model and of the last candidate first
    (weights, buffers and numba's cached loops load); the minimum over reps discards the rest
    of a first run's extra cost. Returns {name: [seconds per rep]}.
    """
    items = [(k, fns) for k, fns in baselines.items()] + [(k, [fn]) for k, fn in candidates.items()]
    items[0][1][0]()
    items[-1][1][0]()
    times = {k: [] for k, _ in items}
    for r in range(reps):
        for k, fns in items[r % len(items):] + items[: r % len(items)]:
            gc.collect()
            times[k].append(sum(_timed(fn, device) for fn in fns))
    return times


def _median_ci(values, level=0.95):
    """Distribution-free confidence interval for the median: order statistics (k, n + 1 - k),
    k the largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None below 6 values (no such
    k exists at 95%)."""
    xs, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while True:
        tail += math.comb(n, k) / 2 ** n
        if tail > (1 - level) / 2:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


def _overheads(times, base, cand):
    """(min-based overhead, median over reps of the paired overhead, its 95% interval), in percent.

    min/min compares each side's least disturbed run; the paired median compares runs made
    seconds apart, so a slow phase of the machine lands on both sides of a pair. On a shared
    machine whose speed drifts by ±15% from run to run, the min of a few runs is itself a noisy
    draw; the interval says how far the paired median can be trusted.
    """
    b, c = times[base], times[cand]
    pairs = [100 * (ci / bi - 1) for bi, ci in zip(b, c)]
    return 100 * (min(c) / min(b) - 1), statistics.median(pairs), _median_ci(pairs)


def _ci_text(ci):
    return f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "(n<6)"


class _Replay:
    """A fusion member that hands back logits computed beforehand: a fused generation over
    replay members runs the real `generate_greedy` loop (weights from the prompt, the per-step
    mask, positions and weighted sums, the argmax) with forwards that cost nothing, so its time
    is the fusion's own work in a generation."""

    def __init__(self, prompt_logits, step_logits, device):
        self.prompt, self.steps, self.i = prompt_logits, step_logits, 0
        self.rows, self.device = prompt_logits.shape[-1], device

    def prefill(self, input_ids, attention_mask, use_cache=True):
        self.i = 0
        return self.prompt, {}

    def step(self, state, tokens, mask, pos):
        self.i += 1
        return self.steps[(self.i - 1) % len(self.steps)]


def _full_logit_generator(model):
    """HFLogitModel's greedy generation with the prompt's logits at every position, as fusion's
    prefill computes them (its own generation keeps the last position only): the model's own
    forward passes over the tokens a fused generation processes."""
    full = HFLogitModel(model)
    assert hasattr(full, "_keep_last"), "HFLogitModel changed: update the full-logit baseline"
    full._keep_last = False
    return full


def _interleaved_forwards(models, ids, mask, new_tokens, vocab):
    """(c): the same forward passes as (a), each model decoding its own greedy tokens, but the K
    models' calls taken in turn token by token, as a fusion must (it needs every model's logits
    before the next token). Not a target, an explanation: for models of a few MB the
    alternation alone costs some percent (no model's weights stay in the L2 cache)."""
    from mergelab.eval.models import _cache_of, _positions

    with torch.inference_mode():
        ms, pos, outs, caches = [], _positions(mask), [], []
        for m in models:
            kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            out = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            ms.append((m, kw))
            outs.append(out)
            caches.append(_cache_of(out))
        masks, last = [mask] * len(models), [pos[:, -1:]] * len(models)
        for _ in range(new_tokens - 1):
            for k, (m, kw) in enumerate(ms):
                tok = outs[k].logits[:, -1, :vocab].argmax(-1)
                tok.tolist()
                masks[k] = torch.cat([masks[k], masks[k].new_ones(ids.shape[0], 1)], dim=1)
                last[k] = last[k] + 1
                outs[k] = m(input_ids=tok[:, None], attention_mask=masks[k], position_ids=last[k],
                            use_cache=True, **{kw: caches[k]})
                caches[k] = _cache_of(outs[k])


def _generation_work(models, singles, weightings, gen_ids, gen_mask, new_tokens, device):
    """Per weighting, the min time of a fused generation whose members replay logits computed
    once (the prompt's logits at every position and one step's logits per model)."""
    from mergelab.eval.models import _cache_of

    replays = []
    with torch.inference_mode():
        for m, s in zip(models, singles):
            prompt = s.logits(gen_ids, gen_mask).float()
            out = m(input_ids=gen_ids, attention_mask=gen_mask,
                    position_ids=(gen_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            grown = torch.cat([gen_mask, gen_mask.new_ones(gen_mask.shape[0], 1)], 1)
            kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            step = m(input_ids=tok, attention_mask=grown, position_ids=(grown.cumsum(-1) - 1)[:, -1:],
                     use_cache=True, **{kw: _cache_of(out)}).logits[:, -1]
            replays.append(_Replay(prompt, [step.float()], device))
            del out
    work = {}
    for w in weightings:
        fused = FusedLogitModel(models, weighting=w)
        fused.members = replays  # the same loop, with forwards that cost nothing
        run = lambda f=fused: f.generate_greedy(gen_ids, gen_mask, new_tokens)
        first = _timed(run, device)
        runs = max(7, min(200, int(0.3 / max(first, 1e-6))))
        work[w] = min(_timed(run, device) for _ in range(runs))
    return work


def bench(models, label, batch, seq, prompt_len, new_tokens, reps, gen_reps, weightings, vocab=None,
          gen_baselines=("a", "b", "c")):
    device = next(models[0].parameters()).device
    singles = [HFLogitModel(m) for m in models]
    fulls = [_full_logit_generator(m) for m in models]
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
          f"threads {torch.get_num_threads()}, {clock}; scoring {reps} reps, generation "
          f"{gen_reps} reps, order rotated", flush=True)
    fused = {w: FusedLogitModel(models, weighting=w) for w in weightings}
    # The fusion's own work on logits computed once (weights from the prompt, then the weighted
    # sum into a buffer of ours, as the fused model sums into a member's logits): small and steady,
    # it shows what the end-to-end difference, a few percent of much larger noisy times, is made of.
    with torch.inference_mode():
        logits = [s.logits(ids, mask, plen) for s in singles]
        target = prompt_target_mask(mask, plen)
        out, ws = torch.empty_like(logits[0]), _Workspace()
        work = {}
        for w in weightings:
            def run(w=w):
                fuse_logits(logits, fusion_weights(w, logits, ids, target, workspace=ws).weights, out=out)
            first = _timed(run, device)
            # At least 7 runs, more for a tiny model (about 0.3 s of them): the min of a
            # sub-millisecond time needs many draws on a shared machine.
            runs = max(7, min(200, int(0.3 / max(first, 1e-6))))
            work[w] = min(_timed(run, device) for _ in range(runs))
        del logits, out
    gen_work = _generation_work(models, singles, weightings, gen_ids, gen_mask, new_tokens, device)
    score = _compare(
        {"K forwards": [lambda s=s: s.logits(ids, mask, plen) for s in singles]},
        {w: (lambda f=f: f.logits(ids, mask, plen)) for w, f in fused.items()}, reps, device)
    baselines = {
        "a": ("(a) K forwards", [lambda s=s: s.generate_greedy(gen_ids, gen_mask, new_tokens) for s in fulls]),
        "b": ("(b) K generations", [lambda s=s: s.generate_greedy(gen_ids, gen_mask, new_tokens) for s in singles]),
        "c": ("(c) K forwards, in turn",
              [lambda: _interleaved_forwards(models, gen_ids, gen_mask, new_tokens, vocab)]),
    }
    gens = _compare(
        dict(baselines[b] for b in gen_baselines),
        {w: (lambda f=f: f.generate_greedy(gen_ids, gen_mask, new_tokens)) for w, f in fused.items()},
        gen_reps, device)
    result = {"label": label, "k": len(models), "params_m": round(params, 1), "batch": batch, "seq": seq,
              "prompt": prompt_len, "new_tokens": new_tokens, "clock": clock, "scoring": {}, "generation": {}}
    base = min(score["K forwards"])
    print(f"{'scoring (logits at every position)':<44} {'min s':>7} {'vs K forwards':>14} {'paired':>8} "
          f"{'95% interval':>16} {'work s':>8} {'work %':>7}")
    print(f"{'  K forwards (sum of the K models)':<44} {base:7.3f}")
    result["scoring"]["k_forwards_s"] = base
    for w in weightings:
        o_min, o_med, o_ci = _overheads(score, "K forwards", w)
        print(f"{'  fused, ' + w:<44} {min(score[w]):7.3f} {o_min:+13.1f}% {o_med:+7.1f}% "
              f"{_ci_text(o_ci):>16} {work[w]:8.3f} {100 * work[w] / base:6.1f}%")
        result["scoring"][w] = {"s": min(score[w]), "overhead_vs_k_forwards_pct": round(o_min, 2),
                                "paired_median_pct": round(o_med, 2), "paired_median_ci95_pct": o_ci,
                                "fusion_work_s": work[w],
                                "fusion_work_pct_of_k_forwards": round(100 * work[w] / base, 2)}
    names = [baselines[b][0] for b in gen_baselines]
    head = "".join(f"{'vs ' + n[:3]:>9} {'paired':>8} {'95% interval':>16}" for n in names)
    print(f"{f'generation ({new_tokens} new tokens)':<44} {'min s':>7}{head} {'work s':>8} {'% of (a)':>8}")
    notes = {"(a) K forwards": "full-logit prefill + steps", "(b) K generations": "last-logit prefill",
             "(c) K forwards, in turn": "as (a), the K models in turn per token"}
    keys = {"(a) K forwards": "a_k_forwards_full_logit_prefill_s",
            "(b) K generations": "b_k_generations_last_logit_prefill_s",
            "(c) K forwards, in turn": "c_k_forwards_in_turn_s"}
    for n in names:
        print(f"{'  ' + n[:3] + ' ' + notes[n]:<44} {min(gens[n]):7.3f}")
        result["generation"][keys[n]] = min(gens[n])
    a_base = min(gens["(a) K forwards"]) if "(a) K forwards" in gens else None
    for w in weightings:
        row, entry = "", {"s": min(gens[w]), "fusion_work_s": gen_work[w]}
        for n in names:
            o_min, o_med, o_ci = _overheads(gens, n, w)
            row += f"{o_min:+8.1f}% {o_med:+7.1f}% {_ci_text(o_ci):>16}"
            tag = n[1]
            entry[f"overhead_vs_{tag}_pct"] = round(o_min, 2)
            entry[f"paired_median_vs_{tag}_pct"] = round(o_med, 2)
            entry[f"paired_median_vs_{tag}_ci95_pct"] = o_ci
        share = f"{100 * gen_work[w] / a_base:7.1f}%" if a_base else f"{'':>8}"
        if a_base:
            entry["fusion_work_pct_of_a"] = round(100 * gen_work[w] / a_base, 2)
        print(f"{'  fused, ' + w:<44} {min(gens[w]):7.3f}{row} {gen_work[w]:8.3f} {share}")
        result["generation"][w] = entry
    return result


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
    ap.add_argument("--reps", type=int, default=8, help="scoring reps (interleaved, order rotated)")
    ap.add_argument("--gen-reps", type=int, default=8, help="generation reps")
    ap.add_argument("--gen-baselines", default="a,b,c",
                    help="generation baselines to run (comma-separated): a (the K models' forwards "
                         "over the tokens a fusion processes), b (their plain generations), c (as a, "
                         "the models taken in turn per token)")
    ap.add_argument("--family-reps", type=int, default=30,
                    help="reps (scoring and generation) for the family, whose runs take milliseconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weightings", default="sim,opt,uniform,top1")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: CPU time of this process, steadier than wall time on a shared machine "
                         "(on the CPU only; a GPU's work is not counted)")
    ap.add_argument("--family", default="mergelab/demo/family",
                    help="Directory of the bundled family (each subdirectory a model); skipped if absent.")
    ap.add_argument("--parts", default="random,family",
                    help="Which benchmarks to run: random (the ~135M random Llamas), family, or both.")
    ap.add_argument("--json", help="Also write the results to this JSON file.")
    args = ap.parse_args()
    started = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    device = torch.device(args.device)
    weightings = args.weightings.split(",")
    parts = set(args.parts.split(","))
    gen_baselines = tuple(b.strip() for b in args.gen_baselines.split(",") if b.strip())
    if not gen_baselines or set(gen_baselines) - {"a", "b", "c"}:
        ap.error(f"--gen-baselines takes a comma-separated subset of a, b, c; got {args.gen_baselines!r}")
    results = []
    if "random" in parts:
        models = [_random_llama(args.hidden, args.layers, args.vocab, s).to(device) for s in range(args.k)]
        results.append(bench(models, "random Llama", args.batch, args.seq, args.prompt_len, args.new_tokens,
                             args.reps, args.gen_reps, weightings, gen_baselines=gen_baselines))
        del models
    fam = Path(args.family)
    dirs = sorted(d for d in fam.iterdir() if (d / "config.json").is_file()) if fam.is_dir() else []
    if "family" not in parts:
        dirs = []
    if dirs:
        from mergelab.eval.models import load_model

        loaded = [load_model(d, device=device) for d in dirs]
        results.append(bench(
            [m for m, _ in loaded], f"family {fam} ({', '.join(d.name for d in dirs)})", args.batch,
            min(args.seq, 64), min(args.prompt_len, 48), args.new_tokens, args.family_reps, args.family_reps,
            weightings, vocab=len(loaded[0][1]), gen_baselines=gen_baselines))
    elif "family" in parts:
        print(f"\n(no family found under {fam}; skipped)")
    print("\nScoring: the fused model's logits at every position against the K models' forwards "
          "(the same tokens).\nGeneration: (a) the K models' own forward passes over the tokens "
          "a fused generation processes\n(prefill with logits at every position, as fusion needs "
          "them for the prompt's perplexity, then\nthe cached one-token steps); (b) the K models' "
          "plain greedy generations, whose prefill keeps the\nlast position's logits only; (c) the "
          "forwards of (a) with the K models taken in turn per token, as a fusion must\n(the cost "
          "of that alternation alone shows as (c) over (a)). 'min s': "
          "least time over the reps; overhead vs a baseline: min/min;\n'paired': median over reps of "
          "the overhead within a rep, with its distribution-free 95% interval (order statistics);\n"
          "'work': the fusion's own computation on logits computed once, min of at least 7 runs: in "
          "scoring the weights and the\nweighted sum, as a share of the K forwards; in generation the "
          "real generation loop with members that replay\nlogits (weights from the prompt, per-step "
          "sums, argmax), as a share of (a).")
    print(f"(benchmark: {time.perf_counter() - started[0]:.0f} s wall, "
          f"{time.process_time() - started[1]:.0f} s CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
