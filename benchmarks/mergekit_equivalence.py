"""Compares mergelab's operators with mergekit's own merge-method implementations on random tensors.

Run with the mergekit environment: /opt/mk/bin/python benchmarks/mergekit_equivalence.py
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit.merge_methods.api import merge_tensors  # noqa: E402

from operators import MergeInputs, get_operator, tensor_seed  # noqa: E402

SEED = 7


def _gaussian_family(shape, n_models: int, gen: torch.Generator, scale: float = 0.02):
    """Realistic: θᵢ = base + 0.02·N(0, 1) in float32. Rounding makes some |θᵢ − base| equal,
    and where such a tie straddles a magnitude threshold mergekit's unstable argsort keeps an
    arbitrary one of the tied entries while mergelab keeps the lowest flat index."""
    base = torch.randn(shape, generator=gen)
    models = [base + scale * torch.randn(shape, generator=gen) for _ in range(n_models)]
    return base, models


def _distinct_family(shape, n_models: int, gen: torch.Generator):
    """Tie-free: base on a 2⁻⁸ grid in [-2, 2), task vectors a random permutation of distinct
    multiples of 2⁻²² with random signs; base + τ and (base + τ) − base are exact in float32,
    so every magnitude order is unique and both libraries must agree entry for entry."""
    n = math.prod(shape)
    base = (torch.randint(-512, 512, shape, generator=gen).float()) / 256
    models = []
    for _ in range(n_models):
        mags = (torch.randperm(n, generator=gen).float() + 1) * 2.0**-22
        signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        models.append(base + (mags * signs).view(shape))
    return base, models


def _mergekit(method: str, name: str, base, models, model_params, params, base_listed: bool):
    """mergekit's result: inputs are the models plus the base, parameters keyed by input id.

    For random methods the global RNG is seeded with mergelab's per-tensor seed, so mergekit's
    torch.bernoulli draws (CPU, in model order) are the very numbers mergelab draws."""
    ids = [f"m{i}" for i in range(len(models))]
    tensors = list(models)
    if base_listed:
        tensors = [base] + tensors
        ids = ["base"] + ids
    mk_params: dict = dict(params)
    for key in model_params[0]:
        values = {f"m{i}": mp[key] for i, mp in enumerate(model_params)}
        if method == "linear" and base_listed:
            values["base"] = params.get("base_weight", 1.0)
        mk_params[key] = values
    mk_params.pop("base_weight", None)
    torch.manual_seed(tensor_seed(SEED, name))
    return merge_tensors(
        tensors, method, parameters=mk_params, ids=ids, base_index=0 if base_listed else None, name=name
    )


def _mergelab(method: str, name: str, base, models, model_params, params, with_precompute: bool):
    spec = get_operator(method)
    resolved = {p.name: p.default for p in spec.params if p.scope == "global"}
    resolved.update({k: v for k, v in params.items() if k != "base_weight"})
    defaults = {p.name: p.default for p in spec.params if p.scope == "model"}
    mps = [{**defaults, **mp} for mp in model_params]
    all_models = [base] + list(models)
    base_mp = {**defaults, "weight": params.get("base_weight", 1.0)}
    mps = [base_mp] + mps
    deltas = sorted_abs = None
    if with_precompute:
        deltas = [None] + [m - base for m in models]
        sorted_abs = [None] + [torch.sort(d.abs().flatten(), descending=True, stable=True).values for d in deltas[1:]]
    inp = MergeInputs(
        name=name, base=base, models=all_models, model_params=mps, params=resolved, seed=SEED,
        base_index=0, deltas=deltas, sorted_abs=sorted_abs, rng="mergekit",  # mergekit's stream
    )
    return spec.fn(inp)


def _straddling_ties(method: str, base, models, model_params) -> torch.Tensor:
    """Mask of entries where some model's |τ| equals a magnitude that straddles its keep
    boundary (the same value both kept and dropped): there the choice is arbitrary in mergekit."""
    out = torch.zeros(base.shape, dtype=torch.bool)
    if method not in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        return out
    for m, mp in zip(models, model_params):
        tau = (m - base).abs()
        n = tau.numel()
        density = mp["density"]
        if density >= 1:
            continue
        values = torch.sort(tau.flatten(), descending=True).values
        if method == "ties":
            bounds = [max(1, int(density * n))]
        else:
            target, n_top = int(density * n), int(mp["gamma"] * n)
            n_bottom = max(0, n - target - n_top)
            bounds = [n - n_bottom - target, n - n_bottom]
        for b in bounds:
            if 0 < b < n and values[b - 1] == values[b]:
                out |= tau == values[b]
    return out


CASES = [
    # (label, method, per-model params (one dict per non-base model), global params)
    ("linear", "linear", [{"weight": 0.3}, {"weight": -0.2}, {"weight": 0.9}], {"base_weight": 0.5}),
    ("linear normalize=false", "linear", [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}],
     {"base_weight": 0.1, "normalize": False}),
    ("task_arithmetic", "task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}, {"weight": -0.3}], {"lambda": 0.8}),
    ("task_arithmetic normalize", "task_arithmetic", [{"weight": 0.7}, {"weight": 0.4}, {"weight": 0.3}],
     {"normalize": True}),
    ("ties", "ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.5},
                      {"weight": 0.5, "density": 0.7}], {"lambda": 1.3}),
    ("ties rescale", "ties", [{"weight": 0.7, "density": 0.2}, {"weight": 0.4, "density": 0.9},
                             {"weight": 0.5, "density": 1.0}], {"rescale": True}),
    ("dare_linear", "dare_linear", [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.5},
                                    {"weight": 0.5, "density": 0.9}], {}),
    ("dare_ties", "dare_ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.5},
                                {"weight": 0.5, "density": 0.9}], {"lambda": 1.1}),
    ("dare_ties rescale=false", "dare_ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.5},
                                              {"weight": 0.5, "density": 0.9}], {"rescale": False}),
    ("breadcrumbs", "breadcrumbs", [{"weight": 0.7, "density": 0.5, "gamma": 0.05},
                                    {"weight": 0.4, "density": 0.9, "gamma": 0.2},
                                    {"weight": 0.5, "density": 0.3, "gamma": 0.01}], {}),
    ("breadcrumbs_ties", "breadcrumbs_ties", [{"weight": 0.7, "density": 0.5, "gamma": 0.05},
                                              {"weight": 0.4, "density": 0.6, "gamma": 0.02},
                                              {"weight": 0.5, "density": 0.3, "gamma": 0.01}], {"normalize": True}),
    ("della", "della", [{"weight": 0.7, "density": 0.5, "epsilon": 0.1},
                        {"weight": 0.4, "density": 0.3, "epsilon": 0.2},
                        {"weight": 0.5, "density": 0.8, "epsilon": 0.15}], {}),
    ("della_linear", "della_linear", [{"weight": 0.7, "density": 0.5, "epsilon": 0.1},
                                      {"weight": 0.4, "density": 0.3, "epsilon": 0.2},
                                      {"weight": 0.5, "density": 0.8, "epsilon": 0.15}], {"lambda": 0.9}),
    ("ties, 5 models", "ties", [{"weight": 0.1 * (i + 1), "density": 0.2 + 0.15 * i} for i in range(5)], {}),
    ("dare_ties, 5 models", "dare_ties", [{"weight": 0.3, "density": 0.2 + 0.15 * i} for i in range(5)], {}),
    ("slerp t=0.3", "slerp", [{}], {"t": 0.3}),
    ("model_stock", "model_stock", [{}, {}, {}], {}),
    ("model_stock filter_wise", "model_stock", [{}, {}, {}], {"filter_wise": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="512x768,4096,1536x1024", help="comma-separated, e.g. 512x768,4096")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    total = sum(math.prod(s) for s in shapes)

    print(f"torch {torch.__version__}, threads {args.threads}, shapes {args.shapes} ({total} entries per model)")
    print("distinct: tie-free magnitudes; gaussian: base + 0.02·N(0,1), float32 (magnitude ties occur);")
    print("'differ' = entries where the two results are not bit-equal, 'by ties' = how many of them sit where")
    print("a magnitude tie straddles a keep boundary (mergekit's unstable argsort picks any); 'pre' = precomputed deltas/sorted_abs")
    print("vs plain path; times: operator call only, gaussian data, summed over shapes.\n")
    header = (
        f"{'method':26} {'distinct max|d|':>15} {'gaussian max|d|':>15} {'differ':>7} "
        f"{'by ties':>7} {'pre=plain':>9} {'mergelab s':>10} {'mergekit s':>10}"
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(1234)
    data = {
        "distinct": {shape: _distinct_family(shape, 5, gen) for shape in shapes},
        "gaussian": {shape: _gaussian_family(shape, 5, gen) for shape in shapes},
    }
    for label, method, model_params, params in CASES:
        worst = {"distinct": 0.0, "gaussian": 0.0}
        differ = explained = 0
        pre_equal = True
        t_lab = t_mk = 0.0
        for kind, families in data.items():
            for shape, (base, models) in families.items():
                models = models[: len(model_params)]
                name = f"model.layers.0.{'x'.join(map(str, shape))}.weight"
                t0 = time.perf_counter()
                ours = _mergelab(method, name, base, models, model_params, params, with_precompute=False)
                t1 = time.perf_counter()
                theirs = _mergekit(method, name, base, models, model_params, params, base_listed=True)
                t2 = time.perf_counter()
                pre = _mergelab(method, name, base, models, model_params, params, with_precompute=True)
                worst[kind] = max(worst[kind], (ours - theirs).abs().max().item())
                pre_equal &= torch.equal(ours, pre)
                if kind == "gaussian":
                    t_lab += t1 - t0
                    t_mk += t2 - t1
                    bad = ours != theirs
                    differ += int(bad.sum())
                    explained += int((bad & _straddling_ties(method, base, models, model_params)).sum())
        print(
            f"{label:26} {worst['distinct']:15.3g} {worst['gaussian']:15.3g} {differ:7d} {explained:7d} "
            f"{'yes' if pre_equal else 'NO':>9} {t_lab:10.3f} {t_mk:10.3f}"
        )


if __name__ == "__main__":
    main()
