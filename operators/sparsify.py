"""Sparsification of task vectors: magnitude top-k, Bernoulli (DARE), breadcrumbs, DELLA.

Each routine reproduces mergekit's `sparsify.py` arithmetic in place (the caller owns the
tensor) and breaks magnitude ties by flat index. The random routines take a stream from
`operators.draws`: the counter-based stream (drawn on the compute device, exact L1 sums) or
mergekit's CPU generator (bit for bit mergekit's DARE on the CPU).
"""
from __future__ import annotations

from typing import Literal

import torch

from .draws import as_stream, exact_l1, rescale_factor

Method = Literal["magnitude", "bernoulli", "breadcrumbs", "della"]
RescaleMode = Literal["none", "l1", "inverse_density"]

# mergekit skips the L1 rescale when either norm is below this (sparsify.rescaled_masked_tensor).
_RESCALE_EPS = 1e-7

class one_thread:
    """Run torch ops on one intra-op thread inside the block (with OpenMP the setting belongs to
    the calling thread: other threads are unaffected). A whole-tensor reduction (sum, norm,
    dot) split across threads rounds differently for each thread count; on one thread its
    order is fixed by the tensor's length."""

    def __enter__(self):
        self._n = torch.get_num_threads()
        if self._n != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self._n != 1:
            torch.set_num_threads(self._n)
        return False


def serial_sum(t: torch.Tensor) -> torch.Tensor:
    """t.sum() on one intra-op thread, on the CPU: a summation order fixed by the length alone.

    A plain `.sum()` over a large tensor is split across the intra-op threads and the partial
    sums are combined per thread, so its rounding changes with the thread count (22345100 vs
    22345098 on 28M values with 1 and 2 threads). torch's serial sum (a cascade of vectorized
    partial sums) has one order, and it is what mergekit computes when it runs on one thread, so
    mergelab matches mergekit bit for bit there. A fixed-block float64 sum was tried too: as
    deterministic and as fast, but one ulp away from mergekit's on most tensors.
    """
    if t.device.type != "cpu":
        t = t.cpu()  # the same summation code whatever the compute device
    with one_thread():
        return t.sum()


def l1_norm(t: torch.Tensor) -> torch.Tensor:
    """Σ|t| as a scalar of t's dtype, bit-identical for any thread count (see `serial_sum`); `t` is
    read, not changed. The operators and the chunked kernels both take L1 norms through here."""
    return serial_sum(t.reshape(-1).abs())


def l1_norm_of_abs(a: torch.Tensor) -> torch.Tensor:
    """`l1_norm` of a tensor already holding magnitudes (no abs pass)."""
    return serial_sum(a.reshape(-1))


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened and sorted in descending order (stable), the precomputable form the
    in-memory trial merger may hand to operators as `MergeInputs.sorted_abs`."""
    return torch.sort(delta.abs().flatten(), descending=True, stable=True).values


class TopKRule:
    """The top-k mask of a flat magnitude tensor as a threshold rule: keep every entry above
    `threshold`, and of the entries equal to it the first `need` in flat order (the order a
    stable descending sort gives). Applied chunk by chunk in flat order (`mask_chunk`), it
    yields the same mask as on the whole tensor at once.
    """

    def __init__(self, threshold: torch.Tensor, need: int, n_equal: int):
        self.threshold = threshold
        self.need = need  # entries equal to the threshold that are kept (>= 1)
        self.partial = need < n_equal  # some equal entries are dropped: count them in order
        self._left = need

    def mask_chunk(self, abs_chunk: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of the next chunk (chunks must come in flat order, each exactly once)."""
        if not self.partial:
            return torch.ge(abs_chunk, self.threshold, out=out)
        keep = torch.gt(abs_chunk, self.threshold, out=out)
        if self._left > 0:
            tied = torch.nonzero(abs_chunk.reshape(-1) == self.threshold).squeeze(1)[: self._left]
            keep.view(-1)[tied] = True
            self._left -= len(tied)
        return keep


def _kth_smallest(t: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest value (1-based) of a flat tensor. On a GPU by a sort: torch.kthvalue
    runs one thread block per slice there, slow on one long slice; the value is the same."""
    if t.device.type == "cpu":
        return torch.kthvalue(t, j).values
    return torch.sort(t).values[j - 1]


def kth_largest(abs_flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest value v of the flat tensor (1 <= k <= n), exactly, in a few linear
    passes, with the number of entries above v and equal to v.

    A strided sample brackets v; the entries inside the bracket are counted and selected, and
    v is picked among them (the sample never decides the result, it only keeps the final
    selection small). Falls back to torch.kthvalue over everything when the bracket misses,
    and for small tensors. v is the value torch.kthvalue(abs_flat, n - k + 1) gives.
    """
    n = abs_flat.numel()
    if n > 1 << 17:
        sample = abs_flat[:: n // (1 << 16)]
        m = sample.numel()
        q = k / n
        margin = int(5 * (m * q * (1 - q)) ** 0.5) + 64
        pos = int(q * m)
        # the sample's (j+1)-th largest is its (m-j)-th smallest: two selections, no sort
        hi = _kth_smallest(sample, m - (pos - margin)) if pos - margin >= 0 else None
        lo = _kth_smallest(sample, m - (pos + margin)) if pos + margin < m else None
        band = None
        above = 0
        if hi is not None:
            band = abs_flat <= hi
            above = n - int(torch.count_nonzero(band))
        if lo is not None:
            band = (abs_flat >= lo) if band is None else band.logical_and_(abs_flat >= lo)
        inside = n - above if band is None else int(torch.count_nonzero(band))
        if above < k <= above + inside:
            cand = abs_flat if band is None else abs_flat[band]
            value = _kth_smallest(cand, inside - (k - above) + 1)
            # every entry equal to v lies inside the bracket
            return (value, above + int(torch.count_nonzero(cand > value)),
                    int(torch.count_nonzero(cand == value)))
    value = _kth_smallest(abs_flat, n - k + 1)
    return value, int(torch.count_nonzero(abs_flat > value)), int(torch.count_nonzero(abs_flat == value))


def top_k_rule(abs_flat: torch.Tensor, k: int, sorted_abs: torch.Tensor | None = None) -> TopKRule:
    """The rule of the k largest entries of `abs_flat` (1 <= k < n). With `sorted_abs`
    (descending) the threshold is read from it, without it is found by selection
    (`kth_largest`): the same value either way, hence the same mask bit for bit."""
    if sorted_abs is None:
        threshold, above, equal = kth_largest(abs_flat, k)
    else:
        threshold = sorted_abs[k - 1]
        above = int(torch.count_nonzero(abs_flat > threshold))
        equal = int(torch.count_nonzero(abs_flat == threshold))
    return TopKRule(threshold, k - above, equal)


def top_k_mask(abs_flat: torch.Tensor, k: int, sorted_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest entries of the flat tensor `abs_flat`.

    Entries equal to the threshold are kept in flat-index order until k are kept, which is the
    order a stable descending sort gives. With `sorted_abs` the threshold is read from it;
    without, it is found by selection (O(n)): the same value, hence the same mask, bit for bit.
    Everything after the threshold is a linear pass.
    """
    n = abs_flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=abs_flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=abs_flat.device)
    return top_k_rule(abs_flat, k, sorted_abs).mask_chunk(abs_flat)


def rank_range_mask(
    abs_flat: torch.Tensor, start: int, stop: int, sorted_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask of the entries whose descending-magnitude rank r satisfies start <= r < stop."""
    keep = top_k_mask(abs_flat, stop, sorted_abs)
    if start > 0:
        keep &= ~top_k_mask(abs_flat, start, sorted_abs)
    return keep


def apply_mask_(
    delta: torch.Tensor, mask: torch.Tensor, rescale: RescaleMode, density: float, exact: bool = False
) -> torch.Tensor:
    """delta *= mask, rescaled as asked; in place, returns delta.

    "l1" is mergekit's rescale: survivors are scaled so the L1 norm equals the original's,
    skipped when either norm is below 1e-7. "inverse_density" is the DARE paper's 1/density.
    The element operations are mergekit's (multiply by the 0/1 mask, then by before/after),
    so the values are the same bit for bit whenever the two norms round alike (mergekit's
    `.sum()` depends on the thread count; ours is a fixed-order sum, see `l1_norm`). With
    `exact` (the counter stream) the norms are `draws.exact_l1`'s fixed-point sums, computed on
    the device with no host sync: the same bits on every device and thread count.
    """
    if exact and rescale == "l1":
        factor = rescale_factor(exact_l1(delta), mask, _RESCALE_EPS)
        return delta.mul_(mask).mul_(factor)
    before = l1_norm(delta) if rescale == "l1" else None
    delta.mul_(mask)
    if rescale == "none":
        return delta
    if rescale == "inverse_density":
        return delta.div_(density)
    after = l1_norm(delta)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return delta
    return delta.mul_(before / after)


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
    delta: torch.Tensor, density: float, draws, rescale: RescaleMode = "l1"
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`. `draws`: a `draws` stream, or a
    torch.Generator (mergekit's stream)."""
    if density >= 1:
        return delta
    stream = as_stream(draws)
    mask = stream.keep_mask(delta.shape, density, delta.device)
    return apply_mask_(delta, mask, rescale, density, exact=stream.exact_sums)


def della_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    draws,
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
    stream = as_stream(draws)
    mask = stream.uniform(probs.shape, probs.device) < probs
    apply_mask_(work, mask, rescale, density, exact=stream.exact_sums)
    return delta
