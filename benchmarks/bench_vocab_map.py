"""Time of cross-tokenizer fusion's vocabulary map between two real-size vocabularies built offline.

`--kind bpe`: two BPEs trained with `tokenizers` on the same generated text, a sentencepiece-style
one (Metaspace, byte fallback, 32k) and a byte-level one (GPT-2 alphabet, 150k), like a Llama-2 /
Qwen pair. `--kind synthetic`: WordLevel vocabularies of synthetic syllable words that overlap
little (most pivot tokens go to the edit-distance search), the slow case. Both directions timed.
"""
from __future__ import annotations

import argparse
import itertools
import random
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mergelab.fusion_vocab import _BYTE_DECODER, tokenizer_vocab_map

_CONS, _VOW = "bcdfghjklmnprstvwz", "aeiou"
_SYLLS = [c + v for c in _CONS for v in _VOW] + [c + v + e for c in _CONS for v in _VOW for e in "nrst"]
_SP_SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]


def _fast(tok, **special):
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _sp_pipeline(tok, byte_fallback):
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()]) if byte_fallback \
        else decoders.Metaspace()
    return _fast(tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _bl_pipeline(tok):
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def bpe_pair(n_pivot: int, n_other: int, lines: int):
    rng = random.Random(0)
    lex = sorted({"".join(rng.choice(_SYLLS) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))) for _ in range(400_000)})
    cum = list(itertools.accumulate(1 / (i + 10) for i in range(len(lex))))  # Zipf-like word frequencies
    r = random.Random(1)
    corpus = []
    for _ in range(lines):
        ws = r.choices(lex, cum_weights=cum, k=12)
        corpus.append(" ".join(w.capitalize() if r.random() < 0.1 else w for w in ws)
                      + r.choice(".,!?;") + " " + str(r.randint(0, 9999)))
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=n_pivot, special_tokens=_SP_SPECIALS))
    bl = Tokenizer(models.BPE())
    bl.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=n_other, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _sp_pipeline(sp, True), _bl_pipeline(bl)


def _words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_SYLLS) for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))
        w = w[: rng.randint(2, len(w))] if rng.random() < 0.3 else w
        if rng.random() < 0.1:
            w = w.capitalize()
        if rng.random() < 0.05:
            w += rng.choice("0123456789.,;:!?")
        out.add((" " + w) if rng.random() < 0.6 else w)
    return sorted(out)


def synthetic_pair(n_pivot: int, n_other: int):
    sp = _SP_SPECIALS + [w.replace(" ", "▁") for w in _words(1, n_pivot - len(_SP_SPECIALS))]
    enc = {b: c for c, b in _BYTE_DECODER.items()}
    bl = ["<|endoftext|>"] + sorted(_BYTE_DECODER)
    bl += ["".join(enc[b] for b in w.encode()) for w in _words(2, n_other - len(bl))]
    t_sp = Tokenizer(models.WordLevel({t: i for i, t in enumerate(sp)}, unk_token="<unk>"))
    t_bl = Tokenizer(models.WordLevel({t: i for i, t in enumerate(bl)}, unk_token="<|endoftext|>"))
    return _sp_pipeline(t_sp, False), _bl_pipeline(t_bl)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kind", choices=("bpe", "synthetic"), default="bpe")
    ap.add_argument("--pivot", type=int, default=32_000)
    ap.add_argument("--other", type=int, default=150_000)
    ap.add_argument("--lines", type=int, default=300_000, help="training text lines (--kind bpe)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    a, b = bpe_pair(args.pivot, args.other, args.lines) if args.kind == "bpe" else synthetic_pair(args.pivot, args.other)
    print(f"{args.kind}: {len(a.get_vocab())} and {len(b.get_vocab())} tokens, built in {time.perf_counter() - t0:.0f} s")
    for name, x, y in (("pivot -> other", a, b), ("other -> pivot", b, a)):
        t0 = time.perf_counter()
        m = tokenizer_vocab_map(x, y)
        wall = time.perf_counter() - t0
        dist = m.distance[m.distance > 0]
        print(f"  {name}: {wall:.1f} s wall (the map itself {m.seconds:.1f} s); exact {m.exact}, special "
              f"{m.special}, nearest {m.nearest} (mean distance {dist.mean() if dist.size else 0:.2f}, "
              f"max {m.distance.max()})")


if __name__ == "__main__":
    main()
