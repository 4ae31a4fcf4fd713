"""Compares mergelab's operators with mergekit's own merge-method implementations on random tensors,
and (with --recipes) whole recipes: `mergelab merge` against `mergekit-yaml` on a tiny bfloat16
Llama family (layer stacking, per-slice merges, the spherical methods, sce, written recipes).

Run with the mergekit environment: /opt/mk/bin/python benchmarks/mergekit_equivalence.py [--recipes]
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
    ("sce", "sce", [{}, {}, {}], {}),
    ("sce select_topk=0.3", "sce", [{}, {}, {}], {"select_topk": 0.3}),
    ("nuslerp (task vectors)", "nuslerp", [{"weight": 0.3}, {"weight": 0.9}], {}),
    ("nuslerp row_wise", "nuslerp", [{"weight": 0.6}, {"weight": 0.4}],
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp per row", "nuslerp", [{"weight": 0.6}, {"weight": 0.4}], {"nuslerp_flatten": False}),
    ("multislerp", "multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}),
    ("multislerp unnormalized", "multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.4}],
     {"normalize_weights": False}),
    ("karcher", "karcher", [{}, {}, {}], {}),
    ("karcher max_iter=3", "karcher", [{}, {}, {}], {"max_iter": 3}),
]


def _recipes(fam: Path) -> list[tuple[str, dict]]:
    base, a, b, c = (str(fam / n) for n in ("base", "a", "b", "c"))
    scale = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]
    return [
        ("passthrough, 2 slices", {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]}]}),
        ("passthrough, repeats + scale", {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": a, "layer_range": [1, 3]}], "parameters": {"scale": scale}},
            {"sources": [{"model": c, "layer_range": [2, 4]}]}]}),
        ("per-slice ties", {"merge_method": "ties", "base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]},
                         {"model": b, "layer_range": [0, 2]}], "parameters": {"density": 0.5}},
            {"sources": [{"model": base, "layer_range": [1, 4]}, {"model": b, "layer_range": [1, 4]},
                         {"model": c, "layer_range": [1, 4]}], "parameters": {"density": [0.3, 0.9]}}],
            "parameters": {"weight": 0.5}}),
        ("per-slice linear gradient", {"merge_method": "linear", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}],
             "parameters": {"weight": [0.2, 0.8]}}]}),
        ("sce", {"merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                 "parameters": {"select_topk": 0.5}}),
        ("nuslerp with base", {"merge_method": "nuslerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]}),
        ("nuslerp no base, row-wise", {"merge_method": "nuslerp", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
            "parameters": {"nuslerp_flatten": False}}),
        ("multislerp", {"merge_method": "multislerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.2}}]}),
        ("karcher", {"merge_method": "karcher", "base_model": base, "models": [{"model": a}, {"model": b}]}),
        ("task_arithmetic", {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.4}}]}),
    ]


def _load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _compare(x: dict, y: dict) -> tuple[str, float, int]:
    if set(x) != set(y):
        return f"names differ: {sorted(set(x) ^ set(y))[:3]}", float("nan"), -1
    if any(x[k].dtype != y[k].dtype or x[k].shape != y[k].shape for k in x):
        return "dtype/shape differ", float("nan"), -1
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    return "", worst, sum(int((x[k] != y[k]).sum()) for k in x)


def recipes_main(work: Path) -> None:
    """mergelab merge vs mergekit-yaml for each recipe. Two mergekit runs: the recipe as given
    (mergekit computes in the models' bfloat16; mergelab in float32) and the recipe mergelab
    wrote beside its output (dtype: float32, out_dtype: bfloat16 pinned)."""
    import json
    import shutil
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1]
    fam = work / "family"
    if not (fam / "c").is_dir():
        subprocess.run(["python3", "-c", (
            "import sys, torch; sys.path[:0] = [%r, %r]\n"
            "from conftest import make_llama\nfrom pathlib import Path\nr = Path(%r)\n"
            "b = make_llama(r / 'base', 0, layers=4, dtype=torch.bfloat16)\n"
            "for i, n in enumerate('abc'): make_llama(r / n, i + 1, layers=4, base=b, dtype=torch.bfloat16)\n"
        ) % (str(root), str(root / "tests"), str(fam))], check=True)
    mk = Path(sys.executable).parent / "mergekit-yaml"
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    print(f"{'recipe':30} {'as given: max|d|':>17} {'differ':>7} {'written: max|d|':>16} {'differ':>7} {'names/layers':>12}")
    for label, recipe in _recipes(fam):
        d = work / label.replace(" ", "_").replace(",", "").replace("+", "p")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "r.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        subprocess.run(["python3", "-m", "mergelab", "merge", str(d / "r.yml"), str(d / "lab"), "--quiet",
                        "--device", "cpu"], check=True, env=env)
        cols = []
        for name, rec in (("given", d / "r.yml"), ("written", d / "lab" / "mergelab_recipe.yaml")):
            subprocess.run([str(mk), str(rec), str(d / name), "--no-copy-tokenizer"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cols.append(_compare(_load(d / "lab"), _load(d / name)))
        lab_cfg = json.loads((d / "lab" / "config.json").read_text())
        mk_cfg = json.loads((d / "written" / "config.json").read_text())
        same_layers = lab_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]
        cells = []
        for why, worst, n in cols:
            cells += [f"{why or f'{worst:.3g}':>17}", f"{n:7d}"]
        print(f"{label:30} {cells[0]} {cells[1]} {cells[2]:>16} {cells[3]} {'same' if same_layers else 'DIFF':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="512x768,4096,1536x1024", help="comma-separated, e.g. 512x768,4096")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", action="store_true", help="compare whole recipes with mergekit-yaml instead")
    parser.add_argument("--work", default="/tmp/mergelab_mk_equivalence", help="work directory for --recipes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipes:
        recipes_main(Path(args.work))
        return
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
