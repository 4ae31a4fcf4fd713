"""Inference-time logit fusion (PackLLM): weight each model by how well it predicts the prompt.

Pure weight formulas on tensors, a `FusedLogitModel` that the quick eval scores like any model,
and the `logit_fusion` recipe (YAML) whose models may be paths, Hub ids or weight-merge recipes.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import _jit_fusion
from .errors import MergelabError, name_list, pydantic_problems

WEIGHTINGS = ("sim", "opt", "uniform", "top1")
FUSION_METHOD = "logit_fusion"


# -- the formulas (pure functions, per example in a batch) -----------------------------------------
def prompt_target_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the prompt tokens that are predicted from earlier prompt tokens.

    A row's real tokens are numbered 0.. in order (padding skipped); token j is a target when
    1 <= j < prompt_length: the first token has no prediction, and the continuation is not
    scored (weighting a prediction by its own answer would leak it).
    """
    mask = attention_mask.bool()
    rank = attention_mask.long().cumsum(-1) - 1
    lengths = prompt_lengths.to(rank.device).long().view(-1, 1)
    return mask & (rank >= 1) & (rank < lengths)


# Work buffers hold this many floats (4 MiB on the CPU, about an L2 cache): the rows of a chunk
# stay in cache while the K models' logits are mixed and reduced, and nothing of size [B, T, V]
# is allocated. A GPU gets larger chunks (fewer kernel launches).
_CHUNK_FLOATS = {"cpu": 1 << 20, "cuda": 1 << 25}


class _Workspace:
    """A reusable float32 buffer (grown on demand), so repeated calls allocate nothing large."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def get(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        need = rows * cols
        if self._buf is None or self._buf.numel() < need or self._buf.device != device:
            self._buf = torch.empty(need, dtype=torch.float32, device=device)
        return self._buf[:need].view(rows, cols)


@dataclass
class _Chunk:
    """Consecutive rows [r0, r1) of the flattened [B*T, V] logits, some predicting prompt targets."""

    r0: int
    r1: int
    row_example: torch.Tensor  # [r1 - r0] example of the token each row predicts
    sel: torch.Tensor  # [n] rows (relative to r0) that predict a prompt target
    example: torch.Tensor  # [n] their example
    target: torch.Tensor  # [n, K] each model's logit of the target token


@dataclass
class _Plan:
    """Where the prompt targets are in the logits; the CEs are computed on views, chunk by chunk."""

    flat: list[torch.Tensor]  # K views [B*T, V], float32
    pred: torch.Tensor  # [n] the flat row that predicts each prompt target, ascending
    y: torch.Tensor  # [n] the target token
    example: torch.Tensor  # [n] its example
    counts: torch.Tensor  # [B] prompt targets per example (float32)
    batch: int
    length: int
    workspace: _Workspace
    jit: bool  # the compiled loops (mergelab._jit_fusion) compute the CEs
    _chunks: list[_Chunk] | None = None

    @property
    def chunks(self) -> list[_Chunk]:
        if self._chunks is None:
            self._chunks = _make_chunks(self)
        return self._chunks


def _plan(
    logits: Sequence[torch.Tensor], input_ids: torch.Tensor, target_mask: torch.Tensor,
    workspace: _Workspace | None = None,
) -> _Plan:
    batch, length = input_ids.shape
    device = logits[0].device
    flat = [lg.float().flatten(0, -2) for lg in logits]  # views (no copy) for float32 logits
    tgt = target_mask.to(device).reshape(-1).nonzero().squeeze(1)  # flat positions, ascending
    y = input_ids.to(device).reshape(-1)[tgt]
    ex = torch.div(tgt, length, rounding_mode="floor")
    counts = torch.bincount(ex, minlength=batch).to(torch.float32)
    return _Plan(flat, tgt - 1, y, ex, counts, batch, length, workspace or _Workspace(),
                 _jit_fusion.usable(flat))


def _make_chunks(plan: _Plan) -> list[_Chunk]:
    """The torch path's chunks: groups of predicting rows whose logits fit the workspace."""
    flat, pred, device = plan.flat, plan.pred, plan.counts.device
    vocab = flat[0].shape[-1]
    cap = max(1, _CHUNK_FLOATS.get(device.type, 1 << 20) // vocab)
    # Group the predicting rows into chunks of at most `cap` rows; a gap (padding, continuation)
    # is spanned only when the chunk still fits, so for a small vocabulary one chunk covers all.
    bounds, start = [], 0
    rows = pred.tolist()
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[start] + 1 > cap:
            bounds.append((start, i))
            start = i
    chunks = []
    for i0, i1 in bounds:
        r0, r1 = rows[i0], rows[i1 - 1] + 1
        p, yy = pred[i0:i1], plan.y[i0:i1].view(-1, 1)
        target = torch.cat([f[p].gather(-1, yy) for f in flat], dim=1)  # [n, K]
        row_ex = torch.div(torch.arange(r0 + 1, r1 + 1, device=device), plan.length, rounding_mode="floor")
        chunks.append(_Chunk(r0, r1, row_ex, p - r0, plan.example[i0:i1], target))
    return chunks


def _lse_(buf: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp of `buf` [n, V], computed in place (buf is overwritten)."""
    m = buf.amax(-1, keepdim=True)
    s = buf.sub_(m).exp_().sum(-1)
    return s.log_().add_(m.squeeze(-1))


def _single_losses(plan: _Plan) -> torch.Tensor:
    """[B, K]: ℓ_k, each model's mean cross-entropy on the prompt targets of each example.

    float64 from the compiled loops (their guards compare float64 sums), float32 from torch.
    """
    k_models = len(plan.flat)
    if plan.jit:
        one_hot = torch.eye(k_models, dtype=torch.float32).unsqueeze(1).expand(k_models, plan.batch, k_models)
        total = _jit_fusion.fused_ce_sums(plan.flat, one_hot, plan.pred, plan.y, plan.example, plan.batch)
        return (total / plan.counts.double().clamp(min=1)).T.contiguous()
    total = torch.zeros(k_models, plan.batch, dtype=torch.float32, device=plan.counts.device)
    for ch in plan.chunks:
        buf = plan.workspace.get(ch.r1 - ch.r0, plan.flat[0].shape[-1], plan.counts.device)
        for k, f in enumerate(plan.flat):
            buf.copy_(f[ch.r0 : ch.r1])
            ce = _lse_(buf)[ch.sel] - ch.target[:, k]
            total[k].index_add_(0, ch.example, ce)
    return (total / plan.counts.clamp(min=1)).T.contiguous()


def _fused_losses(plan: _Plan, weights: torch.Tensor) -> torch.Tensor:
    """[C, B]: mean prompt cross-entropy of the fusion under each of C weightings [C, B, K].

    The fused logits Σ_k w_k s_k are formed chunk by chunk in the workspace; the target's fused
    logit is Σ_k w_k t_k (linear), so it comes from the target logits gathered once. A one-hot
    weighting reproduces `_single_losses` exactly (1·x + 0·y == x in floating point).
    """
    n_cand = weights.shape[0]
    total = torch.zeros(n_cand, plan.batch, dtype=torch.float32, device=plan.counts.device)
    weights = weights.to(torch.float32)
    for ch in plan.chunks:
        buf = plan.workspace.get(ch.r1 - ch.r0, plan.flat[0].shape[-1], plan.counts.device)
        w_rows = weights[:, ch.row_example]  # [C, rows, K]
        w_tgt = weights[:, ch.example]  # [C, n, K]
        for c in range(n_cand):
            torch.mul(plan.flat[0][ch.r0 : ch.r1], w_rows[c, :, :1], out=buf)
            for k in range(1, len(plan.flat)):
                buf.addcmul_(plan.flat[k][ch.r0 : ch.r1], w_rows[c, :, k : k + 1])
            ce = _lse_(buf)[ch.sel] - (w_tgt[c] * ch.target).sum(-1)
            total[c].index_add_(0, ch.example, ce)
    return total / plan.counts.clamp(min=1)


def log_perplexities(
    logits: Sequence[torch.Tensor], input_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """[B, K]: ℓ_k per example, the mean token cross-entropy of model k on the masked targets.

    `logits[k][:, t]` predicts `input_ids[:, t + 1]`; an example without targets gets 0.
    """
    return _single_losses(_plan(logits, input_ids, target_mask)).float()


def sim_weights(log_ppl: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """PackLLM-sim: λ = softmax(−ℓ / τ) over the models, per example ([B, K] -> [B, K])."""
    return torch.softmax(-log_ppl.double() / tau, dim=-1).to(log_ppl.dtype)


def uniform_weights(log_ppl: torch.Tensor) -> torch.Tensor:
    """Every model weighs 1/K (fused logits = mean of the logits)."""
    return torch.full_like(log_ppl, 1.0 / log_ppl.shape[-1])


def top1_weights(log_ppl: torch.Tensor) -> torch.Tensor:
    """The lowest-ℓ model alone (the first of equals on a tie)."""
    best = torch.argmin(log_ppl, dim=-1)
    return torch.nn.functional.one_hot(best, log_ppl.shape[-1]).to(log_ppl.dtype)


def _grid(step: float) -> list[float]:
    # Descending from 1 so that a tie keeps the weight on the better-ranked models already in.
    n = int(math.floor(1.0 / step + 1e-9))
    values = {round(1.0 - i * step, 12) for i in range(n + 1)} | {0.0}
    return sorted((v for v in values if v >= 0.0), reverse=True)


def opt_weights(
    logits: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    grid_step: float = 0.05,
    tau: float = 1.0,
) -> torch.Tensor:
    """PackLLM-opt, per example: greedy minimisation of the fused prompt cross-entropy.

    Models are ranked by ℓ; the fusion starts from the best one; each next model joins through
    a line search over μ on a grid (weights ← μ·weights + (1−μ)·next), reusing the logits already
    computed. The grid contains μ = 1 (the next model left out), so the result is never worse on
    the prompt than the best single model. The greedy can miss the continuous optimum, so as a
    last step the sim weights (same τ) are taken instead where they fit the prompt strictly
    better — this guard is ours, not the paper's; it makes opt never worse than sim on the prompt.

    The line search returns the grid's first minimum (the largest μ on a tie) as a scan of every
    grid value would: with numba (mergelab._jit_fusion) one pass over the logits evaluates all
    grid values; without it, a Fibonacci search over the grid (f is convex in μ) evaluates ~7.
    """
    plan = _plan(logits, input_ids, target_mask)
    return _opt_weights(plan, _single_losses(plan), grid_step, tau)


def _opt_weights(plan: _Plan, ell: torch.Tensor, grid_step: float, tau: float) -> torch.Tensor:
    """[B, K] float32 opt weights; ell as `_single_losses` returned it."""
    if plan.jit:
        return _opt_weights_jit(plan, ell, grid_step, tau)
    k_models = ell.shape[1]
    order = torch.argsort(ell, dim=1, stable=True)  # [B, K], best first
    eye = torch.eye(k_models, dtype=torch.float32, device=ell.device)
    weights = eye[order[:, 0]]
    if k_models == 1:
        return weights.to(ell.dtype)
    grid = torch.tensor(_grid(grid_step), dtype=torch.float32, device=ell.device)  # 1 ... 0
    last = grid.shape[0] - 1
    fib = [1, 1]
    while fib[-1] < last + 2:
        fib.append(fib[-1] + fib[-2])
    cur_loss = ell.gather(1, order[:, :1]).squeeze(1).float()
    for step in range(1, k_models):
        e_next = eye[order[:, step]]
        next_loss = ell.gather(1, order[:, step : step + 1]).squeeze(1).float()

        def candidate(i, w=weights, e=e_next):
            mu = grid[i].unsqueeze(1)
            return mu * w + (1 - mu) * e  # μ = 1 and μ = 0 give w and e exactly

        # f(i), the fused CE at grid[i], is convex in μ (a logsumexp of logits affine in μ minus
        # a linear term), so a Fibonacci search over the grid indices finds the first grid
        # minimum, the point the full scan picks, in about log_φ(n) + 1 passes instead of n
        # (7 instead of 21 for the default step). Indices past the grid count as +inf; on a tie
        # the left part (larger μ) is kept, which holds the first minimum of a convex sequence.
        def f_at(i):
            f = _fused_losses(plan, candidate(i.clamp(max=last)).unsqueeze(0))[0]
            return torch.where(i > last, torch.full_like(f, float("inf")), f)

        j = next(j for j, v in enumerate(fib) if v >= last + 2)  # the interval (a, b) has b - a = fib[j]
        a = torch.full_like(order[:, 0], -1)
        x1, x2 = a + fib[j - 2], a + fib[j - 1]
        f1, f2 = f_at(x1), f_at(x2)
        while True:
            left = f1 <= f2  # the first minimum is in (a, x2), else in (x1, b)
            # The probe inside the kept part is carried over; one new probe is evaluated.
            carried, f_carried = torch.where(left, x1, x2), torch.where(left, f1, f2)
            a = torch.where(left, a, x1)
            j -= 1
            if j == 2:  # a single index is left inside: a + 1, the carried probe
                break
            new = torch.where(left, a + fib[j - 2], a + fib[j - 1])
            f_new = f_at(new)
            x1, x2 = torch.where(left, new, carried), torch.where(left, carried, new)
            f1, f2 = torch.where(left, f_new, f_carried), torch.where(left, f_carried, f_new)
        lo, f_lo = carried, f_carried
        # Rounding can make a flat f slightly non-convex: the ends (known without a pass) are
        # checked too, μ = 1 winning ties, so the greedy never gets worse than where it started.
        keep = cur_loss <= f_lo
        lo, f_lo = torch.where(keep, 0, lo), torch.where(keep, cur_loss, f_lo)
        alone = next_loss < f_lo
        lo, f_lo = torch.where(alone, last, lo), torch.where(alone, next_loss, f_lo)
        weights, cur_loss = candidate(lo), f_lo
    sim = sim_weights(ell, tau).float()
    sim_loss = _fused_losses(plan, sim.unsqueeze(0))[0]
    return torch.where((sim_loss < cur_loss).unsqueeze(1), sim, weights).to(ell.dtype)


def _opt_weights_jit(plan: _Plan, ell: torch.Tensor, grid_step: float, tau: float) -> torch.Tensor:
    """The same greedy with the compiled loops: one pass over the rows per added model gives the
    fused CE at every grid point (see mergelab._jit_fusion), and the first minimum is taken.

    Those grid values come from products of exponentials (last-bit differences from a direct
    evaluation), so the guards are evaluated directly, by the loop that computed ℓ: the greedy's
    result is kept unless the best single model or the sim weights fit the prompt strictly
    better by that same measure.
    """
    k_models, batch = ell.shape[1], plan.batch
    ell32 = ell.float()
    order = torch.argsort(ell, dim=1, stable=True)  # [B, K], best first
    eye = torch.eye(k_models, dtype=torch.float32)
    best = eye[order[:, 0]]
    if k_models == 1:
        return best
    grid = torch.tensor(_grid(grid_step), dtype=torch.float32)  # 1, 1 − h, ..., (then 0)
    n_uni = int(math.floor(1.0 / grid_step + 1e-9))
    extra0 = round(1.0 - n_uni * grid_step, 12) > 0.0  # the grid ends at 0 off the h spacing
    counts = plan.counts.double().clamp(min=1)
    weights = best
    for step in range(1, k_models):
        e_next = eye[order[:, step]]
        sums = _jit_fusion.grid_ce_sums(plan.flat, weights, order[:, step].contiguous(), plan.pred,
                                        plan.y, plan.example, batch, grid_step, n_uni, extra0)
        lo = torch.argmin(sums / counts.unsqueeze(1), dim=1)  # the first minimum: larger μ on ties
        mu = grid[lo].unsqueeze(1)
        weights = mu * weights + (1 - mu) * e_next  # μ = 1 and μ = 0 give w and e exactly

    sim = sim_weights(ell32, tau).float()
    cur, sim_loss = _jit_fusion.fused_ce_sums(plan.flat, torch.stack([weights, sim]), plan.pred, plan.y,
                                              plan.example, batch) / counts
    best_loss = ell.gather(1, order[:, :1]).squeeze(1)  # the same loop on a one-hot weighting
    worse = best_loss < cur
    weights, cur = torch.where(worse.unsqueeze(1), best, weights), torch.where(worse, best_loss, cur)
    return torch.where((sim_loss < cur).unsqueeze(1), sim, weights)


@dataclass
class FusionWeights:
    """Per-example fusion weights and the prompt log-perplexities they came from."""

    weights: torch.Tensor  # [B, K], rows sum to 1
    log_ppl: torch.Tensor  # [B, K] ℓ_k per example (0 where the prompt has < 2 tokens)
    scored_tokens: torch.Tensor  # [B] number of prompt tokens that ℓ averages over


def fusion_weights(
    weighting: str,
    logits: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    tau: float = 1.0,
    grid_step: float = 0.05,
    workspace: _Workspace | None = None,
) -> FusionWeights:
    """The weights of one weighting mode; an example with no prompt target gets uniform weights."""
    _check_weighting(weighting)
    plan = _plan(logits, input_ids, target_mask, workspace)
    exact = _single_losses(plan)  # float64 from the compiled loops, which opt's guards use
    return _weights_from_losses(weighting, exact, target_mask, tau,
                                lambda: _opt_weights(plan, exact, grid_step, tau))


def _prompt_losses(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor, workspace: _Workspace | None = None
) -> torch.Tensor:
    """[B, 1]: one model's ℓ, the same values as its column of `_single_losses` over K models
    (each model's cross-entropies are summed on their own, in the same order), so the weights
    that need ℓ only can be made while the models' prompt logits are computed one at a time."""
    return _single_losses(_plan([logits], input_ids, target_mask, workspace))


def _weights_from_losses(
    weighting: str, exact: torch.Tensor, target_mask: torch.Tensor, tau: float,
    opt: Callable[[], torch.Tensor] | None = None,
) -> FusionWeights:
    """The weights from ℓ ([B, K], as `_single_losses` returns it); `opt`, which needs the
    logits themselves, computes opt's."""
    ell = exact.float()
    if weighting == "sim":
        w = sim_weights(ell, tau)
    elif weighting == "opt":
        if opt is None:
            raise ValueError("opt weights need the prompt logits of every model")
        w = opt()
    elif weighting == "uniform":
        w = uniform_weights(ell)
    else:
        w = top1_weights(ell)
    scored = target_mask.sum(-1).to(w.device)
    # Nothing to judge the models by: no model is preferred.
    w = torch.where((scored == 0).unsqueeze(1), uniform_weights(ell), w)
    return FusionWeights(w, ell, scored)


def fuse_logits(
    logits: Sequence[torch.Tensor], weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_k λ_k · logits_k with per-example λ ([B, K]); logits are [B, ..., V].

    The sum is accumulated in place in one tensor: a new one, or `out` (float32, the logits'
    shape), which may be logits[0] itself when the caller no longer needs it — then nothing of
    size [B, T, V] is allocated (a fresh 64 MB tensor costs about as much as the sum itself).
    """
    # On the CPU (numba installed) one compiled pass makes the same sum: K reads, one write,
    # instead of K read-modify-write passes over [B, T, V].
    if out is None and _jit_fusion.usable(list(logits), flat=False):
        out = torch.empty(logits[0].shape, dtype=torch.float32)
    if out is not None and _jit_fusion.weighted_sum(list(logits), weights, out):
        return out
    for k, lg in enumerate(logits):
        w = weights[:, k].to(lg.device, torch.float32).view(-1, *([1] * (lg.dim() - 1)))
        if k == 0:
            out = torch.mul(lg.float(), w) if out is None else torch.mul(lg.float(), w, out=out)
        else:
            out.addcmul_(lg.float(), w)
    return out


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise MergelabError(
            f"Unknown fusion weighting {weighting!r}. Allowed values: {', '.join(WEIGHTINGS)} "
            "(sim: softmax of −log-perplexity/τ; opt: greedy perplexity minimisation; "
            "uniform: mean of the logits; top1: the best model on the prompt alone)."
        )


# -- vocabularies ----------------------------------------------------------------------------------
def check_shared_vocabulary(tokenizers: Sequence[Any], names: Sequence[str]) -> int:
    """Check that every tokenizer has the first one's vocabulary (same tokens, same ids).

    Returns the vocabulary size. Raises MergelabError naming the first id that differs.
    """
    ref = {i: t for t, i in tokenizers[0].get_vocab().items()}
    for name, tok in zip(names[1:], tokenizers[1:]):
        other = {i: t for t, i in tok.get_vocab().items()}
        if other == ref:
            continue
        for i in sorted(set(ref) | set(other)):
            a, b = ref.get(i), other.get(i)
            if a != b:
                a_s = repr(a) if a is not None else "missing"
                b_s = repr(b) if b is not None else "missing"
                raise MergelabError(
                    f"The models {names[0]} and {name} do not share a tokenizer: id {i} is {a_s} "
                    f"in {names[0]} but {b_s} in {name} (vocabularies of {len(ref)} and "
                    f"{len(other)} tokens). Logit fusion adds next-token logits id by id, so all "
                    "models must use one tokenizer; fuse models fine-tuned from the same base, "
                    "or leave this one out. To fuse them anyway for generation (sim, uniform or "
                    "top1 weights), opt in to cross-tokenizer fusion: `cross_tokenizer: true` in "
                    "the recipe's parameters or `mergelab fuse --cross-tokenizer`; the other "
                    "vocabularies are then mapped to the first model's by minimum edit distance."
                )
    return len(ref)


def _output_rows(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


# -- members: one wrapped model each, with its own KV cache during generation -----------------------
def _is_hf_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and hasattr(obj, "forward")


class _HFMember:
    """A transformers causal LM called with left padding, explicit position ids and a KV cache.

    Called only from FusedLogitModel's methods, which run under torch.inference_mode (entering
    it again per call costs a few microseconds, a tangible part of a tiny model's step).
    """

    def __init__(self, model: Any):
        self.model = model
        self.rows = _output_rows(model)
        self.device = next(model.parameters()).device
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes).
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _cache_of(self, out):
        return getattr(out, self._cache_kw, None) if self._cache_kw == "cache" else out.past_key_values

    def logits(self, input_ids, attention_mask):
        return self.prefill(input_ids, attention_mask, use_cache=False)[0]

    def prefill(self, input_ids, attention_mask, use_cache=True):
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache
        )
        state = {"cache": self._cache_of(out)} if use_cache else None
        return out.logits.float(), state

    def step(self, state, tokens, mask, pos):
        """Logits [B, V] after one more token; tokens and pos [B, 1], mask [B, T + 1] (shared
        by the members, made once per step by the caller)."""
        out = self.model(
            input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
            **{self._cache_kw: state["cache"]},
        )
        state["cache"] = self._cache_of(out)
        return out.logits[:, -1]


class _ProtocolMember:
    """Any LogitModel; it has no incremental step, so generation rescores the whole sequence."""

    def __init__(self, model: Any):
        self.model = model
        self.rows = int(model.vocab_size)
        self.device = model.device

    def logits(self, input_ids, attention_mask):
        return self.model.logits(input_ids.to(self.device), attention_mask.to(self.device)).float()

    def prefill(self, input_ids, attention_mask, use_cache=True):
        state = {"ids": input_ids.to(self.device)}
        return self.logits(input_ids, attention_mask), state

    def step(self, state, tokens, mask, pos):
        state["ids"] = torch.cat([state["ids"], tokens], 1)
        return self.logits(state["ids"], mask)[:, -1]


def _member(model: Any):
    if _is_hf_model(model):
        return _HFMember(model)
    inner = getattr(model, "model", None)  # e.g. an HFLogitModel: use its model, for the KV cache
    if inner is not None and _is_hf_model(inner):
        return _HFMember(inner)
    if hasattr(model, "logits") and hasattr(model, "vocab_size"):
        return _ProtocolMember(model)
    raise MergelabError(
        f"Cannot fuse an object of type {type(model).__name__}: pass transformers causal language "
        "models or objects implementing mergelab.eval.protocol.LogitModel."
    )


# -- cross-tokenizer members (opt-in) -------------------------------------------------------------
def _vocab_size_of(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else 0


def _cross_refusal(what: str, pivot: str, cross: Sequence[str], instead: str) -> MergelabError:
    models = name_list(cross)
    return MergelabError(
        f"{what} needs every model to read the same tokens, but this cross-tokenizer fusion has "
        f"models whose tokenizer differs from the first model's ({pivot}): {models}. Across "
        f"tokenizers only next-token predictions can be combined (each model scores the prompt "
        f"with its own tokens); {instead}"
    )


_SCORING_INSTEAD = (
    "score this fusion with generation-based evals (exact match), which work across tokenizers "
    "with sim, uniform or top1 weights, or fuse models that share one tokenizer."
)


class _CrossMember:
    """A member whose tokenizer differs from the pivot's (the first model's), in a fusion opted in
    with `cross_tokenizer=True`.

    It reads the pivot ids as text and tokenizes that text itself: each run of ordinary pivot
    tokens is decoded by the pivot tokenizer and encoded by its own (no special tokens added);
    each pivot special token becomes its own counterpart (same role: bos, eos, unk, pad; else the
    same string among its added tokens; else it is dropped). Its prompt ℓ is its mean
    cross-entropy on that own tokenization, and its next-token logits are read at the pivot ids
    through the vocabulary map (mergelab.fusion_vocab), so that they add to the others'.

    During generation every new pivot token re-encodes the row's text (the whole text: a merge
    may change earlier own tokens). The batch keeps one KV cache: own tokens that stay are not
    recomputed; a changed tail is masked out of the cache (the attention mask is 0 there — a
    per-row crop that keeps the batch in one call) and the new own tokens are appended, right-
    aligned in a block of the longest row's new tokens (masked filler before shorter rows'). The
    logits are those of a full forward over the re-tokenized text (to float rounding).

    Text ending in an incomplete UTF-8 character (a byte-level token holding part of one,
    decoded as U+FFFD): up to 3 trailing pivot tokens are held back until the character is
    complete, so the member never reads a replacement character that the next token will
    replace; meanwhile its prediction is the one after the complete text. A U+FFFD that does
    not go away by dropping 3 tokens is taken as real text.
    """

    def __init__(self, inner: Any, pivot_tok: Any, own_tok: Any, pivot_vocab: int, name: str):
        from .fusion_vocab import special_ids, tokenizer_vocab_map

        self.inner, self.name = inner, name
        self.device = inner.device
        self.rows = pivot_vocab  # its step logits are already in the pivot vocabulary
        self.pivot_tok, self.own_tok = pivot_tok, own_tok
        self.vocab_map = tokenizer_vocab_map(pivot_tok, own_tok, size=pivot_vocab)
        self.map = self.vocab_map.tensor(self.device)
        self.own_vocab = _vocab_size_of(own_tok)
        p_roles, o_roles = special_ids(pivot_tok), special_ids(own_tok)
        own_added = own_tok.get_added_vocab() if hasattr(own_tok, "get_added_vocab") else {}
        self._special: dict[int, int | None] = {}
        for i in pivot_tok.all_special_ids:
            role = next((r for r, j in p_roles.items() if j == i and r in o_roles), None)
            text = pivot_tok.convert_ids_to_tokens(i)
            self._special[i] = o_roles[role] if role else own_added.get(text)
        self._pad = o_roles.get("pad", o_roles.get("eos", 0))
        # A text without any own token (e.g. a prompt of pivot specials the member has no
        # counterpart for) is read as its bos (else eos): a model needs one token to predict from.
        self._start = o_roles.get("bos", o_roles.get("eos"))

    # -- text -> own ids
    def _decode(self, ids: list[int]) -> str:
        return self.pivot_tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode_run(self, run: list[int], last: bool) -> list[int]:
        if not run:
            return []
        text = self._decode(run)
        if last and text.endswith("\ufffd"):
            for j in range(1, min(3, len(run)) + 1):
                shorter = self._decode(run[:-j])
                if not shorter.endswith("\ufffd"):
                    text = shorter
                    break
        return list(self.own_tok.encode(text, add_special_tokens=False)) if text else []

    def own_ids(self, pivot_ids: Sequence[int]) -> list[int]:
        """The member's own tokens for a row of real pivot tokens."""
        out: list[int] = []
        run: list[int] = []
        for t in pivot_ids:
            if t in self._special:
                out += self._encode_run(run, last=False)
                run = []
                if self._special[t] is not None:
                    out.append(self._special[t])
            else:
                run.append(t)
        out += self._encode_run(run, last=True)
        if not out:
            if self._start is None:
                raise MergelabError(
                    f"The model {self.name} (cross-tokenizer member) gets an empty text to read and "
                    "its tokenizer has no bos or eos token to start from. Give a prompt with text."
                )
            out = [self._start]
        return out

    def _own_logits(self, lg: torch.Tensor) -> torch.Tensor:
        return lg[..., : self.own_vocab] if lg.shape[-1] > self.own_vocab else lg

    def _mapped(self, lg: torch.Tensor) -> torch.Tensor:
        return lg.float().index_select(-1, self.map)

    # -- the fusion's calls
    def prompt(self, input_ids, attention_mask, prompt_lengths=None, use_cache=True):
        """(ℓ [B, 1], mapped last logits [B, V_pivot], state) for the real tokens of each row
        (its first prompt_lengths[b] real tokens when given)."""
        ids_l, mask_l = input_ids.tolist(), attention_mask.tolist()
        rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids_l, mask_l)]
        if prompt_lengths is not None:
            rows = [r[: int(n)] for r, n in zip(rows, prompt_lengths.tolist())]
        own = [self.own_ids(r) for r in rows]
        width = max(len(r) for r in own)
        ids = torch.tensor([[self._pad] * (width - len(r)) + r for r in own], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in own], device=self.device)
        state: dict[str, Any] = {"pivot": rows, "own": own}
        if isinstance(self.inner, _HFMember):
            lg, st = self.inner.prefill(ids, mask, use_cache=use_cache)
            if use_cache:
                state.update(cache=st["cache"], mask=mask,
                             slots=[list(range(width - len(r), width)) for r in own])
        else:
            lg = self.inner.logits(ids, mask)
        lg = self._own_logits(lg)
        target = prompt_target_mask(mask, mask.sum(-1))
        ell = _prompt_losses(lg, ids, target)
        last = self._mapped(lg[:, -1])
        state["last"] = last
        return ell, last.clone(), state

    def step(self, state, tokens: Sequence[int], skip: Sequence[bool] | None = None) -> torch.Tensor:
        """Mapped logits [B, V_pivot] after one more pivot token per row (rows in `skip` are not
        extended: their logits stay those of their last step)."""
        feeds: list[tuple[int, list[int]] | None] = []
        for b, t in enumerate(tokens):
            if skip is not None and skip[b]:
                feeds.append(None)
                continue
            state["pivot"][b].append(int(t))
            new, old = self.own_ids(state["pivot"][b]), state["own"][b]
            if new == old:  # the text did not change (a held-back byte, a dropped special)
                feeds.append(None)
                continue
            p = 0
            for x, y in zip(old, new):
                if x != y:
                    break
                p += 1
            if p == len(new):  # new is a prefix of old: re-read its last token for its logits
                p -= 1
            feeds.append((p, new[p:]))
            state["own"][b] = new
        fed = [b for b, f in enumerate(feeds) if f is not None]
        if fed:
            if isinstance(self.inner, _HFMember):
                lg = self._cached_forward(state, feeds)
            else:  # no cache: the whole own text again, as a full forward
                own = state["own"]
                width = max(len(r) for r in own)
                ids = torch.tensor([[self._pad] * (width - len(r)) + r for r in own], device=self.device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in own], device=self.device)
                lg = self.inner.logits(ids, mask)[:, -1]
            rows = torch.tensor(fed, device=self.device)
            state["last"][rows] = self._mapped(self._own_logits(lg[rows]))
        return state["last"].clone()

    def _cached_forward(self, state, feeds) -> torch.Tensor:
        """One forward of the new own tokens of every fed row over the batch's cache: [B, V_own]
        logits at each row's last new token (the block's last column)."""
        n_max = max(len(f[1]) for f in feeds if f is not None)
        mask = state["mask"]
        batch, width = mask.shape
        block = [[self._pad] * n_max for _ in range(batch)]
        new_mask = [[0] * n_max for _ in range(batch)]
        pos = [[0] * n_max for _ in range(batch)]
        dropped_rows, dropped_cols = [], []
        for b, f in enumerate(feeds):
            if f is None:
                continue
            p, toks = f
            slots = state["slots"][b]
            dropped_rows += [b] * (len(slots) - p)
            dropped_cols += slots[p:]
            start = n_max - len(toks)
            for i, t in enumerate(toks):
                block[b][start + i], new_mask[b][start + i], pos[b][start + i] = t, 1, p + i
            for i in range(start):
                pos[b][i] = p  # masked filler: any position
            state["slots"][b] = slots[:p] + list(range(width + start, width + n_max))
        if dropped_rows:
            mask[dropped_rows, dropped_cols] = 0
        mask = torch.cat([mask, torch.tensor(new_mask, dtype=mask.dtype, device=self.device)], 1)
        m = self.inner
        out = m.model(
            input_ids=torch.tensor(block, device=self.device), attention_mask=mask,
            position_ids=torch.tensor(pos, device=self.device), use_cache=True,
            **{m._cache_kw: state["cache"]},
        )
        state["cache"], state["mask"] = m._cache_of(out), mask
        return out.logits[:, -1]


# -- the fused model -------------------------------------------------------------------------------
class FusedLogitModel:
    """K models fused at inference time; implements mergelab.eval.protocol.LogitModel.

    Weights are computed per example from the prompt. In `logits`, the prompt is the first
    `prompt_lengths[b]` real tokens of row b. When `prompt_lengths` is None (plain perplexity of
    a text), the weights come from the first half of each text (floor(length / 2) tokens), since
    weighting a text's prediction by how well each model predicts that same text would leak it;
    the logits are still returned for every position. `last_weights` holds the weights of the
    latest call (the CLI prints them).

    `cross_tokenizer=True` (it needs `tokenizers`) accepts models whose tokenizer differs from
    the first model's (the pivot): they read the prompt as text in their own tokens and their
    logits are mapped to the pivot vocabulary by minimum edit distance (mergelab.fusion_vocab,
    see `_CrossMember`). Only generation works then, with sim, uniform or top1 weights: opt and
    `logits` mix logits position by position, which needs one tokenization, and are refused.
    Models sharing the pivot's tokenizer keep the plain path; with identical tokenizers the
    option changes nothing.
    """

    def __init__(
        self,
        models: Sequence[Any],
        weighting: str = "sim",
        tau: float = 1.0,
        grid_step: float = 0.05,
        tokenizers: Sequence[Any] | None = None,
        names: Sequence[str] | None = None,
        cross_tokenizer: bool = False,
    ):
        if len(models) == 0:
            raise MergelabError("A logit fusion needs at least one model; none was given.")
        _check_weighting(weighting)
        if not (tau > 0 and math.isfinite(tau)):
            raise MergelabError(f"The fusion temperature tau must be a positive number; got {tau}.")
        if not (0 < grid_step <= 1):
            raise MergelabError(f"The opt grid step must be in (0, 1]; got {grid_step}.")
        self.names = list(names) if names is not None else [f"model{i}" for i in range(len(models))]
        self.members = [_member(m) for m in models]
        self.cross_tokenizer = bool(cross_tokenizer)
        self._cross: list[int] = []  # indices of the cross-tokenizer members
        if cross_tokenizer and tokenizers is None:
            raise MergelabError(
                "cross_tokenizer=True needs the models' tokenizers (tokenizers=[...], one per model, "
                "in the models' order): the vocabularies are mapped from them."
            )
        if cross_tokenizer and len(tokenizers) != len(models):
            raise MergelabError(
                f"cross_tokenizer=True needs one tokenizer per model; got {len(tokenizers)} "
                f"tokenizers for {len(models)} models."
            )
        # Which models differ from the pivot is known before the weighting is checked (opt is
        # refused across tokenizers).
        if cross_tokenizer:
            pivot_vocab = tokenizers[0].get_vocab()
            self._cross = [k for k in range(1, len(models)) if tokenizers[k].get_vocab() != pivot_vocab]
            if weighting == "opt" and self._cross:
                raise self._refusal("opt")
        self.weighting, self.tau, self.grid_step = weighting, float(tau), float(grid_step)
        self.device = self.members[0].device
        if tokenizers is not None:
            if self._cross:
                self.vocab_size = _vocab_size_of(tokenizers[0])
            else:
                self.vocab_size = check_shared_vocabulary(tokenizers, self.names)
            for k, (name, m) in enumerate(zip(self.names, self.members)):
                need = _vocab_size_of(tokenizers[k]) if k in self._cross else self.vocab_size
                if m.rows < need:
                    raise MergelabError(
                        f"Model {name} has {m.rows} output rows but its tokenizer has "
                        f"{need} tokens; its logits cannot cover the vocabulary. "
                        "Check that the tokenizer belongs to this model."
                    )
            for k in self._cross:
                self.members[k] = _CrossMember(self.members[k], tokenizers[0], tokenizers[k],
                                               self.vocab_size, self.names[k])
        else:
            # Rows past the smallest model's are padding rows (e.g. rounded up to a multiple of 64).
            self.vocab_size = min(m.rows for m in self.members)
        self.last_weights: FusionWeights | None = None
        self._workspace = _Workspace()

    @property
    def weighting(self) -> str:
        return self._weighting

    @weighting.setter
    def weighting(self, value: str) -> None:
        # Set again by callers (e.g. `mergelab fuse --weights` over a recipe): checked each time.
        _check_weighting(value)
        if value == "opt" and getattr(self, "_cross", None):
            raise self._refusal("opt")
        self._weighting = value

    @property
    def cross_names(self) -> list[str]:
        """The models whose tokenizer differs from the first model's (empty without cross_tokenizer)."""
        return [self.names[k] for k in self._cross]

    def _refusal(self, what: str) -> MergelabError:
        cross = self.cross_names
        if what == "opt":
            return _cross_refusal(
                "The fusion weighting opt (it mixes the models' logits at every prompt position)",
                self.names[0], cross, "use weighting sim, uniform or top1 with these models.",
            )
        return _cross_refusal(
            "Scoring every position of a text (FusedLogitModel.logits, used by perplexity and "
            "multiple-choice evals)", self.names[0], cross, _SCORING_INSTEAD,
        )

    def _weights(self, logits, input_ids, attention_mask, prompt_lengths) -> FusionWeights:
        target = prompt_target_mask(attention_mask.to(self.device), prompt_lengths.to(self.device))
        fw = fusion_weights(
            self.weighting, logits, input_ids.to(self.device), target, self.tau, self.grid_step,
            self._workspace,
        )
        self.last_weights = fw
        return fw

    def _all_logits(self, input_ids, attention_mask):
        return [
            m.logits(input_ids, attention_mask)[..., : self.vocab_size].to(self.device)
            for m in self.members
        ]

    @torch.inference_mode()
    def weights(self, input_ids, attention_mask, prompt_lengths=None) -> FusionWeights:
        """The fusion weights for these prompts (whole rows unless prompt_lengths is given)."""
        if prompt_lengths is None:
            prompt_lengths = attention_mask.sum(-1)
        if self._cross:
            return self._cross_weights(input_ids, attention_mask, prompt_lengths)
        return self._weights(self._all_logits(input_ids, attention_mask), input_ids, attention_mask, prompt_lengths)

    def _cross_weights(self, input_ids, attention_mask, prompt_lengths) -> FusionWeights:
        """sim/uniform/top1 weights with cross-tokenizer members: each model's ℓ on its own tokens."""
        target = prompt_target_mask(attention_mask.to(self.device), prompt_lengths.to(self.device))
        ids = input_ids.to(self.device)
        losses = []
        for m in self.members:
            if isinstance(m, _CrossMember):
                ell = m.prompt(input_ids, attention_mask, prompt_lengths, use_cache=False)[0]
            else:
                lg = m.logits(input_ids, attention_mask)[..., : self.vocab_size].to(self.device)
                ell = _prompt_losses(lg, ids, target, self._workspace)
                del lg
            losses.append(ell.to(self.device))
        fw = _weights_from_losses(self.weighting, torch.cat(losses, 1), target, self.tau)
        self.last_weights = fw
        return fw

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask, prompt_lengths=None):
        if self._cross:
            raise self._refusal("logits")
        if prompt_lengths is None:
            prompt_lengths = attention_mask.sum(-1) // 2
        all_logits = self._all_logits(input_ids, attention_mask)
        fw = self._weights(all_logits, input_ids, attention_mask, prompt_lengths)
        # A transformers member's logits are a tensor of our own (the forward's output, or its
        # float32 copy), no longer needed once the weights are known: the sum goes into it.
        # Another LogitModel may hand out a tensor it keeps, so its logits are left alone.
        # (Only when contiguous: a view that drops padding rows stays a fresh tensor's job, so
        # callers always get contiguous logits.)
        first = all_logits[0]
        own = isinstance(self.members[0], _HFMember) and first.dtype == torch.float32 and first.is_contiguous()
        return fuse_logits(all_logits, fw.weights, out=first if own else None)

    @torch.inference_mode()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of the fused distribution; each model keeps its own KV cache.

        The weights are computed once, from the whole prompt. A row ends after emitting
        `eos_token_id` (kept in its output, as transformers does) or when `stop` says so.
        """
        batch = input_ids.shape[0]
        outs: list[list[int]] = [[] for _ in range(batch)]
        if max_new_tokens <= 0:
            return outs
        states: list[Any] = []
        if self.weighting == "opt" and self._cross:
            raise self._refusal("opt")
        if self.weighting == "opt":  # its line search mixes the K models' prompt logits
            prompt_logits = []
            for m in self.members:
                lg, st = m.prefill(input_ids, attention_mask)
                prompt_logits.append(lg[..., : self.vocab_size].to(self.device))
                states.append(st)
            fw = self._weights(prompt_logits, input_ids, attention_mask, attention_mask.sum(-1))
            next_logits = fuse_logits([lg[:, -1] for lg in prompt_logits], fw.weights)
            del prompt_logits, lg  # K × [B, T, V]: not kept through the decoding
        else:
            # sim, uniform and top1 need each model's ℓ only: it is taken from a model's prompt
            # logits as soon as they are computed, and only their last position is kept, so one
            # [B, T, V] is alive at a time instead of K (the same ℓ, weights and tokens).
            target = prompt_target_mask(attention_mask.to(self.device), attention_mask.sum(-1).to(self.device))
            ids = input_ids.to(self.device)
            losses, last = [], []
            for m in self.members:
                if isinstance(m, _CrossMember):  # ℓ on its own tokens, logits in the pivot vocabulary
                    ell, lg_last, st = m.prompt(input_ids, attention_mask)
                    losses.append(ell.to(self.device))
                    last.append(lg_last.to(self.device))
                    states.append(st)
                    continue
                lg, st = m.prefill(input_ids, attention_mask)
                lg = lg[..., : self.vocab_size].to(self.device)
                losses.append(_prompt_losses(lg, ids, target, self._workspace))
                last.append(lg[:, -1].clone())
                states.append(st)
                del lg
            fw = _weights_from_losses(self.weighting, torch.cat(losses, 1), target, self.tau)
            self.last_weights = fw
            next_logits = fuse_logits(last, fw.weights)
            del last
        # Per step, everything but the K forwards is made once: the weight columns (as
        # fuse_logits makes them), the grown mask and positions shared by the members (which
        # all see the same tokens), and the sum goes into one reused buffer. The sum is formed
        # in member order with fuse_logits' operations, so the fused logits are the same.
        devices = {m.device for m in self.members}
        w_cols = [fw.weights[:, k].to(self.device, torch.float32).view(-1, 1) for k in range(len(self.members))]
        mask = attention_mask.to(self.device).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        trim = [m.rows > self.vocab_size for m in self.members]
        cross = [isinstance(m, _CrossMember) for m in self.members]
        done = [False] * batch
        for i in range(max_new_tokens):
            tokens = next_logits.argmax(-1)
            for b, t in enumerate(tokens.tolist()):
                if done[b]:
                    continue
                outs[b].append(t)
                if (eos_token_id is not None and t == eos_token_id) or (stop is not None and stop(outs[b])):
                    done[b] = True
            if all(done) or i == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            pos = pos + 1
            inputs = {d: (tokens.view(-1, 1).to(d), mask.to(d), pos.to(d)) for d in devices}
            token_list = tokens.tolist() if any(cross) else None
            for k, (m, st) in enumerate(zip(self.members, states)):
                # A cross member re-reads each row's text (finished rows are left as they are).
                lg = m.step(st, token_list, done) if cross[k] else m.step(st, *inputs[m.device])
                if trim[k]:
                    lg = lg[..., : self.vocab_size]
                lg = lg.to(self.device, torch.float32)
                if k == 0:
                    torch.mul(lg, w_cols[0], out=next_logits)  # a tensor of ours since the prefill
                else:
                    next_logits.addcmul_(lg, w_cols[k])
        return outs


# -- the fusion recipe -----------------------------------------------------------------------------
class FusionModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)


class FusionParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: str = "sim"
    tau: float = Field(1.0, gt=0)
    grid_step: float = Field(0.05, gt=0, le=1)
    # Opt-in: models with other tokenizers are mapped to the first model's vocabulary (generation
    # with sim/uniform/top1 only); off, differing tokenizers are an error.
    cross_tokenizer: bool = False

    @field_validator("weighting")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {v!r}; allowed values: {', '.join(WEIGHTINGS)}")
        return v


class FusionRecipe(BaseModel):
    """`merge_method: logit_fusion`, the models to fuse, and the weighting parameters."""

    model_config = ConfigDict(extra="forbid")
    merge_method: Literal["logit_fusion"]
    models: list[FusionModelEntry] = Field(min_length=1)
    parameters: FusionParameters = FusionParameters()

    @field_validator("models", mode="before")
    @classmethod
    def _plain_strings(cls, v: Any) -> Any:
        # `- path` is accepted as shorthand for `- model: path`.
        if isinstance(v, list):
            return [{"model": x} if isinstance(x, str) else x for x in v]
        return v


def is_fusion_recipe(data: Any) -> bool:
    """True for a recipe mapping whose merge_method is logit_fusion."""
    return isinstance(data, dict) and data.get("merge_method") == FUSION_METHOD


def validate_fusion_recipe(data: Any, where: str = "fusion recipe") -> FusionRecipe:
    """Validate a fusion recipe mapping; errors name the field and what to do."""
    if not isinstance(data, dict):
        raise MergelabError(f"The {where} must be a YAML mapping with `merge_method: logit_fusion` and `models`.")
    try:
        return FusionRecipe.model_validate(data)
    except ValidationError as e:
        raise MergelabError(
            f"Invalid {where}: {pydantic_problems(e)}. A fusion recipe has `merge_method: "
            "logit_fusion`, `models: [{model: PATH_OR_HUB_ID_OR_RECIPE.yml}, ...]` (at least one) and "
            "optional `parameters: {weighting: sim|opt|uniform|top1, tau: > 0, grid_step: (0, 1], "
            "cross_tokenizer: true|false}`."
        ) from None


@dataclass
class _Source:
    name: str  # as written in the recipe
    kind: str  # "hf" (directory or Hub id) or "recipe" (a weight-merge recipe file)
    location: str


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve_source(entry: str, base_dir: Path | None, where: str, index: int) -> _Source:
    if base_dir is not None and (entry in (".", "..") or entry.startswith(("./", "../"))):
        # An explicit ./ path in a recipe file is the recipe's own neighbour (e.g. an exported
        # hybrid naming its merge folder as "."), wherever the command runs from.
        candidates = [base_dir / entry]
    else:
        candidates = [Path(entry)] + ([base_dir / entry] if base_dir and not Path(entry).is_absolute() else [])
    found = next((c for c in candidates if c.exists()), None)
    is_yaml = entry.endswith((".yml", ".yaml"))
    if found is not None:
        if is_yaml or found.is_file():
            return _Source(entry, "recipe", str(found))
        return _Source(entry, "hf", str(found))
    if not is_yaml and _HUB_ID.match(entry):
        return _Source(entry, "hf", entry)
    raise MergelabError(
        f"In the {where}, models[{index}] ({entry!r}) was not found: it is neither an existing "
        f"path (tried {name_list(str(c) for c in candidates)}) nor a Hub id like owner/name. Fix "
        "the path (relative paths are tried from the current directory, then from the recipe's; "
        "a path starting with ./ only from the recipe's)."
    )


def _check_merge_recipe(src: _Source, where: str, index: int) -> None:
    """Validate a hybrid's weight-merge recipe before any model is loaded."""
    from .recipe import load_recipe, read_yaml

    data = read_yaml(src.location)
    if is_fusion_recipe(data):
        raise MergelabError(
            f"In the {where}, models[{index}] ({src.name}) is itself a logit-fusion recipe; nested "
            "fusions are not supported. List its models directly in this recipe instead."
        )
    load_recipe(data, where=f"merge recipe {src.location} (models[{index}] of the {where})")


def _hf_error(location: str, e: Exception) -> MergelabError:
    return MergelabError(
        f"Could not load the model {location}: {e}. Check the path (a directory with "
        "config.json, safetensors weights and a tokenizer) or the Hub id and your connection."
    )


def _load_sources(
    sources: list[_Source], where: str, device: str | torch.device, cross_tokenizer: bool = False,
    weighting: str = "sim", scoring: str | None = None,
) -> tuple[list[Any], list[Any]]:
    """Check every source cheaply first (merge recipes, tokenizers), then load the weights.

    With cross_tokenizer, differing tokenizers pass, but not with the opt weighting, nor when
    `scoring` says the fusion will score every position of texts (e.g. an eval's perplexity
    scorer): both need one tokenization, so they are refused before any weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval.models import resolve_device

    device = resolve_device(device)
    # float32 on the CPU (half precision is slow there), the checkpoint's own dtype on a GPU.
    dtype = torch.float32 if device.type == "cpu" else "auto"
    for i, src in enumerate(sources):
        if src.kind == "recipe":
            _check_merge_recipe(src, where, i)
    tokenizers: dict[int, Any] = {}
    for i, src in enumerate(sources):
        if src.kind == "hf":
            try:
                tokenizers[i] = AutoTokenizer.from_pretrained(src.location, trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise _hf_error(src.location, e) from None
    # A vocabulary mismatch between plain models stops here, before any weights are read.
    if len(tokenizers) > 1 and not cross_tokenizer:
        check_shared_vocabulary(list(tokenizers.values()), [sources[i].name for i in tokenizers])
    elif cross_tokenizer and (weighting == "opt" or scoring) and 0 in tokenizers:
        pivot = tokenizers[0].get_vocab()
        cross = [sources[i].name for i, t in tokenizers.items() if i > 0 and t.get_vocab() != pivot]
        if cross and weighting == "opt":
            raise _cross_refusal(
                "The fusion weighting opt (it mixes the models' logits at every prompt position)",
                sources[0].name, cross, "use weighting sim, uniform or top1 with these models.",
            )
        if cross:
            raise _cross_refusal(
                f"Scoring every position of a text ({scoring})", sources[0].name, cross,
                _SCORING_INSTEAD,
            )
    models: list[Any] = []
    toks: list[Any] = []
    for i, src in enumerate(sources):
        if src.kind == "recipe":
            from .trial import load_recipe_model

            model, tok = load_recipe_model(src.location, device=device)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    src.location, trust_remote_code=False, use_safetensors=True, dtype=dtype
                )
            except (OSError, ValueError) as e:
                raise _hf_error(src.location, e) from None
            model, tok = model.to(device), tokenizers[i]
        models.append(model.eval())
        toks.append(tok)
    return models, toks


def load_fusion(
    path_or_dict: str | Path | dict, device: str | torch.device = "cpu",
    cross_tokenizer: bool | None = None, weighting: str | None = None, scoring: str | None = None,
) -> tuple[FusedLogitModel, Any]:
    """Build the FusedLogitModel of a fusion recipe (path or mapping); returns it and the tokenizer
    (the first model's: the fusion's pivot vocabulary).

    Every entry is checked (paths exist, merge recipes validate, tokenizers agree — unless the
    recipe or `cross_tokenizer=True` opts in to cross-tokenizer fusion) before any weights are
    loaded; a weight-merge recipe entry is merged in memory (a hybrid). `cross_tokenizer` and
    `weighting`, when given, replace the recipe's. `scoring` names what will score the fusion at
    every position of a text (e.g. "the eval spec's perplexity scorer 'wiki'"): a cross-tokenizer
    fusion cannot, and is refused before the weights load.
    """
    from .recipe import read_yaml

    if isinstance(path_or_dict, (str, Path)):
        where, base_dir = f"fusion recipe {path_or_dict}", Path(path_or_dict).parent
        data = read_yaml(path_or_dict, what="fusion recipe")
    else:
        where, base_dir, data = "fusion recipe", None, path_or_dict
    recipe = validate_fusion_recipe(data, where)
    sources = [_resolve_source(e.model, base_dir, where, i) for i, e in enumerate(recipe.models)]
    p = recipe.parameters
    cross = p.cross_tokenizer if cross_tokenizer is None else bool(cross_tokenizer)
    weighting = p.weighting if weighting is None else weighting
    _check_weighting(weighting)
    models, tokenizers = _load_sources(sources, where, device, cross, weighting, scoring)
    fused = FusedLogitModel(
        models, weighting, p.tau, p.grid_step, tokenizers=tokenizers, names=[s.name for s in sources],
        cross_tokenizer=cross,
    )
    return fused, tokenizers[0]


def load_models(
    names: Sequence[str], device: str | torch.device = "cpu", cross_tokenizer: bool = False,
    weighting: str = "sim",
) -> tuple[list[Any], list[Any]]:
    """Load models given by path, Hub id or weight-merge recipe file (the `fuse --models` list)."""
    sources = [_resolve_source(n, None, "--models list", i) for i, n in enumerate(names)]
    return _load_sources(sources, "--models list", device, cross_tokenizer, weighting)
