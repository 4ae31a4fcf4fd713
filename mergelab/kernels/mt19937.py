"""torch's CPU generator stream, compiled: mergekit's DARE draws (`rng: mergekit`) as numbers or
as masks straight from the mt19937 state, with no float buffer and no torch draw, element for
element what a seeded `torch.Generator` gives float32 `uniform_`. `mt_matches` probes that
against this torch before any stream is used."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from . import jit_core


# torch's CPU generator is an mt19937 engine seeded with the low 32 bits of the seed; float32
# uniform_ takes one 32-bit output per element, keeps its low 24 bits and scales by 2^-24 (exact).
# These loops reproduce that stream, so DARE's masks need no float buffer and no torch draw;
# `mt_matches` checks them against this torch before they are used.
_MT_N = 624


def _mt_seed_py(seed, st):
    """init_genrand: the state of mt19937 seeded with a 32-bit value."""
    st[0] = np.uint32(seed)
    for j in range(1, _MT_N):
        p = st[j - 1]
        st[j] = np.uint32(1812433253) * (p ^ (p >> np.uint32(30))) + np.uint32(j)


def _mt_twist_py(st):
    """The next 624 words of state (three loops: each reads only words it may read, so each
    vectorizes)."""
    up = np.uint32(0x80000000)
    lo = np.uint32(0x7FFFFFFF)
    a = np.uint32(0x9908B0DF)
    one = np.uint32(1)
    z = np.uint32(0)
    for i in range(227):
        y = (st[i] & up) | (st[i + 1] & lo)
        st[i] = st[i + 397] ^ (y >> one) ^ ((z - (y & one)) & a)
    for i in range(227, 623):
        y = (st[i] & up) | (st[i + 1] & lo)
        st[i] = st[i - 227] ^ (y >> one) ^ ((z - (y & one)) & a)
    y = (st[623] & up) | (st[0] & lo)
    st[623] = st[396] ^ (y >> one) ^ ((z - (y & one)) & a)


def _mt_temper_py(st, out):
    """The 624 outputs of the current state, tempered, as float32 integers below 2^24 (their low
    24 bits, exact in float32)."""
    for k in range(_MT_N):
        y = st[k]
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        out[k] = np.float32(y & np.uint32(0xFFFFFF))


def _mt_draw_py(st, pos, t, mask, u, want_u):
    """The next len(mask) (or len(u)) float32 uniforms of the stream whose state is `st`, next
    word at `pos` (624: twist first): mask = u < t (uint8 0/1), and with `want_u` the uniforms
    themselves into u. Returns the new position. A state's outputs are tempered in one loop and
    consumed in another: each vectorizes."""
    n = u.shape[0] if want_u else mask.shape[0]
    scale = np.float32(1.0 / 16777216.0)
    tmp = np.empty(_MT_N, np.float32)
    if pos < _MT_N:
        _mt_temper(st, tmp)
    j = 0
    p = pos
    while j < n:
        if p == _MT_N:
            _mt_twist(st)
            _mt_temper(st, tmp)
            p = 0
        m = min(_MT_N - p, n - j)
        tb = tmp[p:p + m]
        if want_u:
            ub = u[j:j + m]
            for k in range(m):
                ub[k] = tb[k] * scale
        else:
            mb = mask[j:j + m]
            for k in range(m):
                mb[k] = np.uint8(1) if tb[k] * scale < t else np.uint8(0)
        j += m
        p += m
    return p


class Compiled(NamedTuple):
    """This module's compiled loops, by name (each the numba version of the `_mt_..._py` above)."""

    mt_seed: Any
    mt_draw: Any


@functools.cache
def compiled() -> Compiled:
    """The loops, compiled on first use (and cached on disk by numba)."""
    jit = jit_core.helpers().jit
    globals().update(_mt_twist=jit(_mt_twist_py), _mt_temper=jit(_mt_temper_py))
    return Compiled(mt_seed=jit(_mt_seed_py), mt_draw=jit(_mt_draw_py))


class MTStream:
    """The numbers a CPU `torch.Generator` seeded with `seed` gives to float32 `uniform_`, drawn by
    the compiled loop (element for element the same stream; see `mt_matches`)."""

    def __init__(self, seed: int):
        self.state = np.empty(_MT_N, np.uint32)
        compiled().mt_seed(np.uint32(seed & 0xFFFFFFFF), self.state)
        self.pos = _MT_N

    def mask_into(self, density: float, mask: torch.Tensor) -> torch.Tensor:
        """mask (flat bool) = the next mask.numel() uniforms < density, as torch.lt(u, density)."""
        self.pos = int(compiled().mt_draw(self.state, self.pos, np.float32(density), mask.view(torch.uint8).numpy(),
                                          _EMPTY_F32, False))
        return mask

    def copy(self) -> "MTStream":
        """An independent stream at this one's position (it draws the same numbers next)."""
        c = MTStream.__new__(MTStream)
        c.state = self.state.copy()
        c.pos = self.pos
        return c

    def uniform_into(self, out: torch.Tensor) -> torch.Tensor:
        """out (flat float32) = the next out.numel() uniforms, as out.uniform_(generator=g)."""
        self.pos = int(compiled().mt_draw(self.state, self.pos, np.float32(0), _EMPTY_U8, out.numpy(), True))
        return out


_EMPTY_F32 = np.empty(0, np.float32)


_EMPTY_U8 = np.empty(0, np.uint8)


def mt_matches() -> bool:
    """Whether `MTStream` gives this torch's CPU generator stream and torch.lt's masks, probed on
    seeds above 32 bits, lengths around the 624-word state and densities whose float32 rounding
    falls on either side of the 2^-24 grid of the uniforms."""
    return jit_core.AVAILABLE and _mt_probe()


@functools.cache
def _mt_probe() -> bool:
    for seed in (0, 5489, (1 << 62) + 987654321):
        g = torch.Generator()
        g.manual_seed(seed)
        s = MTStream(seed)
        for n, d in ((1, 0.5), (623, 0.6), (625, 0.5 + 0.3 / 2**24), (2000, 0.5 + 0.7 / 2**24), (1300, 0.1)):
            u = torch.empty(n).uniform_(generator=g)
            if n % 2:  # check both entry points; each continues the one stream
                got = s.uniform_into(torch.empty(n))
                if not torch.equal(got.view(torch.int32), u.view(torch.int32)):
                    return False
            else:
                if not torch.equal(s.mask_into(d, torch.empty(n, dtype=torch.bool)), torch.lt(u, d)):
                    return False
    return True


def mt_stream(seed: int) -> MTStream | None:
    """A compiled stream for `seed`, or None where the compiled loops are off or do not match."""
    return MTStream(seed) if mt_matches() else None
