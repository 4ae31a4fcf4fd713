"""Random numbers and the reductions that feed a random operator's result, in two streams.

- `CounterStream` (the default, recipe `rng: counter`): the i-th number of a tensor is a keyed
  integer hash of (recipe seed, tensor name, i), computed with int32 torch operations. It is the
  same on the CPU and on CUDA, for any thread count and tensor order, is drawn on the compute
  device, and any slice of it can be computed alone. Its L1 norms (DARE/DELLA's rescale) are
  fixed-point integer sums (`exact_l1`): exact, so the order of the additions (threads, GPU
  blocks) cannot change them.
- `MergekitStream` (recipe `rng: mergekit`): torch's CPU mt19937 generator seeded per tensor and
  torch's one-thread float sums, which reproduce mergekit's DARE output on the CPU bit for bit.

Both hand out numbers in flat order: the rows of one tensor take consecutive stretches of one
stream, as a generator is consumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch

Rng = Literal["counter", "mergekit"]
RNGS: tuple[str, ...] = ("counter", "mergekit")

_M32 = 0xFFFFFFFF
# lowbias32's multipliers (Chris Wellons' hash-prospector), as signed int32: int32 products wrap
# modulo 2**32 on every torch backend, which is the unsigned product's low half.
_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)
_BITS = 24  # a draw is k / 2**24: exact in float32
# elements per hashing step: bounds the int32 temporaries (on the CPU, a step stays in the L2 cache)
_SPAN = {"cpu": 1 << 16}
_SPAN_DEVICE = 1 << 24


def _signed(v: int) -> int:
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's >> is arithmetic)."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, s), (1 << (32 - s)) - 1)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place: a bijection of 32-bit words with good avalanche."""
    x.bitwise_xor_(_shr(x, 16))
    x.mul_(_C1)
    x.bitwise_xor_(_shr(x, 15))
    x.mul_(_C2)
    x.bitwise_xor_(_shr(x, 16))
    return x


def counter_bits(key: int, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draws start..stop-1 of stream `key` as int32 values in [0, 2**24)."""
    k0, k1 = _signed(key), _signed(key >> 32)
    out = torch.empty(stop - start, dtype=torch.int32, device=device)
    span = _SPAN.get(torch.device(device).type, _SPAN_DEVICE)
    s = start
    while s < stop:
        hi = s >> 32
        e = min(stop, s + span, (hi + 1) << 32)  # a step never crosses a multiple of 2**32
        x = torch.arange(s - (hi << 32), e - (hi << 32), dtype=torch.int64, device=device).to(torch.int32)
        x.bitwise_xor_(k0)
        _mix_(x)
        x.bitwise_xor_(_signed(k1 + hi * 0x9E3779B9))
        _mix_(x)
        out[s - start: e - start] = _shr(x, 32 - _BITS)
        s = e
    return out


def keep_threshold(density: float) -> int:
    """Draws k with k < threshold are kept: k / 2**24 < density, exactly (density * 2**24 is exact
    in float64, so the comparison is the real-number one)."""
    import math

    return max(0, min(1 << _BITS, math.ceil(float(density) * (1 << _BITS))))


@dataclass
class CounterStream:
    """The counter-based stream of one tensor (see the module docstring)."""

    key: int
    position: int = 0
    exact_sums: bool = field(default=True, init=False)

    def _take(self, n: int, device) -> torch.Tensor:
        got = counter_bits(self.key, self.position, self.position + n, device)
        self.position += n
        return got

    def keep_mask(self, shape: torch.Size, density: float, device) -> torch.Tensor:
        """Boolean mask, True with probability `density` (DARE's Bernoulli draw)."""
        n = int(torch.Size(shape).numel())
        return torch.lt(self._take(n, device), keep_threshold(density)).view(shape)

    def uniform(self, shape: torch.Size, device) -> torch.Tensor:
        """float32 numbers k / 2**24 in [0, 1) (DELLA compares them with per-entry probabilities)."""
        n = int(torch.Size(shape).numel())
        return self._take(n, device).to(torch.float32).mul_(2.0 ** -_BITS).view(shape)


@dataclass
class MergekitStream:
    """torch's CPU generator, drawn on the CPU and moved to the device (mergekit's numbers)."""

    generator: torch.Generator
    exact_sums: bool = field(default=False, init=False)

    def uniform(self, shape: torch.Size, device) -> torch.Tensor:
        # `rand(...) < p` consumes the generator exactly like torch.bernoulli(p) on the CPU
        return torch.rand(shape, generator=self.generator, dtype=torch.float32).to(device)

    def keep_mask(self, shape: torch.Size, density: float, device) -> torch.Tensor:
        return self.uniform(shape, device) < density


Stream = Union[CounterStream, MergekitStream]


def make_stream(rng: str | None, key: int) -> Stream:
    """The stream of one tensor: `key` is `tensor_seed(recipe seed, tensor name)`."""
    if rng in (None, "counter"):
        return CounterStream(key)
    g = torch.Generator(device="cpu")
    g.manual_seed(key)
    return MergekitStream(g)


def as_stream(draws) -> Stream:
    """A stream from what a caller passes: a stream, or a bare torch.Generator (mergekit's)."""
    if isinstance(draws, torch.Generator):
        return MergekitStream(draws)
    return draws


# ---- exact L1 norms ------------------------------------------------------------------------------

def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float64 for an int64 tensor k in the normal range, built from its bits (exact on
    every device, unlike exp2)."""
    return torch.bitwise_left_shift(k + 1023, 52).view(torch.float64)


@dataclass(frozen=True)
class FixedL1:
    """Σ|t| as a fixed-point integer: `total` (int64 scalar tensor) units of 2**-`scale`, where
    scale (int64 scalar tensor) is set by the tensor's largest magnitude so no sum overflows. Every
    element is truncated to that grid, then the integers add exactly, in any order."""

    total: torch.Tensor
    scale: torch.Tensor
    units: torch.Tensor  # per element: |t| in grid units (int64), for masked sums of the same t

    def masked(self, mask: torch.Tensor) -> torch.Tensor:
        """Σ|t|·mask on the same grid (int64 scalar tensor)."""
        return torch.where(mask.reshape(-1), self.units, 0).sum()

    def value(self, total: torch.Tensor | None = None) -> torch.Tensor:
        """A grid sum as a float64 scalar tensor."""
        t = self.total if total is None else total
        return t.to(torch.float64) * _pow2(-self.scale)


def fixed_scale(amax: torch.Tensor, n: int) -> torch.Tensor:
    """The grid of `exact_l1` for n elements whose largest magnitude is amax (int64 scalar
    tensor): amax = f·2**e (f in [0.5, 1)) maps below 2**(62 - bits(n)), so n elements sum below
    2**62."""
    _, e = torch.frexp(amax.to(torch.float32))
    # a non-finite maximum gives a meaningless grid; the merged tensor is non-finite anyway and
    # the engine's finite check reports it
    return ((62 - n.bit_length()) - e.to(torch.int64)).clamp(-1000, 1000)


def exact_l1(t: torch.Tensor) -> FixedL1:
    """The fixed-point L1 norm of t (float32 or narrower; any device, no host sync): each |x| is
    truncated to the grid of `fixed_scale`, keeping 62 - bits(n) - (e - its exponent) bits."""
    a = t.reshape(-1).abs().to(torch.float32)
    n = a.numel()
    if n == 0:
        z = torch.zeros((), dtype=torch.int64, device=t.device)
        return FixedL1(z, z, torch.zeros(0, dtype=torch.int64, device=t.device))
    scale = fixed_scale(a.amax(), n)
    units = torch.floor(a.to(torch.float64).mul_(_pow2(scale))).to(torch.int64)
    return FixedL1(units.sum(), scale, units)


def factor_from_sums(total: torch.Tensor, after: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """‖t‖₁ / ‖t·mask‖₁ from the two grid sums, as a float32 scalar tensor; 1 where either norm is
    below `eps` (mergekit skips the rescale there). On the device, no host sync."""
    unit = _pow2(-scale)
    before_v, after_v = total.to(torch.float64) * unit, after.to(torch.float64) * unit
    ratio = total.to(torch.float64) / after.to(torch.float64).clamp(min=1)
    skip = (before_v < eps) | (after_v < eps)
    return torch.where(skip, torch.ones_like(ratio), ratio).to(torch.float32)


def rescale_factor(norms: FixedL1, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """`factor_from_sums` for a mask over the tensor `norms` was taken of."""
    return factor_from_sums(norms.total, norms.masked(mask), norms.scale, eps)
