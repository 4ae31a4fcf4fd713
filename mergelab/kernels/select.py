"""The one seam between an operator and how it runs on a tensor.

`run_job` picks, for one tensor, the first of the operator's declared kernels (`OperatorSpec.
kernels`) that suits where the merge runs (the disk engine or the trial merger's memory), the
device, the compute dtype and the operator's parameters, and that accepts the tensor; else the
operator's reference function (`OperatorSpec.fn`, any device). It returns which kernel ran. The
engine and the trial merger both merge through here; nothing else dispatches on operators.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from operators import KernelSpec, OperatorSpec, get_operator

from ..plan import MergePlan, TensorJob

REFERENCE = "reference"
COPY = "copy"


@dataclass
class KernelCall:
    """Everything a kernel may read for one tensor. `source`: a `engine.JobReader` (disk) or the
    `TrialMerger` (memory); `dest`: the model parameter a memory kernel may write into."""

    plan: MergePlan
    job: TensorJob
    where: Literal["disk", "memory"]
    device: torch.device
    compute_dtype: torch.dtype
    source: Any
    dest: torch.Tensor | None = None


@dataclass
class Merged:
    """A merged tensor and the kernel that made it; `out` is None when the kernel wrote the
    result straight into `KernelCall.dest`."""

    kernel: str
    out: torch.Tensor | None


Impl = Callable[[KernelCall], "torch.Tensor | None | bool"]
_IMPLS: dict[str, Impl] = {}


def _impl(path: str) -> Impl:
    fn = _IMPLS.get(path)
    if fn is None:
        module, name = path.split(":")
        fn = _IMPLS[path] = getattr(importlib.import_module(module), name)
    return fn


def applicable(spec: OperatorSpec, call: KernelCall) -> list[KernelSpec]:
    """The operator's kernels that suit this call's place, device, dtype and parameters, in order."""
    bi = call.plan.recipe.base_index
    mps = [mp for i, mp in enumerate(call.job.model_params) if i != bi]
    return [k for k in spec.kernels
            if k.where == call.where and call.device.type in k.devices and call.compute_dtype in k.compute_dtypes
            and (k.applies is None or k.applies(mps, call.job.params, call.plan.recipe.rng))]


def run_job(call: KernelCall) -> Merged:
    """Merge one tensor with the first kernel that takes it (see the module docstring). A kernel
    returns the merged tensor, True (written into `call.dest`) or None (declined)."""
    if call.job.copy:
        return Merged(COPY, _impl(f"mergelab.kernels.{call.where}:copy")(call))
    spec = get_operator(call.plan.recipe.merge_method)
    for k in applicable(spec, call):
        got = _impl(k.impl)(call)
        if got is True:
            return Merged(k.name, None)
        if got is not None:
            return Merged(k.name, got)
    return Merged(REFERENCE, _impl(f"mergelab.kernels.{call.where}:reference")(call))


@dataclass
class KernelCounts:
    """Tensors merged per kernel name."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
