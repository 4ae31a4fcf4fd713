"""The scorers: perplexity, multiple choice and exact match over a LogitModel, data tokenized once.

Each scorer pre-builds its padded batches at construction and only runs forward passes later.
"""
from __future__ import annotations

import abc
import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MergelabError
from .data import read_exact_match, read_multiple_choice, read_perplexity, subset
from .protocol import LogitModel
from .spec import ExactMatchScorerSpec, MultipleChoiceScorerSpec, PerplexityScorerSpec

Report = Callable[[str, int, float], None]
HIGHER, LOWER = "higher", "lower"


# -- tokenization ---------------------------------------------------------------------------------
def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0  # pragma: no cover - the loop always returns


def prefix_id_of(tokenizer) -> int | None:
    # As lm-evaluation-harness does for rolling log-likelihoods: BOS, else EOS, so that the
    # first token of a text is predicted from a start-of-text state rather than skipped.
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_text(tokenizer, prompt: str, chat_template: bool, where: str) -> tuple[str, bool]:
    """The text to tokenize for a prompt and whether the tokenizer should add special tokens."""
    if not chat_template:
        return prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise MergelabError(
            f"{where} sets chat_template: true, but this model's tokenizer has no chat template. "
            "Set chat_template: false for this scorer, or use a model whose tokenizer_config.json "
            "defines one."
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # The template writes BOS and friends itself; letting the tokenizer add them would double them.
    return text, False


def split_continuation(tokenizer, context: str, continuation: str, special: bool) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, tokenized together as the model would see them.

    Tokenizing the joined text and cutting at the context's length keeps merges across the
    boundary the way the model sees them; when the joined tokens do not start with the context's,
    the continuation is tokenized alone.
    """
    ctx = encode(tokenizer, context, special)
    whole = encode(tokenizer, context + continuation, special)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(tokenizer, continuation, False)


# -- batches --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A LEFT-padded batch; the last cont_lens[b] tokens of row b are the ones scored."""

    ids: torch.Tensor
    mask: torch.Tensor
    cont_lens: torch.Tensor
    prompt_lengths: torch.Tensor | None


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def make_batch(seqs, cont_lens, prompt_lengths, pad_id, device) -> Batch:
    ids, mask = pad_left(seqs, pad_id, device)
    prompts = None if prompt_lengths is None else torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    return Batch(ids, mask, torch.tensor(cont_lens, dtype=torch.long, device=device), prompts)


def _takes_keep_last(model) -> bool:
    try:
        return "keep_last" in inspect.signature(model.logits).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def continuation_logprobs(model: LogitModel, batch: Batch, greedy: bool = False):
    """Sum of log p(token) over each row's continuation (float64 [B]) and, if asked, whether every
    continuation token was the argmax (bool [B])."""
    # Only the last max(cont_lens) + 1 positions predict continuation tokens (the batch is
    # left-padded): a model that can skip the head elsewhere is asked for those alone, which
    # spares the [B, T, V] logits of every prompt position (GBs with a 150k vocabulary).
    tail = int(batch.cont_lens.max()) + 1 if batch.cont_lens.numel() else batch.ids.shape[1]
    if tail < batch.ids.shape[1] and _takes_keep_last(model):
        logits = model.logits(batch.ids, batch.mask, batch.prompt_lengths, keep_last=tail)
    else:
        logits = model.logits(batch.ids, batch.mask, batch.prompt_lengths)
    logits = logits[:, -tail:]
    logits = logits[:, :-1, : model.vocab_size]
    ids = batch.ids[:, -tail:].to(logits.device)
    width = ids.shape[1] - 1
    selected = torch.arange(width, device=logits.device)[None, :] >= (width - batch.cont_lens.to(logits.device))[:, None]
    targets = torch.where(selected, ids[:, 1:], torch.zeros_like(ids[:, 1:]))
    # log_softmax would materialize a second [B, T, V] tensor; gather minus logsumexp does not.
    token_lp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    # where(), not a multiply: padded positions may hold NaN (fully masked attention rows).
    sums = torch.where(selected, token_lp.double(), 0.0).sum(dim=1).cpu()
    if not greedy:
        return sums, None
    is_greedy = ((logits.argmax(-1) == targets) | ~selected).all(dim=1).cpu()
    return sums, is_greedy


def chunk_by_size(sizes: list[int], budget: int) -> list[list[int]]:
    """Group consecutive items so each group holds at most `budget` rows (one item at least)."""
    groups, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


# -- scorers --------------------------------------------------------------------------------------
class Scorer(abc.ABC):
    """One weighted scorer. run() returns (metrics, score) with score oriented higher-is-better."""

    name: str
    weight: float
    directions: dict[str, str]
    score_definition: str
    n_items: int

    @abc.abstractmethod
    def run(self, model: LogitModel, report: Report | None) -> tuple[dict[str, float], float]:
        """Score `model` on the cached batches, calling report(name, step, running score) per batch."""


def max_length_of(tokenizer, asked: int | None) -> int:
    if asked is not None:
        return asked
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30); fall back to a window that keeps
    # [B, T, V] logits affordable.
    return int(limit) if isinstance(limit, int) and 2 <= limit <= 8192 else 1024


class PerplexityScorer(Scorer):
    def __init__(self, spec: PerplexityScorerSpec, tokenizer, device, batch_size: int, items=None):
        self.name, self.weight = spec.name, spec.weight
        self.directions = {f"{self.name}/perplexity": LOWER, f"{self.name}/nll": LOWER}
        self.score_definition = "-nll"  # mean negative log-likelihood per token, negated
        items = items if items is not None else read_perplexity(spec)
        chosen = [items[i] for i in subset(len(items), spec.limit, spec.seed)]
        self.n_items = len(chosen)
        window = max_length_of(tokenizer, spec.max_length)
        prefix = prefix_id_of(tokenizer)
        seqs, conts = [], []
        for item in chosen:
            tokens = ([prefix] if prefix is not None else []) + encode(tokenizer, item.text, False)
            # Each window predicts up to window-1 new tokens and sees as much earlier text as fits,
            # so long documents are scored entirely, every token exactly once.
            start = 1
            while start < len(tokens):
                end = min(start + window - 1, len(tokens))
                seqs.append(tokens[max(0, end - window): end])
                conts.append(end - start)
                start = end
        if not seqs:
            raise MergelabError(
                f"Scorer '{self.name}': the texts in {spec.data} tokenize to nothing to predict "
                "(each text needs at least one token after the start token)."
            )
        pad = pad_id_of(tokenizer)
        self.batches = [
            make_batch([seqs[i] for i in g], [conts[i] for i in g], None, pad, device)
            for g in chunk_by_size([1] * len(seqs), batch_size)
        ]

    def run(self, model, report):
        total, count = 0.0, 0
        for step, batch in enumerate(self.batches, start=1):
            sums, _ = continuation_logprobs(model, batch)
            total -= float(sums.sum())
            count += int(batch.cont_lens.sum())
            if report is not None:
                report(self.name, step, -total / count)
        nll = total / count
        return {f"{self.name}/perplexity": math.exp(nll), f"{self.name}/nll": nll}, -nll


class MultipleChoiceScorer(Scorer):
    def __init__(self, spec: MultipleChoiceScorerSpec, tokenizer, device, batch_size: int, items=None):
        self.name, self.weight = spec.name, spec.weight
        self.directions = {f"{self.name}/accuracy": HIGHER}
        self.normalize = spec.normalize
        self.score_definition = "accuracy" + (" (log-likelihood per token)" if spec.normalize == "length" else "")
        items = items if items is not None else read_multiple_choice(spec)
        chosen = [items[i] for i in subset(len(items), spec.limit, spec.seed)]
        self.n_items = len(chosen)
        self.answers = [it.answer for it in chosen]
        self.n_choices = [len(it.choices) for it in chosen]
        rows = []  # per item: list of (seq, cont_len, prompt_len)
        for item in chosen:
            where = f"Scorer '{self.name}' ({spec.data}:{item.line})"
            context, special = prompt_text(tokenizer, item.prompt, spec.chat_template, f"Scorer '{self.name}'")
            item_rows = []
            for choice in item.choices:
                ctx, cont = split_continuation(tokenizer, context, choice, special)
                if not cont:
                    raise MergelabError(f"{where}: choice {choice!r} tokenizes to no tokens.")
                item_rows.append((ctx + cont, len(cont), len(ctx)))
            rows.append(item_rows)
        pad = pad_id_of(tokenizer)
        self.batches = []  # (item indices, Batch)
        for group in chunk_by_size(self.n_choices, batch_size):
            flat = [r for i in group for r in rows[i]]
            self.batches.append(
                (group, make_batch([r[0] for r in flat], [r[1] for r in flat], [r[2] for r in flat], pad, device))
            )

    def run(self, model, report):
        correct, done = 0, 0
        for step, (group, batch) in enumerate(self.batches, start=1):
            sums, _ = continuation_logprobs(model, batch)
            if self.normalize == "length":
                sums = sums / batch.cont_lens.cpu().double()
            offset = 0
            for i in group:
                k = self.n_choices[i]
                # Ties go to the first choice (torch.argmax returns the first maximum).
                correct += int(int(torch.argmax(sums[offset: offset + k])) == self.answers[i])
                offset += k
            done += len(group)
            if report is not None:
                report(self.name, step, correct / done)
        accuracy = correct / done
        return {f"{self.name}/accuracy": accuracy}, accuracy


def extract_answer(text: str, stops: list[str], regex: re.Pattern | None, strip: bool) -> str | None:
    """Cut at the first stop string, then take the LAST regex match (group 1 when there is one)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    if regex is not None:
        matches = list(regex.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        text = last.group(1) if regex.groups else last.group(0)
        if text is None:
            return None
    return text.strip() if strip else text


class ExactMatchScorer(Scorer):
    def __init__(self, spec: ExactMatchScorerSpec, tokenizer, device, batch_size: int, items=None):
        self.name, self.weight = spec.name, spec.weight
        self.mode, self.score_key = spec.mode, spec.score
        self.directions = {f"{self.name}/accuracy": HIGHER}
        if spec.mode == "forced":
            self.directions[f"{self.name}/answer_prob"] = HIGHER
        self.score_definition = {"accuracy": "accuracy", "answer_prob": "mean probability of the answer"}[spec.score]
        if spec.mode == "forced":
            self.score_definition += " (forced: one pass, greedy check)"
        self.tokenizer = tokenizer
        self.max_new_tokens = spec.max_new_tokens
        self.stops = list(spec.stop)
        self.regex = re.compile(spec.extract_regex) if spec.extract_regex else None
        self.strip = spec.strip
        self.eos = tokenizer.eos_token_id
        items = items if items is not None else read_exact_match(spec)
        chosen = [items[i] for i in subset(len(items), spec.limit, spec.seed)]
        self.n_items = len(chosen)
        self.answers = [it.answer.strip() if spec.strip else it.answer for it in chosen]
        self.last_predictions: list[str | None] = []  # generate mode: each item's extracted answer
        self.last_correct: list[bool] = []  # both modes: whether each item scored correct
        if spec.mode == "forced":
            self._forced_batches(spec, tokenizer, device, batch_size, chosen)
            return
        seqs = []
        for item in chosen:
            text, special = prompt_text(tokenizer, item.prompt, spec.chat_template, f"Scorer '{self.name}'")
            seqs.append(encode(tokenizer, text, special))
        pad = pad_id_of(tokenizer)
        self.batches = [
            (g, make_batch([seqs[i] for i in g], [0] * len(g), [len(seqs[i]) for i in g], pad, device))
            for g in chunk_by_size([1] * len(seqs), batch_size)
        ]

    def _forced_batches(self, spec, tokenizer, device, batch_size, chosen) -> None:
        """Prompt + delimiter + answer + terminator per item, the answer part scored."""
        where = f"Scorer '{self.name}' ({spec.data})"
        terminator_ids: list[int] = []
        terminator = spec.stop[0] if spec.stop else ""
        if not spec.stop:
            if self.eos is None:
                raise MergelabError(
                    f"{where} uses mode: forced without stop strings, so an answer ends at the "
                    "end-of-text token, but this tokenizer has none. Give the scorer a stop string "
                    "(e.g. stop: [\"\\n\"]) that ends every answer, or use mode: generate."
                )
            terminator_ids = [int(self.eos)]
        rows = []
        for item, answer in zip(chosen, self.answers):
            context, special = prompt_text(tokenizer, item.prompt, spec.chat_template, f"Scorer '{self.name}'")
            ctx, cont = split_continuation(tokenizer, context, spec.target_delimiter + answer + terminator, special)
            cont = cont + terminator_ids
            if not cont:
                raise MergelabError(f"{where}:{item.line}: the answer {answer!r} tokenizes to no tokens.")
            rows.append((ctx + cont, len(cont), len(ctx)))
        pad = pad_id_of(tokenizer)
        self.batches = [
            (g, make_batch([rows[i][0] for i in g], [rows[i][1] for i in g], [rows[i][2] for i in g], pad, device))
            for g in chunk_by_size([1] * len(rows), batch_size)
        ]

    def _run_forced(self, model, report):
        correct, prob, done, flags = 0, 0.0, 0, []
        for step, (group, batch) in enumerate(self.batches, start=1):
            sums, greedy = continuation_logprobs(model, batch, greedy=True)
            flags += [bool(g) for g in greedy]
            correct += int(greedy.sum())
            prob += float(sums.exp().sum())
            done += len(group)
            if report is not None:
                report(self.name, step, (correct if self.score_key == "accuracy" else prob) / done)
        self.last_predictions, self.last_correct = [], flags
        metrics = {f"{self.name}/accuracy": correct / done, f"{self.name}/answer_prob": prob / done}
        return metrics, metrics[f"{self.name}/{self.score_key}"]

    def _stop(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.stops)

    def run(self, model, report):
        if self.mode == "forced":
            return self._run_forced(model, report)
        correct, done, predictions, flags = 0, 0, [], []
        for step, (group, batch) in enumerate(self.batches, start=1):
            outs = model.generate_greedy(
                batch.ids, batch.mask, self.max_new_tokens, eos_token_id=self.eos,
                stop=self._stop if self.stops else None,
            )
            for i, new in zip(group, outs):
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                pred = extract_answer(text, self.stops, self.regex, self.strip)
                predictions.append(pred)
                flags.append(pred is not None and pred == self.answers[i])
                correct += int(flags[-1])
            done += len(group)
            if report is not None:
                report(self.name, step, correct / done)
        self.last_predictions, self.last_correct = predictions, flags
        accuracy = correct / done
        return {f"{self.name}/accuracy": accuracy}, accuracy
