"""Train the bundled model family on CPU: a character-level Llama base on a mixture of skills, then one fine-tune per skill.

Also writes the skill data splits and eval specs, and measures each model and a few merges into RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SKILLS = ("addition", "sort", "reverse")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# Every character any skill can produce; the tokenizer has one token per character.
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+=:> \n"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class FamilyConfig:
    """Every knob that shapes the family; recorded verbatim in TRAINING.md and each model dir."""

    seed: int = 0
    threads: int = 1  # the build machine is shared; one thread avoids OpenMP spin contention
    # Model (Llama architecture, untied embeddings so the head is its own merge target).
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    # Skills.
    add_max_digits: int = 2
    # Sorts of 5-9 digits with a small base share (base_mix) leave sort only partly learned in the base.
    sort_min_len: int = 5
    sort_max_len: int = 9
    reverse_min_len: int = 3
    reverse_max_len: int = 6
    # Base: packed rows of examples from the uniform skill mixture, loss on every token.
    base_steps: int = 900
    base_lr: float = 3e-3
    base_warmup: int = 100
    base_batch: int = 24
    base_answer_only: bool = True
    # Relative share of each skill in the base mixture ("skill:int,..."; empty = uniform). A small share
    # leaves an easy skill only half-learned in the base, so its fine-tune has something to add.
    base_mix: str = "addition:3,sort:1,reverse:2"
    row_len: int = 80
    # Fine-tunes: one skill each, loss on the answers (and, weighted by ft_prompt_loss, on their own skill's
    # prompts), small moves from the base.
    ft_steps: int = 200
    ft_lr: float = 2e-4
    ft_warmup: int = 20
    ft_batch: int = 24
    # Share of each fine-tune batch drawn from the other skills (0 = pure single-skill fine-tune).
    ft_replay: float = 0.05
    # Weight of the loss on prompt tokens relative to answer tokens in the fine-tunes (a weighted mean;
    # 0 = answers only, 1 = every token). Logit fusion weighs models by their prompt perplexity, which
    # only means something if the fine-tunes learned what their skill's prompts look like. Adam makes even
    # 0.002 enough (family_prompt/TRAINING.md); larger weights cost the merges more. The demo family
    # (family/) keeps 0: with prompt loss its validation split favoured one fine-tune over every merge.
    ft_prompt_loss: float = 0.0
    # Whether the replayed examples of the other skills carry that prompt loss too (False: only the
    # fine-tune's own skill's prompts are learned, so it does not learn what other skills' prompts look like).
    ft_prompt_loss_replay: bool = True
    # Whether that prompt loss trains the output head too. Adam moves the head rows of tokens that only
    # prompts contain (':', '>', '+', '=') at its full step however small the weight; False keeps the
    # head out of it (the prompt tokens' logits use a detached head), so only the body learns the prompts.
    ft_prompt_loss_head: bool = True
    weight_decay: float = 0.0
    # Data splits.
    # The split files hold exactly these many items and the specs score all of them (no `limit`), so
    # `mergelab eval` and RESULTS.md score the same items; val is kept small for the demo's search.
    val_size: int = 150
    test_size: int = 200
    save_dtype: str = "float16"
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- skills


def _addition(rng: random.Random, cfg: FamilyConfig) -> tuple[str, str]:
    hi = 10 ** cfg.add_max_digits
    a, b = rng.randrange(hi), rng.randrange(hi)
    return f"{a}+{b}=", str(a + b)


def _sort(rng: random.Random, cfg: FamilyConfig) -> tuple[str, str]:
    n = rng.randint(cfg.sort_min_len, cfg.sort_max_len)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    return f"sort:{digits}>", "".join(sorted(digits))


def _reverse(rng: random.Random, cfg: FamilyConfig) -> tuple[str, str]:
    n = rng.randint(cfg.reverse_min_len, cfg.reverse_max_len)
    word = "".join(rng.choice(_LETTERS) for _ in range(n))
    return f"rev:{word}>", word[::-1]


_GENERATORS = {"addition": _addition, "sort": _sort, "reverse": _reverse}


@dataclass
class SkillData:
    """Held-out splits of one skill and a sampler of training items that never repeats them."""

    name: str
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]
    held_out: set[str]

    def sample(self, rng: random.Random, cfg: FamilyConfig) -> tuple[str, str]:
        while True:
            prompt, answer = _GENERATORS[self.name](rng, cfg)
            if prompt not in self.held_out:
                return prompt, answer


def make_skill_data(cfg: FamilyConfig) -> dict[str, SkillData]:
    """Draw val and test (distinct prompts, disjoint from each other) per skill from a seeded stream."""
    out = {}
    for i, name in enumerate(SKILLS):
        rng = random.Random(f"{cfg.seed}-split-{name}")
        seen: dict[str, str] = {}
        while len(seen) < cfg.val_size + cfg.test_size:
            p, a = _GENERATORS[name](rng, cfg)
            seen.setdefault(p, a)
        items = list(seen.items())
        out[name] = SkillData(name, items[: cfg.val_size], items[cfg.val_size :], set(seen))
    return out


# ---------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: one WordLevel token per character, BOS prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    # Every character, newline included, is its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )


# ---------------------------------------------------------------- model and training


def build_model(cfg: FamilyConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(mc)


def _encode(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab[c] for c in text]


def _packed_batch(
    rng: random.Random, cfg: FamilyConfig, skills: list[SkillData], vocab, bos, pad, batch: int, answer_only: bool,
    prompt_skills: set[str] | None = None,
):
    """Rows of back-to-back examples ('prompt answer\\n'), each row starting with BOS, padded to row_len.

    Returns ids, labels (-100 where not trained: padding, BOS, and prompts if `answer_only`) and a mask
    of the prompt tokens (whatever `answer_only` says; only those of `prompt_skills` if given), for a loss
    that weighs prompts apart.
    """
    ids = torch.full((batch, cfg.row_len), pad, dtype=torch.long)
    labels = torch.full((batch, cfg.row_len), -100, dtype=torch.long)
    prompt = torch.zeros((batch, cfg.row_len), dtype=torch.bool)
    for r in range(batch):
        row, lab, is_prompt = [bos], [-100], [False]
        while True:
            sd = rng.choice(skills)
            p, a = sd.sample(rng, cfg)
            pi, ai = _encode(p, vocab), _encode(a + "\n", vocab)
            if len(row) + len(pi) + len(ai) > cfg.row_len:
                break
            row += pi + ai
            lab += ([-100] * len(pi) if answer_only else pi) + ai
            marked = prompt_skills is None or sd.name in prompt_skills
            is_prompt += [marked] * len(pi) + [False] * len(ai)
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, : len(lab)] = torch.tensor(lab)
        prompt[r, : len(is_prompt)] = torch.tensor(is_prompt)
    # labels[t] is the target at position t; the model shifts internally.
    return ids, labels, prompt


def _weighted_loss(model, ids, pad, labels: torch.Tensor, prompt: torch.Tensor, w: float, head: bool):
    """Weighted mean next-token cross-entropy: answer tokens weigh 1, prompt tokens `w`, the rest 0.

    With `head` False the prompt tokens' logits come from a detached copy of the output head, so their
    loss trains only the body.
    """
    hidden = model.model(input_ids=ids, attention_mask=(ids != pad).long()).last_hidden_state[:, :-1]
    targets = ids[:, 1:].reshape(-1)

    def ce(weight):
        logits = torch.nn.functional.linear(hidden, weight).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")

    answer_w = (labels[:, 1:] != -100).float().reshape(-1)
    prompt_w = w * prompt[:, 1:].float().reshape(-1)
    head_w = model.lm_head.weight
    if head:
        total = ce(head_w) * (answer_w + prompt_w)
    else:
        total = ce(head_w) * answer_w + ce(head_w.detach()) * prompt_w
    return total.sum() / (answer_w + prompt_w).sum()


def _ft_mixture(skills: dict, name: str, replay: float) -> list:
    """The list examples are drawn from uniformly: the skill, plus the others in proportion `replay`."""
    if replay <= 0:
        return [skills[name]]
    others = [s for s in SKILLS if s != name]
    n_self = max(1, round((1 - replay) / replay * len(others)))
    return [skills[name]] * n_self + [skills[s] for s in others]


def _base_mixture(skills: dict, mix: str) -> list:
    """The list base examples are drawn from uniformly: each skill repeated by its integer share in `mix`."""
    shares = {s: 1 for s in SKILLS}
    for part in filter(None, mix.split(",")):
        name, n = part.split(":")
        if name not in shares:
            raise ValueError(f"base_mix names unknown skill {name!r}; skills are {', '.join(SKILLS)}")
        shares[name] = int(n)
    return [skills[s] for s in SKILLS for _ in range(shares[s])]


def train(
    model, cfg: FamilyConfig, skills, vocab, bos, pad, steps, lr, warmup, batch, answer_only, seed_tag, log,
    prompt_weight: float = 0.0, prompt_skills: set[str] | None = None,
):
    """Train in place; with `answer_only` and `prompt_weight` > 0, prompt tokens (of `prompt_skills`'
    examples if given) count with that weight."""
    rng = random.Random(f"{cfg.seed}-train-{seed_tag}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warmup then cosine to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0, running = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, labels, prompt = _packed_batch(rng, cfg, skills, vocab, bos, pad, batch, answer_only, prompt_skills)
        if answer_only and prompt_weight > 0:
            loss = _weighted_loss(model, ids, pad, labels, prompt, prompt_weight, cfg.ft_prompt_loss_head)
        else:  # the transformers loss, so a zero prompt weight trains exactly as before the knob existed
            loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  [{seed_tag}] step {step + 1}/{steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return time.time() - t0


# ---------------------------------------------------------------- evaluation and merges


@torch.inference_mode()
def greedy_exact_match(model, tokenizer, items, max_new_tokens: int = 10) -> float:
    """Fraction of items whose greedy continuation, cut at the first newline or EOS, equals the answer.

    Prompts are grouped by length so no padding is needed (exact, and fast with a KV-free recompute at this size).
    """
    vocab = tokenizer.get_vocab()
    stop = {vocab["\n"], tokenizer.eos_token_id}
    by_len: dict[int, list[int]] = {}
    enc = [tokenizer(p)["input_ids"] for p, _ in items]
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    correct = 0
    for _, idx in sorted(by_len.items()):
        ids = torch.tensor([enc[i] for i in idx])
        done = torch.zeros(len(idx), dtype=torch.bool)
        out = [[] for _ in idx]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    if t in stop:
                        done[r] = True
                    else:
                        out[r].append(t)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for r, i in enumerate(idx):
            if done[r] and tokenizer.decode(out[r]) == items[i][1]:
                correct += 1
    return correct / len(items)


def task_arithmetic(base: dict, fts: list[dict], weights: list[float]) -> dict:
    """theta = base + sum_i w_i (theta_i - base), in float32 (measurement only; the real operator lives in operators/)."""
    out = {}
    for k, b in base.items():
        out[k] = b + sum(w * (ft[k] - b) for ft, w in zip(fts, weights))
    return out


def ties(base: dict, fts: list[dict], weights: list[float], density: float = 0.2, lam: float = 1.0) -> dict:
    """TIES (Yadav et al. 2023): trim each task vector to its top-density magnitudes, elect signs by mass, disjoint mean."""
    out = {}
    for k, b in base.items():
        taus = []
        for ft, w in zip(fts, weights):
            tau = ft[k] - b
            n = tau.numel()
            keep = max(1, int(round(density * n)))
            if keep < n:
                thresh = tau.abs().flatten().kthvalue(n - keep + 1).values
                tau = torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))
            taus.append(w * tau)
        stack = torch.stack(taus)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        num = (stack * agree).sum(0)
        den = agree.sum(0).clamp(min=1)
        out[k] = b + lam * num / den
    return out


# ---------------------------------------------------------------- writing the family


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _mc_rows(items, rng: random.Random, name: str) -> list[dict]:
    """Multiple choice: the right answer among three near misses (one digit/letter changed or swapped)."""
    rows = []
    for prompt, answer in items:
        wrong: set[str] = set()
        pool = "0123456789" if name != "reverse" else _LETTERS
        while len(wrong) < 3:
            chars = list(answer)
            if rng.random() < 0.5 and len(chars) > 1:
                i = rng.randrange(len(chars) - 1)
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            else:
                i = rng.randrange(len(chars))
                chars[i] = rng.choice(pool)
            cand = "".join(chars)
            if cand != answer:
                wrong.add(cand)
        choices = sorted(wrong) + [answer]
        rng.shuffle(choices)
        rows.append({"prompt": prompt, "choices": choices, "answer": choices.index(answer)})
    return rows


def write_data(data_dir: Path, skills: dict[str, SkillData], cfg: FamilyConfig) -> None:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    max_new = {"addition": cfg.add_max_digits + 3, "sort": cfg.sort_max_len + 2, "reverse": cfg.reverse_max_len + 2}
    for name, sd in skills.items():
        d = data_dir / name
        for split, items in (("val", sd.val), ("test", sd.test)):
            _write_jsonl(d / f"{split}.jsonl", [{"prompt": p, "answer": a} for p, a in items])
            _write_jsonl(d / f"{split}_mc.jsonl", _mc_rows(items, random.Random(f"{cfg.seed}-mc-{name}-{split}"), name))
            (d / f"{split}.txt").write_text("".join(p + a + "\n" for p, a in items))
    import yaml

    for split in ("val", "test"):
        scorers = []
        for name in skills:
            one = {
                "name": name,
                "type": "exact_match",
                "data": f"{name}/{split}.jsonl",
                "weight": 1.0,
                "max_new_tokens": max_new[name],
                "stop": ["\n"],
            }
            scorers.append(one)
            (data_dir / name / f"eval_{split}.yml").write_text(
                yaml.safe_dump({"scorers": [{**one, "data": f"{split}.jsonl"}]}, sort_keys=False)
            )
        (data_dir / f"eval_{split}.yml").write_text(yaml.safe_dump({"scorers": scorers}, sort_keys=False))


def _save_model(model, tokenizer, out: Path, cfg: FamilyConfig, role: str, extra: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    dtype = getattr(torch, cfg.save_dtype)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"role": role, "family_config": dataclasses.asdict(cfg), **extra}, indent=2) + "\n"
    )


def _copy_base(src: Path, dst: Path, cfg: FamilyConfig) -> float:
    """Copy a trained base into the family; refuse one trained with other base, model or data settings."""
    meta = json.loads((src / "training.json").read_text())
    theirs = meta["family_config"]
    # Fine-tune knobs may differ; everything else shapes the base or the held-out data it never saw.
    differ = [
        f"{k}: base has {theirs.get(k)!r}, this run {v!r}"
        for k, v in dataclasses.asdict(cfg).items()
        if not k.startswith("ft_") and k not in ("extra", "threads") and theirs.get(k) != v
    ]
    if differ:
        raise SystemExit(
            f"--base-from {src}: that base was trained with other settings ({'; '.join(differ)}). "
            "Use the same --set values as its training.json, or train a new base without --base-from."
        )
    if src.resolve() != dst.resolve():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    return float(meta["train_seconds"])


@torch.inference_mode()
def prompt_log_ppl(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[N]: the model's mean cross-entropy on each prompt's tokens after BOS (what PackLLM weighs by)."""
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    out = torch.zeros(len(prompts), dtype=torch.float64)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    for _, idx in by_len.items():  # equal lengths: no padding, so exactly the unbatched numbers
        ids = torch.tensor([enc[i] for i in idx])
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        ce = -logp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1)
        out[idx] = ce
    return out


def fusion_weights_table(states: list[dict], model, tokenizer, items: dict) -> dict:
    """Per skill: mean PackLLM-sim weight (tau 1) of each model in `states` on that skill's prompts, and the
    share of prompts where the skill's fine-tune (states[1 + skill index]) gets the largest weight."""
    out = {}
    for j, (skill, its) in enumerate(items.items()):
        ell = []
        for sd in states:
            model.load_state_dict(sd)
            ell.append(prompt_log_ppl(model, tokenizer, [p for p, _ in its]))
        w = torch.softmax(-torch.stack(ell, -1), -1)
        out[skill] = (w.mean(0).tolist(), (w.argmax(-1) == 1 + j).double().mean().item())
    return out


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "family")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-base", action="store_true", help="keep OUT/base instead of training it again")
    ap.add_argument(
        "--base-from", type=Path, metavar="DIR",
        help="copy the base from DIR (e.g. mergelab/demo/family/base) instead of training it; only the fine-tunes train",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a FamilyConfig field")
    args = ap.parse_args(argv)

    cfg = FamilyConfig(seed=args.seed)
    for kv in args.set:
        k, v = kv.split("=", 1)
        cur = getattr(cfg, k)
        setattr(cfg, k, v.lower() in ("1", "true", "yes") if isinstance(cur, bool) else type(cur)(v))
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    command = "python -m mergelab.demo.train_family " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    skills = make_skill_data(cfg)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    write_data(args.data, skills, cfg)

    model = build_model(cfg, len(vocab), pad, bos, eos)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params}")
    all_skills = _base_mixture(skills, cfg.base_mix)
    secs = {}
    args.out.mkdir(parents=True, exist_ok=True)
    reuse = args.reuse_base and (args.out / "base" / "model.safetensors").exists()
    if args.base_from is not None:
        secs["base"] = _copy_base(args.base_from, args.out / "base", cfg)
        log(f"base copied from {args.base_from} (trained in {secs['base']:.0f} s)")
    elif reuse:
        secs["base"] = json.loads((args.out / "base" / "training.json").read_text())["train_seconds"]
        log(f"reusing {args.out / 'base'} (trained in {secs['base']:.0f} s)")
    if args.base_from is not None or reuse:
        # A full run saves the base through `save_dtype` and back, which also rounds the model's rotary
        # inv_freq buffer (not in the state dict); do the same so these fine-tunes train exactly alike.
        model.to(getattr(torch, cfg.save_dtype)).to(torch.float32)
    else:
        secs["base"] = train(
            model, cfg, all_skills, vocab, bos, pad, cfg.base_steps, cfg.base_lr, cfg.base_warmup, cfg.base_batch,
            cfg.base_answer_only, "base", log,
        )
        _save_model(model, tokenizer, args.out / "base", cfg, "base", {"train_seconds": secs["base"]})
    base_state = _load_state(args.out / "base")
    for name in SKILLS:
        model.load_state_dict(base_state)
        secs[name] = train(
            model, cfg, _ft_mixture(skills, name, cfg.ft_replay), vocab, bos, pad, cfg.ft_steps, cfg.ft_lr, cfg.ft_warmup, cfg.ft_batch,
            True, name, log, cfg.ft_prompt_loss, None if cfg.ft_prompt_loss_replay else {name},
        )
        _save_model(model, tokenizer, args.out / name, cfg, f"fine-tune on {name}", {"train_seconds": secs[name]})
    train_seconds = time.time() - t_start

    # Evaluate the saved (float16-rounded) weights, so the table describes the committed files.
    states = {n: _load_state(args.out / n) for n in ("base",) + SKILLS}
    fts = [states[s] for s in SKILLS]
    k = len(SKILLS)
    candidates: list[tuple[str, dict]] = [(n, states[n]) for n in ("base",) + SKILLS]
    for w in (1.0, 0.7, 0.5):
        candidates.append((f"task_arithmetic w={w}", task_arithmetic(states["base"], fts, [w] * k)))
    candidates.append((f"ties d=0.2 w=1", ties(states["base"], fts, [1.0] * k, 0.2)))
    candidates.append((f"ties d=0.5 w=1", ties(states["base"], fts, [1.0] * k, 0.5)))
    candidates.append(("linear average (w=1/3)", task_arithmetic(states["base"], fts, [1 / k] * k)))
    for i, s in enumerate(SKILLS):
        for j, s2 in enumerate(SKILLS[i + 1 :], start=i + 1):
            candidates.append((f"task_arithmetic {s}+{s2} w=1", task_arithmetic(states["base"], [fts[i], fts[j]], [1.0, 1.0])))
    results = []
    for label, sd in candidates:
        model.load_state_dict(sd)
        row = {s: greedy_exact_match(model, tokenizer, skills[s].test, 12) for s in SKILLS}
        row["mean"] = sum(row.values()) / k
        results.append((label, row))
        log(f"{label:40s} " + " ".join(f"{s}={row[s]:.3f}" for s in SKILLS) + f" mean={row['mean']:.3f}")
    fusion = fusion_weights_table(
        [states[n] for n in ("base",) + SKILLS], model, tokenizer, {s: skills[s].test for s in SKILLS}
    )
    for s, (mean_w, top) in fusion.items():
        log(f"sim weights on {s} prompts: " + " ".join(f"{x:.3f}" for x in mean_w) + f"; {s} on top {100 * top:.1f}%")
    total = time.time() - t_start
    _write_reports(args.out, cfg, command, n_params, secs, train_seconds, total, results, fusion, lines)
    return 0


def _write_reports(out: Path, cfg, command, n_params, secs, train_seconds, total, results, fusion, lines) -> None:
    head = "| model | " + " | ".join(SKILLS) + " | mean |\n|---|" + "---|" * (len(SKILLS) + 1) + "\n"
    body = "".join(
        f"| {label} | " + " | ".join(f"{100 * row[s]:.1f}" for s in SKILLS) + f" | {100 * row['mean']:.1f} |\n"
        for label, row in results
    )
    (out / "RESULTS.md").write_text(
        "# Bundled family: exact match (%) on each skill's test split\n\n"
        f"Greedy decoding, all {cfg.test_size} test items per skill, weights as committed ({cfg.save_dtype}), "
        "merges computed in float32 from them (task_arithmetic: base + sum w_i (ft_i - base); "
        "ties: trim to density d, sign election by mass, disjoint mean, lambda 1).\n\n" + head + body
        + "\n## Logit fusion weights on each skill's test prompts\n\n"
        "PackLLM-sim weights softmax(-l), l = each model's mean cross-entropy on the prompt's tokens after BOS "
        f"(zero-shot: the plain test prompt), tau 1, all {cfg.test_size} test prompts per skill.\n\n"
        "| prompts | mean weight base | addition | sort | reverse | skill's fine-tune on top |\n|---|---|---|---|---|---|\n"
        + "".join(
            f"| {s} | " + " | ".join(f"{x:.3f}" for x in mean_w) + f" | {100 * top:.1f}% |\n"
            for s, (mean_w, top) in fusion.items()
        )
    )
    hp = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(cfg).items())
    (out / "TRAINING.md").write_text(
        "# How the bundled family was trained\n\n"
        f"Command: `{command}`\n\nSeed: {cfg.seed}. torch {torch.__version__}, CPU, {cfg.threads} threads. "
        f"Parameters: {n_params}.\n\n"
        f"Training time: base {secs['base']:.0f} s, "
        + ", ".join(f"{s} {secs[s]:.0f} s" for s in SKILLS)
        + f"; all training {train_seconds:.0f} s; with data, saving and the evaluation table {total:.0f} s.\n\n"
        "| hyperparameter | value |\n|---|---|\n" + hp + "\n\n## Log\n\n```\n" + "\n".join(lines) + "\n```\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
