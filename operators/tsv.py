"""`tsv`: Task Singular Vectors merging (TSV-Merge): each task vector of a weight matrix is
reduced to its top singular directions, and the directions of all tasks are decorrelated before
they are summed, so one task's update stops writing over another's.

For a weight matrix (2-D, not an embedding or output head) with task vectors τᵢ = θᵢ − base
(m × n, T of them):

    τᵢ ≈ Uᵢ Sᵢ Vᵢᵀ            the top r = ⌊min(m, n) / T⌋ singular triplets of τᵢ (at least 1)
    U = [U₁ … U_T], V = [V₁ … V_T]                    (m × Tr and n × Tr)
    U⊥ = polar(U), V⊥ = polar(V)                       (nearest matrices with orthonormal columns)
    θ = base + λ · U⊥ · diag(w₁S₁ … w_TS_T) · V⊥ᵀ

Everything else (norms, biases, embeddings, the output head) takes task arithmetic,
θ = base + λ Σ wᵢ τᵢ: an embedding is a lookup table whose rows do not interfere the way a
linear map's subspaces do, and its SVD (vocabulary × hidden) would cost more than the rest.

The merge is linear in the weights: θ = base + λ Σ wᵢ Mᵢ with Mᵢ = U⊥ᵢ Sᵢ V⊥ᵢᵀ (task i's columns
of U⊥ and rows of V⊥ᵀ). The Mᵢ depend only on the sources, so the trial merger keeps them per
matrix (built on the first candidate, as much memory as task arithmetic's task vectors) and a
candidate costs what a task-arithmetic candidate costs (mergelab.kernels.memory:tsv; it keeps
the task vectors of the other tensors too and adds them into the model's parameters).
"""
from __future__ import annotations

import torch

from .base import KernelSpec, MergeInputs, OperatorSpec, ParamSpec, register
from .checks import raise_if_invalid

# names of the tensors that stay task arithmetic: vocabulary tables (HF's usual names)
_TABLES = ("embed", "lm_head", "wte", "wpe", "embed_out", "output.weight")


def is_tsv_matrix(name: str, shape) -> bool:
    """Whether tensor `name` of `shape` is merged by TSV (else by task arithmetic)."""
    return len(shape) == 2 and min(shape) > 1 and not any(t in name for t in _TABLES)


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to x (x = P Σ Q → P Q)."""
    p, _, q = torch.linalg.svd(x, full_matrices=False)
    return p @ q


def tsv_parts(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each task's decorrelated part Mᵢ = U⊥ᵢ Sᵢ V⊥ᵢᵀ of one matrix (float32 whatever the
    deltas' dtype): the merge is base + λ Σ wᵢ Mᵢ, linear in the weights.

    Only singular directions with a non-zero singular value (above 1e-6 of the task's largest)
    take part: a task vector of lower rank than r (a LoRA fine-tune, a layer it left unchanged)
    would otherwise bring arbitrary null-space vectors into the orthogonalization and move the
    other tasks' directions."""
    m, n = deltas[0].shape
    r = max(1, min(m, n) // len(deltas))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
        k = int((s[:r] > s[0] * 1e-6).sum()) if s.numel() and s[0] > 0 else 0
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    if sum(x.numel() for x in ss) == 0:
        return [torch.zeros(m, n, dtype=torch.float32, device=deltas[0].device) for _ in deltas]
    u = _polar(torch.cat(us, dim=1))
    vh = _polar(torch.cat(vs, dim=0).T).T
    parts, at = [], 0
    for s in ss:
        k = s.numel()
        parts.append(((u[:, at:at + k] * s) @ vh[at:at + k]).contiguous())
        at += k
    return parts


def tsv_combine(base: torch.Tensor, parts: list[torch.Tensor], weights: list[float], lam: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """base + λw₁M₁ + λw₂M₂ + … in float32, added in model order into `out` (a float32 tensor
    of the shape, e.g. the model's parameter) or a new tensor: the one arithmetic of both paths."""
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
    out.copy_(base)
    for w, part in zip(weights, parts):
        out.add_(part, alpha=float(lam) * float(w))
    return out


def merge_parts(name: str, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """What tensor `name` adds up: the decorrelated parts of a weight matrix, else the task
    vectors themselves (task arithmetic), float32."""
    if is_tsv_matrix(name, deltas[0].shape):
        return tsv_parts(deltas)
    return [d.float() for d in deltas]


def tsv_merge(inp: MergeInputs) -> torch.Tensor:
    raise_if_invalid("tsv", inp.name, inp.model_params, inp.params, inp.base_index)
    base = inp.base if inp.base is not None else inp.models[inp.base_index]
    others = [i for i in range(len(inp.models)) if i != inp.base_index]
    if not others:
        return base.clone()
    ws = [float(inp.model_params[i]["weight"]) for i in others]
    lam = float(inp.params["lambda"])
    deltas = [inp.deltas[i] if inp.deltas is not None and inp.deltas[i] is not None else inp.models[i] - base
              for i in others]
    return tsv_combine(base, merge_parts(inp.name, deltas), ws, lam).to(base.dtype)


register(
    OperatorSpec(
        name="tsv",
        fn=tsv_merge,
        params=(
            ParamSpec(
                "weight", "model", 1.0, "float", search_range=(0.0, 2.0),
                help="Scale wᵢ of this model's singular values (its task vector's share).",
            ),
            ParamSpec(
                "lambda", "global", 1.0, "float", search_range=(0.5, 1.5),
                help="Scale λ of the merged task vector before it is added to the base.",
            ),
        ),
        summary=(
            "per weight matrix: τᵢ = θᵢ − base, top ⌊min(m,n)/T⌋ singular triplets of each, "
            "left and right vectors of all tasks orthogonalized (polar factor), "
            "θ = base + λ·U⊥ diag(wᵢSᵢ) V⊥ᵀ; embeddings, head, norms: base + λ Σ wᵢτᵢ"
        ),
        paper="Task Singular Vectors: Reducing Task Interference in Model Merging (arXiv 2412.00081)",
        needs_base=True,
        min_models=1,
        uses_deltas=True,
        keeps_derived=True,
        kernels=(KernelSpec("tsv", "mergelab.kernels.memory:tsv", "memory", devices=("cpu", "cuda")),),
    )
)
