"""Streaming merge benchmark: `mergelab merge` against `mergekit-yaml` on the same recipes and the
same random-weight Llama family: wall time, peak resident / anonymous memory, bytes/s, output diff.

Run:  python3 benchmarks/bench_merge.py --mergekit /opt/mk/bin/mergekit-yaml [--scale-check]
Each tool runs in its own subprocess, one after the other, under `nice`. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OUT, Family, RunResult, compare_dirs, dir_bytes, machine_note, make_family, mb, run_measured,
    scaled_4x, shape_for, table, task_vector_stats, verdict, warm_page_cache,
)

# Targets from issue 2 (2-core CPU, side by side in one run).
SPEEDUP_TARGET = {"linear": 5.0, "ties": 5.0, "dare_ties": 3.0}
MEMORY_TARGET = 0.25  # mergelab peak RSS <= 1/4 of mergekit's
SEED = 0

WEIGHTS = (0.5, 0.3, 0.2)
DENSITIES = (0.5, 0.6, 0.7)


def recipe(method: str, fam: Family, recipe_dtype: str, out_dtype: str, density: float | None = None) -> dict:
    """One YAML both tools read. dtype is what mergekit computes in; mergelab always computes in
    float32 and writes out_dtype. With dtype float32 both compute in float32 and write out_dtype."""
    ft = [str(p) for p in fam.fine_tunes]
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(ft, WEIGHTS)]
        r = {"merge_method": "linear", "models": models}
    else:
        dens = [density] * len(ft) if density is not None else DENSITIES
        models = [{"model": m, "parameters": {"weight": w, "density": d}} for m, w, d in zip(ft, WEIGHTS, dens)]
        r = {"merge_method": method, "base_model": str(fam.base), "models": models}
        if method.startswith("dare"):
            r["seed"] = SEED  # mergelab's key; mergekit gets --random-seed instead (_for_mergekit)
    r["dtype"] = recipe_dtype
    if out_dtype != recipe_dtype:
        r["out_dtype"] = out_dtype
    return r


def _for_mergekit(r: dict) -> dict:
    # mergekit's MergeConfiguration rejects unknown keys, so the seed goes on its command line.
    return {k: v for k, v in r.items() if k != "seed"}


def run_mergelab(recipe_path: Path, out: Path, shard_bytes: int, log_dir: Path, tag: str, nice: int = 10) -> RunResult:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mergelab", "merge", str(recipe_path), str(out), "--quiet", "--device", "cpu",
           "--shard-size", str(shard_bytes)]
    return run_measured(cmd, log_path=log_dir / f"{tag}.log", nice=nice)


def run_mergekit(exe: str, recipe_path: Path, out: Path, shard_params: int, log_dir: Path, tag: str,
                 seed: int | None, nice: int = 10) -> RunResult:
    if out.exists():
        shutil.rmtree(out)
    cmd = [exe, str(recipe_path), str(out), "--quiet", "--out-shard-size", str(shard_params)]
    if seed is not None:
        cmd += ["--random-seed", str(seed)]
    return run_measured(cmd, log_path=log_dir / f"{tag}.log", nice=nice)


def _check(r: RunResult, what: str) -> None:
    if not r.ok:
        raise SystemExit(f"{what} failed (exit {r.rc}): {' '.join(r.cmd)}\n{r.stderr_tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="135M", help="model size preset: 135M (SmolLM-135M shapes), 40M, 10M")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml; without it only mergelab runs")
    ap.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"])
    ap.add_argument("--scale-check", action="store_true",
                    help="also merge a 4x larger family with mergelab and check peak anonymous memory growth")
    ap.add_argument("--scale-method", default="ties", help="method used for the scale check")
    ap.add_argument("--workdir", type=Path, default=OUT / "bench_merge")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    ap.add_argument("--dtype", default="float16", help="dtype of the random models and of the output")
    ap.add_argument("--recipe-dtype", default="float32",
                    help="the recipe's `dtype` (mergekit's compute dtype); default float32 with out_dtype=--dtype")
    ap.add_argument("--shard-params", type=int, default=100_000_000,
                    help="output shard size in parameters (mergekit's unit); mergelab gets the same in bytes")
    ap.add_argument("--no-dare-d1", action="store_true", help="skip the density-1.0 DARE agreement run")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the measured runs (shared machines)")
    args = ap.parse_args()

    work = args.workdir
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    elem = 2 if args.dtype in ("float16", "bfloat16") else 4
    shard_bytes = args.shard_params * elem
    shape = shape_for(args.size)
    t_start = time.perf_counter()
    print(f"bench_merge: {machine_note()}")
    print(f"family {args.size}: {shape}; {shape.n_params() / 1e6:.1f}M params, 1 base + 3 fine-tunes, {args.dtype}")
    fam = make_family(work, shape, dtype=args.dtype)
    warm_page_cache(fam.all_dirs)

    runs: dict[str, dict] = {}
    cases = [(m, None) for m in args.methods]
    if "dare_ties" in args.methods and args.mergekit and not args.no_dare_d1:
        cases.append(("dare_ties", 1.0))
    for method, density in cases:
        label = method if density is None else f"{method} d=1.0"
        tag = label.replace(" ", "_").replace("=", "")
        r = recipe(method, fam, args.recipe_dtype, args.dtype, density)
        rp = work / "recipes" / f"{tag}.yml"
        rp.write_text(yaml.safe_dump(r, sort_keys=False))
        out_lab = work / "merged" / f"mergelab_{tag}"
        print(f"\n[{label}] mergelab ...", flush=True)
        lab = run_mergelab(rp, out_lab, shard_bytes, work / "logs", f"mergelab_{tag}", args.nice)
        _check(lab, "mergelab merge")
        lab_bytes = dir_bytes(out_lab)
        entry = {"method": method, "density_override": density, "recipe": str(rp),
                 "mergelab": {**asdict(lab), "out_bytes": lab_bytes, "bytes_per_s": lab_bytes / lab.wall_s,
                              "shards": len(list(out_lab.glob("*.safetensors")))}}
        print(f"  mergelab: {lab.wall_s:.1f}s (CPU {lab.cpu_s:.1f}s), peak RSS {mb(lab.peak_rss)} MB, "
              f"peak anon {mb(lab.peak_anon)} MB, peak mapped-file {mb(lab.peak_file)} MB")
        if args.mergekit:
            rpk = work / "recipes" / f"{tag}.mergekit.yml"
            rpk.write_text(yaml.safe_dump(_for_mergekit(r), sort_keys=False))
            out_mk = work / "merged" / f"mergekit_{tag}"
            print(f"[{label}] mergekit ...", flush=True)
            mk = run_mergekit(args.mergekit, rpk, out_mk, args.shard_params, work / "logs", f"mergekit_{tag}",
                              SEED if method.startswith("dare") else None, args.nice)
            _check(mk, "mergekit-yaml")
            mk_bytes = dir_bytes(out_mk)
            print(f"  mergekit: {mk.wall_s:.1f}s (CPU {mk.cpu_s:.1f}s), peak RSS {mb(mk.peak_rss)} MB, "
                  f"peak anon {mb(mk.peak_anon)} MB, peak mapped-file {mb(mk.peak_file)} MB")
            cmp = compare_dirs(out_lab, out_mk)
            entry["mergekit"] = {**asdict(mk), "out_bytes": mk_bytes, "bytes_per_s": mk_bytes / mk.wall_s,
                                 "shards": len(list(out_mk.glob("*.safetensors")))}
            entry["compare"] = asdict(cmp)
            entry["speedup"] = mk.wall_s / lab.wall_s
            entry["cpu_speedup"] = mk.cpu_s / lab.cpu_s
            entry["rss_ratio"] = lab.peak_rss / mk.peak_rss
            entry["anon_ratio"] = lab.peak_anon / max(mk.peak_anon, 1)
            print(f"  outputs: {cmp.tensors} tensors compared, {cmp.summary()}")
            if method.startswith("dare") and density is None:
                s_lab, s_mk = task_vector_stats(out_lab, fam.base), task_vector_stats(out_mk, fam.base)
                entry["dare_stats"] = {"mergelab": asdict(s_lab), "mergekit": asdict(s_mk)}
            if not args.keep:
                shutil.rmtree(out_mk, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(out_lab, ignore_errors=True)
        runs[label] = entry

    report = {"size": args.size, "shape": asdict(shape), "n_params": shape.n_params(), "dtype": args.dtype,
              "recipe_dtype": args.recipe_dtype, "machine": machine_note(), "runs": runs}
    _print_tables(runs, bool(args.mergekit), fam)
    checks = _targets(runs) if args.mergekit else []

    if args.scale_check:
        report["scale_check"] = _scale_check(args, fam, runs, shard_bytes, work)
        checks.append(("scale", report["scale_check"]["pass"], report["scale_check"]["line"]))

    if checks:
        print("\nTargets")
        for _, ok, line in checks:
            print(f"{verdict(ok)}  {line}")
    report["checks"] = [{"name": n, "pass": ok, "line": line} for n, ok, line in checks]
    report["total_seconds"] = time.perf_counter() - t_start
    print(f"\ntotal {report['total_seconds']:.0f}s; machine now: {machine_note()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")


def _print_tables(runs: dict, with_mk: bool, fam: Family) -> None:
    rows = []
    for label, e in runs.items():
        lab = e["mergelab"]
        row = [label, f"{lab['wall_s']:.1f}", f"{lab['cpu_s']:.1f}", mb(lab["peak_rss"]), mb(lab["peak_anon"]),
               mb(lab["bytes_per_s"], 1)]
        if with_mk:
            mk = e["mergekit"]
            row += [f"{mk['wall_s']:.1f}", f"{mk['cpu_s']:.1f}", mb(mk["peak_rss"]), mb(mk["peak_anon"]),
                    mb(mk["bytes_per_s"], 1), f"{e['speedup']:.2f}x", f"{e['cpu_speedup']:.2f}x",
                    f"{e['rss_ratio']:.2f}", f"{e['compare']['max_abs_diff']:.3g}",
                    f"{100 * e['compare']['frac_different']:.3f}"]
        rows.append(row)
    header = ["method", "lab s", "lab CPU s", "lab RSS MB", "lab anon MB", "lab MB/s"]
    if with_mk:
        header += ["mk s", "mk CPU s", "mk RSS MB", "mk anon MB", "mk MB/s", "mk/lab wall", "mk/lab CPU",
                   "lab/mk RSS", "max|diff|", "% differ"]
    print(f"\nResults ({fam.shape.n_params() / 1e6:.1f}M params x 4 models, inputs {mb(fam.bytes_on_disk())} MB; "
          "lab = mergelab, mk = mergekit; RSS/anon are peaks)")
    print(table(rows, header))
    for label, e in runs.items():
        if "dare_stats" in e:
            a, b = e["dare_stats"]["mergelab"], e["dare_stats"]["mergekit"]
            print(f"\n{label}: DARE drops entries at random and the two tools draw from different random streams, "
                  "so entry-wise differences are expected; their statistics should agree:")
            print(table([["mergelab", f"{a['frac_equal_base']:.4f}", f"{a['mean_abs_tv']:.3e}", f"{a['mean_abs_tv_nonzero']:.3e}"],
                         ["mergekit", f"{b['frac_equal_base']:.4f}", f"{b['mean_abs_tv']:.3e}", f"{b['mean_abs_tv_nonzero']:.3e}"]],
                        ["tool", "frac == base", "mean |merged-base|", "mean over changed"]))
        if e["method"] == "ties" and e.get("density_override") is None and "compare" in e \
                and e["compare"]["max_abs_diff"] > 0:
            print(f"\n{label}: magnitude trimming keeps the top-k |task vector| entries; float16 inputs give many "
                  "equal magnitudes, and at the threshold mergelab keeps ties in index order while mergekit's "
                  "torch.argsort picks an unspecified order, so a few entries differ "
                  f"({100 * e['compare']['frac_different']:.4f}% here).")
        if e.get("density_override") == 1.0 and "compare" in e:
            print(f"\n{label}: with density 1.0 nothing is dropped, so the tools must agree: "
                  f"max |diff| = {e['compare']['max_abs_diff']:.3g} ({e['compare']['worst_tensor']})")


def _targets(runs: dict) -> list[tuple[str, bool, str]]:
    out = []
    for method, target in SPEEDUP_TARGET.items():
        if method not in runs:
            continue
        e = runs[method]
        out.append((f"speed {method}", e["speedup"] >= target,
                    f"{method}: mergelab {e['speedup']:.2f}x faster than mergekit (target >= {target:g}x; "
                    f"{e['mergelab']['wall_s']:.1f}s vs {e['mergekit']['wall_s']:.1f}s wall; CPU time ratio "
                    f"{e['cpu_speedup']:.2f}x)"))
    for method in SPEEDUP_TARGET:
        if method not in runs:
            continue
        e = runs[method]
        out.append((f"memory {method}", e["rss_ratio"] <= MEMORY_TARGET,
                    f"{method}: mergelab peak RSS {e['rss_ratio']:.2f} of mergekit's (target <= {MEMORY_TARGET}; "
                    f"{mb(e['mergelab']['peak_rss'])} MB vs {mb(e['mergekit']['peak_rss'])} MB)"))
    return out


def _scale_check(args, fam: Family, runs: dict, shard_bytes: int, work: Path) -> dict:
    """Peak anonymous memory of mergelab on a 4x larger family must grow by at most
    (largest tensor bytes) x (number of models + 2)."""
    method = args.scale_method
    big_shape = scaled_4x(fam.shape)
    print(f"\nScale check ({method}): 4x family {big_shape}; {big_shape.n_params() / 1e6:.1f}M params")
    big = make_family(work, big_shape, dtype=args.dtype)
    warm_page_cache(big.all_dirs)
    res = {}
    for name, f in (("small", fam), ("large", big)):
        if name == "small" and method in runs:
            res[name] = runs[method]["mergelab"]
            continue
        r = recipe(method, f, args.recipe_dtype, args.dtype)
        rp = work / "recipes" / f"scale_{name}_{method}.yml"
        rp.write_text(yaml.safe_dump(r, sort_keys=False))
        out = work / "merged" / f"scale_{name}"
        print(f"  mergelab {name} ...", flush=True)
        rr = run_mergelab(rp, out, shard_bytes, work / "logs", f"scale_{name}_{method}", args.nice)
        _check(rr, "mergelab merge")
        shutil.rmtree(out, ignore_errors=True)
        res[name] = asdict(rr)
    elem = 2 if args.dtype in ("float16", "bfloat16") else 4
    n_models = 1 + len(big.fine_tunes) if method != "linear" else len(big.fine_tunes)
    # The issue's bound names "the size of its largest tensor": as stored (args.dtype) is the strict
    # reading; the engine works on float32 copies, so the float32 size is printed alongside.
    largest = big_shape.largest_numel() * elem
    bound = largest * (n_models + 2)
    bound32 = big_shape.largest_numel() * 4 * (n_models + 2)
    growth = res["large"]["peak_anon"] - res["small"]["peak_anon"]
    ok = growth <= bound
    line = (f"scale: {fam.shape.n_params() / 1e6:.0f}M -> {big_shape.n_params() / 1e6:.0f}M params, mergelab {method} "
            f"peak anon {mb(res['small']['peak_anon'])} -> {mb(res['large']['peak_anon'])} MB (+{mb(growth)} MB); "
            f"bound = largest tensor {mb(largest)} MB ({args.dtype}) x ({n_models} models + 2) = {mb(bound)} MB "
            f"[with the float32 size: {mb(bound32)} MB, {verdict(growth <= bound32)}]")
    print(table([[n, mb(res[n]["peak_rss"]), mb(res[n]["peak_anon"]), f"{res[n]['wall_s']:.1f}"] for n in ("small", "large")],
                ["family", "peak RSS MB", "peak anon MB", "wall s"]))
    print(f"  {line}")
    return {"method": method, "large_shape": asdict(big_shape), "large_params": big_shape.n_params(),
            "small": res["small"], "large": res["large"], "growth": growth, "largest_tensor_bytes": largest,
            "n_models": n_models, "bound": bound, "bound_float32": bound32, "pass": ok,
            "pass_float32": growth <= bound32, "line": line}


if __name__ == "__main__":
    main()
