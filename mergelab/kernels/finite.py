"""The non-finite check of merged tensors: every merged tensor is checked for inf/NaN on its
device. On the CPU each tensor is checked as it is made; on CUDA the per-tensor flags stay on
the device and are read once per `every` tensors (and at the end), so the check adds no host
sync per tensor."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import NonFiniteMergeError


class FiniteGuard:
    """Collects one device flag per merged tensor; `flush` raises NonFiniteMergeError naming the
    first tensor (in merge order) that holds inf or NaN."""

    def __init__(self, where: str, every: int = 64):
        self.where, self.every = where, every
        self._pending: list[tuple[str, dict, torch.Tensor]] = []  # name, params, device count

    def add(self, name: str, t: torch.Tensor, params: dict[str, Any]) -> None:
        if not t.is_floating_point() or t.numel() == 0:
            return
        if t.device.type == "cpu":
            # min and max in one read, no temporary: NaN propagates into both, ±inf shows in one
            lo, hi = torch.aminmax(t)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise NonFiniteMergeError(name, int((~torch.isfinite(t)).sum()), params, self.where)
            return
        # the count, not the tensor, is kept: a reused output buffer is overwritten by the next job
        self._pending.append((name, params, torch.isfinite(t).logical_not_().sum()))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Read the pending flags (one host sync) and raise for the first non-finite tensor."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        counts = torch.stack([c for _, _, c in pending]).tolist()
        for (name, params, _), count in zip(pending, counts):
            if count:
                raise NonFiniteMergeError(name, count, params, self.where)
