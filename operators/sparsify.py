"""Sparsification of task vectors: magnitude top-k, Bernoulli (DARE), breadcrumbs, DELLA.

Each routine reproduces mergekit's `sparsify.py` arithmetic in place (the caller owns the
tensor), breaks magnitude ties by flat index and draws its randomness from a CPU generator.
"""
from __future__ import annotations

from typing import Literal

import torch

Method = Literal["magnitude", "bernoulli", "breadcrumbs", "della"]
RescaleMode = Literal["none", "l1", "inverse_density"]

# mergekit skips the L1 rescale when either norm is below this (sparsify.rescaled_masked_tensor).
_RESCALE_EPS = 1e-7


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened and sorted in descending order (stable), the precomputable form the
    in-memory trial merger may hand to operators as `MergeInputs.sorted_abs`."""
    return torch.sort(delta.abs().flatten(), descending=True, stable=True).values


def top_k_mask(abs_flat: torch.Tensor, k: int, sorted_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest entries of the flat tensor `abs_flat`.

    Entries equal to the threshold are kept in flat-index order until k are kept, which is the
    order a stable descending sort gives. With `sorted_abs` the threshold is read from it;
    without, it is found by selection (torch.kthvalue, O(n)): the same value, hence the same
    mask, bit for bit. Everything after the threshold is a linear pass.
    """
    n = abs_flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=abs_flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=abs_flat.device)
    if sorted_abs is not None:
        threshold = sorted_abs[k - 1]
    else:
        # kthvalue counts from the smallest: the k-th largest is the (n - k + 1)-th smallest.
        threshold = torch.kthvalue(abs_flat, n - k + 1).values
    keep = abs_flat > threshold
    need = k - int(torch.count_nonzero(keep))
    # The threshold itself is among the top k, so need >= 1: keep the first `need` entries
    # equal to it, in flat order (nonzero lists them in increasing index; usually just one).
    tied = torch.nonzero(abs_flat == threshold).squeeze(1)
    keep[tied[:need]] = True
    return keep


def rank_range_mask(
    abs_flat: torch.Tensor, start: int, stop: int, sorted_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask of the entries whose descending-magnitude rank r satisfies start <= r < stop."""
    keep = top_k_mask(abs_flat, stop, sorted_abs)
    if start > 0:
        keep &= ~top_k_mask(abs_flat, start, sorted_abs)
    return keep


def apply_mask_(
    delta: torch.Tensor, mask: torch.Tensor, rescale: RescaleMode, density: float
) -> torch.Tensor:
    """delta *= mask, rescaled as asked; in place, returns delta.

    "l1" is mergekit's rescale: survivors are scaled so the L1 norm equals the original's,
    skipped when either norm is below 1e-7. "inverse_density" is the DARE paper's 1/density.
    The element operations are mergekit's (multiply by the 0/1 mask, then by before/after),
    so the values are the same bit for bit.
    """
    before = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(mask)
    if rescale == "none":
        return delta
    if rescale == "inverse_density":
        return delta.div_(density)
    after = delta.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return delta
    return delta.mul_(before / after)


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so the numbers do not depend on the device; `rand(...) < p` consumes the
    # generator exactly like torch.bernoulli(p) on the CPU and gives the same mask.
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(device)


def magnitude_(
    delta: torch.Tensor,
    density: float,
    rescale: RescaleMode = "none",
    sorted_abs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the top k = max(1, int(density * numel)) entries by |delta| (mergekit's count)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = top_k_mask(delta.abs().flatten(), k, sorted_abs).view(delta.shape)
    return apply_mask_(delta, mask, rescale, density)


def breadcrumbs_(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    rescale: RescaleMode = "none",
    sorted_abs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop the largest int(gamma * n) entries (outliers), then the smallest, keeping
    int(density * n); the outlier cut shrinks when both together would pass n (mergekit)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    # mergekit keeps ascending positions [n_bottom, n_bottom + target); in descending ranks that
    # is [n - n_bottom - target, n - n_bottom).
    mask = rank_range_mask(delta.abs().flatten(), n - n_bottom - target, n - n_bottom, sorted_abs)
    return apply_mask_(delta, mask.view(delta.shape), rescale, density)


def bernoulli_(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: RescaleMode = "l1"
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    mask = _uniform(delta.shape, generator, delta.device) < density
    return apply_mask_(delta, mask, rescale, density)


def della_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: RescaleMode = "l1",
) -> torch.Tensor:
    """DELLA's MagPrune: along dim 1 (rows; a 1-D tensor is one row) rank entries by magnitude
    and keep each with probability density - epsilon + 2 * epsilon * rank / (row length - 1)."""
    if density >= 1:
        return delta
    work = delta
    while work.dim() < 2:
        work = work.unsqueeze(0)
    row = work.shape[1]
    order = torch.sort(work.abs(), dim=1, descending=True, stable=True).indices
    # rank 1 = smallest; the inverse permutation of the sort (mergekit: argsort of argsort).
    rank_values = torch.arange(row, 0, -1, device=work.device, dtype=torch.float32)
    view = [1] * work.dim()
    view[1] = row
    ranks = torch.empty(work.shape, dtype=torch.float32, device=work.device)
    ranks.scatter_(1, order, rank_values.view(view).expand(work.shape))
    if row > 1:
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    else:
        # mergekit divides 0 by 0 here and fails; a lone entry sits in the middle of its rank.
        rank_norm = torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    del order, ranks, rank_norm
    mask = _uniform(probs.shape, generator, probs.device) < probs
    apply_mask_(work, mask, rescale, density)
    return delta
