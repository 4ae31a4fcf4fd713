"""Vocabulary maps for cross-tokenizer logit fusion: every pivot token id -> an id of another vocabulary.
Tokens compare as text (byte-level, sentencepiece markers undone); the rest go to the nearest by edit distance.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Roles whose tokens are mapped to their counterpart, in this order: the first role that claims
# a pivot id wins (a pad that is the eos token is mapped as eos).
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Cells (queries × candidates × candidate length) of one batched edit-distance table.
_CELLS = 1 << 22


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_TABLE = str.maketrans({c: chr(b) for c, b in _BYTE_DECODER.items()})  # then latin-1 = the bytes


def normalize_token(token: str, scheme: str = "plain", literal: bool = False) -> str:
    """The text a vocabulary entry stands for.

    `<0xNN>` byte tokens become that byte; `byte_level` entries go through GPT-2's byte decoder
    (`Ġ` -> space, `Ċ` -> newline); `sentencepiece` entries get `▁` -> space. `literal` (added
    and special tokens) keeps the entry as written. The bytes are read as UTF-8 with Python's
    surrogateescape handler, so a byte that is not a whole character (a piece of a multi-byte
    character) becomes the lone surrogate U+DC80+byte: two vocabularies' pieces of the same bytes
    still compare equal, and no two different byte strings give the same text.
    """
    if literal:
        return token
    m = _BYTE_TOKEN.match(token)
    if m:
        raw = bytes([int(m.group(1), 16)])
    elif scheme == "byte_level":
        if _BYTE_DECODER.keys() >= set(token):
            raw = token.translate(_BYTE_TABLE).encode("latin-1")
        else:  # a character outside the byte alphabet: kept as its UTF-8
            raw = b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in token)
    elif scheme == "sentencepiece":
        raw = token.replace("▁", " ").encode("utf-8")
    else:
        raw = token.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "surrogateescape")


def tokenizer_scheme(tokenizer: Any) -> str:
    """`byte_level`, `sentencepiece` or `plain`: from the `tokenizers` pipeline (pre-tokenizer and
    decoder) when there is one, else from the vocabulary (entries starting with `Ġ` or holding `▁`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer  # a tokenizers.Tokenizer itself
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        if '"ByteLevel"' in parts:
            return "byte_level"
        if '"Metaspace"' in parts or "\u2581" in parts:
            return "sentencepiece"
        return "plain"
    vocab = list(tokenizer.get_vocab())
    if sum(t.startswith("Ġ") for t in vocab) > 0.01 * len(vocab):
        return "byte_level"
    if sum("▁" in t for t in vocab) > 0.01 * len(vocab):
        return "sentencepiece"
    return "plain"


def _added_tokens(tokenizer: Any) -> set[str]:
    if hasattr(tokenizer, "get_added_vocab"):
        return set(tokenizer.get_added_vocab())
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        return {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    return set()


def special_ids(tokenizer: Any) -> dict[str, int]:
    """role -> id for the roles of SPECIAL_ROLES the tokenizer has."""
    out = {}
    for role in SPECIAL_ROLES:
        i = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(i, int):
            out[role] = i
    return out


def token_texts(tokenizer: Any, scheme: str | None = None) -> list[str | None]:
    """The normalized text of every id 0..max id (None where the vocabulary has no such id)."""
    scheme = scheme or tokenizer_scheme(tokenizer)
    vocab = tokenizer.get_vocab()
    added = _added_tokens(tokenizer)
    out: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for tok, i in vocab.items():
        out[i] = normalize_token(tok, scheme, literal=tok in added)
    return out


@dataclass
class VocabMap:
    """ids[p] is the other vocabulary's id for pivot id p."""

    ids: np.ndarray  # [V_pivot] int64
    distance: np.ndarray  # [V_pivot] int32: 0 for exact matches and specials, else the edit distance
    exact: int  # pivot ids matched by identical text
    special: int  # pivot ids mapped by role (bos/eos/unk/pad)
    nearest: int  # pivot ids mapped by edit distance
    seconds: float  # time taken to build the map

    def tensor(self, device: Any = "cpu"):
        import torch

        return torch.as_tensor(self.ids, dtype=torch.long, device=device)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _codes(texts: Sequence[str], length: int) -> np.ndarray:
    """[N, length] int32 code points of texts that all have this length."""
    if length == 0:
        return np.zeros((len(texts), 0), dtype=np.int32)
    flat = "".join(texts).encode("utf-32-le", "surrogatepass")
    return np.frombuffer(flat, dtype=np.int32).reshape(len(texts), length)


def _distance_table(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[Q, N] edit distances between queries q [Q, L] and candidates c [N, M] (Wagner–Fischer, one
    query character per step, all pairs at once).

    Within a row, D[i][j] = min(best[j], D[i][j-1] + 1) with best from the previous row; unrolled,
    D[i][j] - j = min(D[i][0], min_{k<=j} best[k] - k), a running minimum.
    """
    n_q, length = q.shape
    n_c, m = c.shape
    if length == 0:
        return np.full((n_q, n_c), m, dtype=np.int32)
    dt = np.int16 if max(length, m) < 16000 else np.int32
    # Layout [M + 1, Q, N]: the running minimum runs over the first axis, so each of its steps
    # is one long vector operation over all Q × N pairs (not M + 1-long rows, which are slow).
    ar = np.arange(m + 1, dtype=dt)[:, None, None]
    ct = np.ascontiguousarray(c.T)[:, None, :]  # [M, 1, N]
    prev = np.broadcast_to(ar, (m + 1, n_q, n_c))
    for i in range(1, length + 1):
        best = prev[:-1] + (q[None, :, i - 1, None] != ct)  # substitution
        np.minimum(best, prev[1:] + 1, out=best)  # deletion
        e = np.empty((m + 1, n_q, n_c), dtype=dt)
        e[0] = i
        np.subtract(best, ar[1:], out=e[1:])
        for j in range(1, m + 1):  # insertion: the running minimum (faster than ufunc.accumulate)
            np.minimum(e[j], e[j - 1], out=e[j])
        e += ar
        prev = e
    return prev[m].astype(np.int32)


def _prefix(text: str) -> str:
    """The bucket key: the first character; for a word-start token (a space, then more), the space
    and the next character, since half a vocabulary starts with a space."""
    return text[:2] if len(text) > 1 and text[0] == " " else text[:1]


class _Buckets:
    """The other vocabulary's candidate tokens, by (prefix, length) — prefix the first character or
    `_prefix` — and by length alone."""

    def __init__(self, texts: list[tuple[int, str]]):
        groups: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        by_len: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for i, t in texts:
            by_len[len(t)].append((i, t))
            if t:
                groups[(t[0], len(t))].append((i, t))
                if _prefix(t) != t[0]:
                    groups[(_prefix(t), len(t))].append((i, t))
        self.prefixes = {p for p, _ in groups}
        self.lengths = sorted(by_len)
        self._groups = {k: self._arrays(v, k[1]) for k, v in groups.items()}
        self._by_len = {k: self._arrays(v, k) for k, v in by_len.items()}

    @staticmethod
    def _arrays(items, length):
        items.sort()  # ascending ids: the first minimum of a row is the lowest id
        return np.array([i for i, _ in items], dtype=np.int64), _codes([t for _, t in items], length)

    def key(self, text: str) -> str | None:
        """The candidates of a query: its `_prefix`, else its first character, else all (None)."""
        for p in (_prefix(text), text[:1]):
            if p and p in self.prefixes:
                return p
        return None

    def get(self, prefix: str | None, length: int):
        return self._by_len.get(length) if prefix is None else self._groups.get((prefix, length))


def _nearest(queries: list[str], buckets: _Buckets, prefix: str | None, length: int):
    """Best (distance, other id) for queries of one length sharing `prefix` (None: all candidates).

    Candidate lengths are visited by growing |M - L| (δ = 0, 1, ...); the distance is at least
    δ, so the search stops once δ reaches every query's best distance. Order on ties: smaller
    distance, then smaller length difference, then shorter candidate, then lower id.
    """
    q = _codes(queries, length)
    n = len(queries)
    best_d = np.full(n, np.iinfo(np.int32).max, dtype=np.int64)
    best_id = np.full(n, -1, dtype=np.int64)
    max_len = buckets.lengths[-1] if buckets.lengths else 0
    delta = 0
    while True:
        if not (best_d > delta).any() or (length - delta < 0 and length + delta > max_len):
            break
        for m in sorted({length - delta, length + delta}):
            if m < 0 or (prefix is not None and m == 0):
                continue
            got = buckets.get(prefix, m)
            if got is None:
                continue
            ids, codes = got
            rows = np.nonzero(best_d > delta)[0]
            step = max(1, _CELLS // max(1, len(ids) * (m + 1)))
            for s in range(0, rows.size, step):
                part = rows[s : s + step]
                dist = _distance_table(q[part], codes)
                j = dist.argmin(axis=1)
                d = dist[np.arange(part.size), j]
                better = d < best_d[part]  # equal d at this δ: the earlier (shorter, lower id) stays
                best_d[part[better]] = d[better]
                best_id[part[better]] = ids[j[better]]
        delta += 1
    return best_d, best_id


def build_vocab_map(
    pivot_texts: Sequence[str | None],
    other_texts: Sequence[str | None],
    specials: dict[int, int] | None = None,
    exclude: Sequence[int] = (),
    fallback: int = 0,
) -> VocabMap:
    """Map every pivot id to an id of the other vocabulary, given both as normalized texts.

    1. `specials` (pivot id -> other id) first; 2. identical text (the lowest other id when
    several share it); 3. the minimum (Levenshtein) edit distance among candidates that start
    like the pivot token: the same first character — for a token of a space and more, the same
    space and next character (a word start stays a word start) — falling back to the same first
    character, then to every token (also for an empty pivot text); ties: the smaller length
    difference, then the shorter candidate, then the lower id. Only unmatched pivot tokens are
    searched, grouped by (prefix, length) and compared in batches against one (prefix, length)
    bucket at a time, lengths nearest first, until no nearer token can exist. Other ids in
    `exclude` (their special tokens) are never candidates for 2 and 3; pivot ids without text
    get `fallback`.
    """
    t0 = time.perf_counter()
    specials = dict(specials or {})
    excluded = set(exclude)
    cands = [(i, t) for i, t in enumerate(other_texts) if t is not None and i not in excluded]
    exact_of: dict[str, int] = {}
    for i, t in cands:
        exact_of.setdefault(t, i)
    n = len(pivot_texts)
    ids = np.full(n, fallback, dtype=np.int64)
    dist = np.zeros(n, dtype=np.int32)
    n_special = n_exact = 0
    todo: dict[tuple[str | None, int], list[int]] = defaultdict(list)
    buckets = _Buckets(cands)
    for p, t in enumerate(pivot_texts):
        if p in specials:
            ids[p] = specials[p]
            n_special += 1
        elif t is None:
            continue
        elif t in exact_of:
            ids[p] = exact_of[t]
            n_exact += 1
        elif cands:
            todo[(buckets.key(t), len(t))].append(p)
    for (prefix, length), ps in todo.items():
        d, j = _nearest([pivot_texts[p] for p in ps], buckets, prefix, length)
        ids[ps] = j
        dist[ps] = d
    return VocabMap(ids, dist, n_exact, n_special, sum(len(v) for v in todo.values()), time.perf_counter() - t0)


def tokenizer_vocab_map(pivot: Any, other: Any, size: int | None = None) -> VocabMap:
    """The map from the pivot tokenizer's ids (0..size-1, default its vocabulary) to `other`'s.

    Special tokens map by role (bos -> bos, eos -> eos, unk -> unk, pad -> pad) where the other
    tokenizer has that role; a pivot special without a counterpart is matched like any token.
    """
    p_texts, o_texts = token_texts(pivot), token_texts(other)
    if size is not None:
        p_texts = (p_texts + [None] * size)[:size]
    p_roles, o_roles = special_ids(pivot), special_ids(other)
    specials: dict[int, int] = {}
    for role in SPECIAL_ROLES:
        if role in p_roles and role in o_roles and p_roles[role] < len(p_texts):
            specials.setdefault(p_roles[role], o_roles[role])
    fallback = o_roles.get("unk", 0)
    return build_vocab_map(p_texts, o_texts, specials, exclude=o_roles.values(), fallback=fallback)
