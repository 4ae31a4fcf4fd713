"""Reading and checking scorer data files (text or JSONL), with file and line in every error.

Runs before any model is loaded, so a typo in line 900 of a data file costs no model loading.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergelabError
from .spec import ExactMatchScorerSpec, MultipleChoiceScorerSpec, PerplexityScorerSpec


@dataclass(frozen=True)
class TextItem:
    text: str
    line: int  # first line of the document in its file


@dataclass(frozen=True)
class ChoiceItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int
    line: int


@dataclass(frozen=True)
class AnswerItem:
    prompt: str
    answer: str
    line: int


def subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the items to score: a seeded permutation, cut to `limit`.

    The order is shuffled even without a limit so that running values reported after each
    batch are unbiased estimates of the final one (files are often sorted by difficulty).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order if limit is None else order[:limit]


def _check_file(path: Path, scorer: str) -> str:
    if not path.is_file():
        raise MergelabError(
            f"Data file {path} of scorer '{scorer}' does not exist. Paths in an eval spec are "
            "relative to the spec's folder; fix `data:` or create the file."
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise MergelabError(f"Data file {path} of scorer '{scorer}' is empty; it needs at least one item.")
    return text


def _jsonl(path: Path, scorer: str):
    text = _check_file(path, scorer)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MergelabError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise MergelabError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        yield number, record


def _field(path: Path, number: int, record: dict, key: str, expected: str):
    if key not in record:
        raise MergelabError(
            f"{path}:{number}: the line has no `{key}` field (it has: {', '.join(record) or 'nothing'}). "
            f"Each line must have {expected}."
        )
    return record[key]


def _string(path: Path, number: int, value, key: str) -> str:
    if not isinstance(value, str):
        raise MergelabError(f"{path}:{number}: `{key}` must be a string, got {json.dumps(value)}.")
    return value


def _nonempty(items: list, spec) -> list:
    if not items:
        raise MergelabError(f"Data file {spec.data} of scorer '{spec.name}' has no items.")
    return items


def read_perplexity(spec: PerplexityScorerSpec) -> list[TextItem]:
    path = spec.data
    if path.suffix in (".jsonl", ".json"):
        items = [
            TextItem(_string(path, n, _field(path, n, r, spec.field, f"a `{spec.field}` string"), spec.field), n)
            for n, r in _jsonl(path, spec.name)
        ]
    elif spec.split == "none":
        items = [TextItem(_check_file(path, spec.name), 1)]
    elif spec.split == "lines":
        items = [
            TextItem(line, number)
            for number, line in enumerate(_check_file(path, spec.name).splitlines(), start=1)
            if line.strip()
        ]
    else:
        # Paragraphs: documents are separated by blank lines, so `limit` picks paragraphs.
        items, current, start = [], [], 0
        for number, line in enumerate(_check_file(path, spec.name).splitlines(), start=1):
            if line.strip():
                if not current:
                    start = number
                current.append(line)
            elif current:
                items.append(TextItem("\n".join(current), start))
                current = []
        if current:
            items.append(TextItem("\n".join(current), start))
    for item in items:
        if not item.text:
            raise MergelabError(f"{path}:{item.line}: empty text; remove the line or give it text.")
    return _nonempty(items, spec)


def read_multiple_choice(spec: MultipleChoiceScorerSpec) -> list[ChoiceItem]:
    path, items = spec.data, []
    expected = "`prompt` (string), `choices` (list of strings) and `answer` (index or choice text)"
    for n, r in _jsonl(path, spec.name):
        prompt = _string(path, n, _field(path, n, r, "prompt", expected), "prompt")
        choices = _field(path, n, r, "choices", expected)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MergelabError(f"{path}:{n}: `choices` must be a list of at least two non-empty strings.")
        answer = _field(path, n, r, "answer", expected)
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise MergelabError(f"{path}:{n}: `answer` must be a choice index or the text of a choice, got {json.dumps(answer)}.")
        if isinstance(answer, str):
            if answer not in choices:
                raise MergelabError(f"{path}:{n}: `answer` {json.dumps(answer)} is not one of the choices {json.dumps(choices)}.")
            answer = choices.index(answer)
        elif not 0 <= answer < len(choices):
            raise MergelabError(f"{path}:{n}: `answer` index {answer} is out of range for {len(choices)} choices (0-based).")
        items.append(ChoiceItem(prompt, tuple(choices), answer, n))
    return _nonempty(items, spec)


def read_exact_match(spec: ExactMatchScorerSpec) -> list[AnswerItem]:
    path, items = spec.data, []
    expected = "`prompt` (string) and `answer` (string or number)"
    for n, r in _jsonl(path, spec.name):
        prompt = _string(path, n, _field(path, n, r, "prompt", expected), "prompt")
        answer = _field(path, n, r, "answer", expected)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise MergelabError(f"{path}:{n}: `answer` must be a string or a number, got {json.dumps(answer)}.")
        items.append(AnswerItem(prompt, str(answer), n))
    return _nonempty(items, spec)
