"""Per-candidate cost of a search step: in-memory trial merge (TrialMerger.apply) against merging the
same candidate to disk and loading it with transformers, and eval time per scorer on the family.

Run:  python3 benchmarks/bench_trial.py [--family mergelab/demo/family] [--random-size 135M]
Every candidate changes every parameter, so each one recomputes every tensor. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, REPO, machine_note, make_family, self_peak_rss, shape_for, table, verdict  # noqa: E402

METHODS = ("linear", "ties", "dare_ties")
TIES_OVER_LINEAR_TARGET = 3.0  # a TIES candidate costs at most 3x a linear one
DISK_OVER_MEMORY_TARGET = 10.0  # in-memory merge at least 10x faster than merge-to-disk + load


def candidate(method: str, base: str, fine_tunes: list[str], rng: random.Random, dtype: str) -> dict:
    """A recipe with fresh random values for every parameter (so no tensor can be skipped)."""
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": round(rng.uniform(0.1, 1.0), 6)}} for m in fine_tunes]
        return {"merge_method": "linear", "models": models, "dtype": dtype}
    models = [{"model": m, "parameters": {"weight": round(rng.uniform(0.1, 1.0), 6),
                                          "density": round(rng.uniform(0.2, 0.9), 6)}} for m in fine_tunes]
    r = {"merge_method": method, "base_model": base, "models": models, "dtype": dtype,
         "parameters": {"lambda": round(rng.uniform(0.5, 1.5), 6)}}
    if method.startswith("dare"):
        # one seed for every candidate, as a search uses (search/space.py sets the run's seed):
        # the trial merger then draws DARE's numbers once and each mask is a comparison
        r["seed"] = 1234
    return r


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    w, c = _clock()
    return w - t[0], c - t[1]


def bench_models(label: str, base: Path, fine_tunes: list[Path], *, n_candidates: int, dtype: str,
                 workdir: Path, seed: int = 0) -> dict:
    """Per method: first candidate (includes loading and caching), then n_candidates timed ones,
    then the last candidate merged to disk and loaded with transformers."""
    from transformers import AutoModelForCausalLM

    from mergelab.engine import merge_to_dir
    from mergelab.trial import TrialMerger

    rng = random.Random(seed)
    out: dict = {"label": label, "methods": {}}
    ft = [str(p) for p in fine_tunes]
    mergers: dict[str, TrialMerger] = {}
    for method in METHODS:
        key = "nobase" if method == "linear" else "base"
        if key not in mergers:
            mergers.clear()
            gc.collect()  # free the previous merger's caches before building the next
            mergers[key] = TrialMerger(None if method == "linear" else str(base), ft, device="cpu")
        tm = mergers[key]
        first = candidate(method, str(base), ft, rng, dtype)
        t = _clock()
        tm.apply(first)
        first_wall, first_cpu = _since(t)
        n_tensors = tm.last_stats.changed_tensors
        walls, cpus = [], []
        last = first
        for _ in range(n_candidates):
            last = candidate(method, str(base), ft, rng, dtype)
            t = _clock()
            tm.apply(last)
            w, c = _since(t)
            if tm.last_stats.changed_tensors != n_tensors:
                raise SystemExit(f"{label} {method}: candidate recomputed {tm.last_stats.changed_tensors} of "
                                 f"{n_tensors} tensors; every parameter changed, so all should be")
            walls.append(w)
            cpus.append(c)
        disk_dir = workdir / f"disk_{label}_{method}"
        t = _clock()
        merge_to_dir(last, disk_dir, device="cpu", quiet=True, overwrite=True)
        merge_wall, merge_cpu = _since(t)
        t = _clock()
        model = AutoModelForCausalLM.from_pretrained(disk_dir, dtype=torch.float32)
        load_wall, load_cpu = _since(t)
        # The disk model must be the in-memory one (TrialMerger's tests check this bit for bit).
        mem_params = dict(tm.model.named_parameters())
        worst = max((p.detach() - mem_params[k].detach()).abs().max().item()
                    for k, p in model.named_parameters())
        del model
        shutil.rmtree(disk_dir, ignore_errors=True)
        m = {
            "tensors": n_tensors,
            "first_candidate_s": first_wall, "first_candidate_cpu_s": first_cpu,
            "candidate_s": statistics.median(walls), "candidate_cpu_s": statistics.median(cpus),
            "candidate_s_all": walls, "candidate_cpu_s_all": cpus,
            "disk_merge_s": merge_wall, "disk_load_s": load_wall,
            "disk_s": merge_wall + load_wall, "disk_cpu_s": merge_cpu + load_cpu,
            "disk_vs_memory_max_abs_diff": worst,
        }
        m["disk_over_memory"] = m["disk_s"] / m["candidate_s"]
        m["disk_over_memory_cpu"] = m["disk_cpu_s"] / m["candidate_cpu_s"]
        out["methods"][method] = m
        print(f"  {label} {method}: first {first_wall:.2f}s, candidate {m['candidate_s']:.3f}s "
              f"(CPU {m['candidate_cpu_s']:.3f}s), disk merge {merge_wall:.2f}s + load {load_wall:.2f}s, "
              f"disk == memory: {worst == 0}", flush=True)
    mergers.clear()
    gc.collect()
    lin, ties = out["methods"]["linear"], out["methods"]["ties"]
    out["ties_over_linear"] = ties["candidate_s"] / lin["candidate_s"]
    out["ties_over_linear_cpu"] = ties["candidate_cpu_s"] / lin["candidate_cpu_s"]
    out["peak_rss_so_far"] = self_peak_rss()
    return out


def find_family(path: Path) -> tuple[Path, list[Path]] | None:
    """(base, fine-tunes) in a family folder: model directories, the one named 'base' first."""
    if not path.is_dir():
        return None
    dirs = sorted(d for d in path.iterdir() if (d / "config.json").is_file())
    base = next((d for d in dirs if d.name == "base"), None)
    if base is None or len(dirs) < 3:
        return None
    return base, [d for d in dirs if d != base]


def bench_eval(base: Path, fine_tunes: list[Path], data_dir: Path, dtype: str, limit: int | None) -> dict | str:
    """Seconds per scorer for one merged candidate, on every eval spec in data_dir."""
    try:
        from mergelab.eval import EvalSpec, Evaluator, HFLogitModel
    except ImportError as e:
        return f"the eval module is not importable ({e})"
    specs = sorted([*data_dir.glob("*.yml"), *data_dir.glob("*.yaml")]) if data_dir.is_dir() else []
    if not specs:
        return f"no eval spec (*.yml) in {data_dir}"
    from mergelab.trial import TrialMerger

    tm = TrialMerger(str(base), [str(p) for p in fine_tunes], device="cpu")
    r = candidate("ties", str(base), [str(p) for p in fine_tunes], random.Random(1), dtype)
    model = tm.apply(r)
    t = _clock()
    tm.apply(candidate("ties", str(base), [str(p) for p in fine_tunes], random.Random(2), dtype))
    merge_s = _since(t)[0]
    lm = HFLogitModel(model, tm.tokenizer)
    rows = {}
    for path in specs:
        spec = EvalSpec.load(path)
        if limit:
            spec = spec.with_limit(limit)
        ev = Evaluator(spec, tm.tokenizer, "cpu")
        ev.evaluate(lm)  # warm-up: first forward passes allocate
        res = ev.evaluate(lm)
        for s in spec.scorers:
            rows[f"{path.name}:{s.name}"] = {"type": s.type, "items": res.counts.get(s.name),
                                             "seconds": res.timings[s.name]}
        rows[f"{path.name}:total"] = {"type": "all", "items": sum(res.counts.values()), "seconds": res.timings["total"]}
    return {"ties_candidate_merge_s": merge_s, "scorers": rows}


RESIDENT_TARGET = 16.0  # bytes per parameter resident: base + 3 fine-tunes cached, eval model included
DARE_OVER_TIES_TARGET = 1.5  # a dare_ties candidate costs at most 1.5x a ties candidate


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def resident_child(size: str, dtype: str, cache: str, models_dir: Path, n_candidates: int) -> None:
    """One cache mode in a fresh process: resident bytes per parameter over the process's state
    before the merger (peak VmHWM and VmRSS after the candidates) and candidate seconds per method.
    Prints one JSON line."""
    from mergelab.trial import TrialMerger

    shape = shape_for(size)
    rf = make_family(models_dir, shape, dtype=dtype, log=lambda *a: None)
    base, fts = str(rf.base), [str(p) for p in rf.fine_tunes]
    gc.collect()
    rss0 = _vm_kb("VmRSS")
    # the peak before the merger: reset the high-water mark where the kernel lets us
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    hwm0 = _vm_kb("VmHWM")
    tm = TrialMerger(base, fts, device="cpu", cache=cache)
    rng = random.Random(0)
    out = {"cache": cache, "params": shape.n_params(), "dtype": dtype, "methods": {}}
    for method in ("ties", "dare_ties"):
        times = []
        for _ in range(n_candidates + 1):
            r = candidate(method, base, fts, rng, dtype)
            t = time.perf_counter()
            tm.apply(r)
            times.append(time.perf_counter() - t)
        out["methods"][method] = {"first_s": times[0], "candidate_s": statistics.median(times[1:]),
                                  "kernels": tm.last_stats.kernels}
    rss1, hwm1 = _vm_kb("VmRSS"), _vm_kb("VmHWM")
    n = shape.n_params()
    out["rss_bytes_per_param"] = (rss1 - rss0) * 1024 / n
    out["peak_bytes_per_param"] = (hwm1 - max(rss0, hwm0 if hwm0 <= rss0 else rss0)) * 1024 / n
    out["dare_over_ties"] = out["methods"]["dare_ties"]["candidate_s"] / out["methods"]["ties"]["candidate_s"]
    print("RESIDENT " + json.dumps(out), flush=True)


def bench_resident(size: str, dtype: str, models_dir: Path, n_candidates: int, threads: int) -> list[dict]:
    """`resident_child` for the compact and the fast cache, each in its own process."""
    import subprocess

    rows = []
    for cache in ("compact", "fast"):
        cmd = [sys.executable, __file__, "--resident-child", cache, "--random-size", size, "--dtype", dtype,
               "--models-dir", str(models_dir), "--candidates", str(n_candidates), "--threads", str(threads)]
        got = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in got.stdout.splitlines() if x.startswith("RESIDENT ")), None)
        if line is None:
            raise SystemExit(f"resident run ({cache}) failed:\n{got.stdout[-2000:]}\n{got.stderr[-2000:]}")
        rows.append(json.loads(line[len("RESIDENT "):]))
        r = rows[-1]
        print(f"  {size} {dtype} cache={cache}: resident {r['rss_bytes_per_param']:.1f} B/param (peak "
              f"{r['peak_bytes_per_param']:.1f}), ties {r['methods']['ties']['candidate_s']:.3f}s, dare_ties "
              f"{r['methods']['dare_ties']['candidate_s']:.3f}s ({r['dare_over_ties']:.2f}x)", flush=True)
    for r in rows:
        print(f"{verdict(r['peak_bytes_per_param'] <= RESIDENT_TARGET)}  cache={r['cache']}: peak resident "
              f"{r['peak_bytes_per_param']:.1f} bytes/parameter (target <= {RESIDENT_TARGET:g})")
        print(f"{verdict(r['dare_over_ties'] <= DARE_OVER_TIES_TARGET)}  cache={r['cache']}: dare_ties candidate "
              f"{r['dare_over_ties']:.2f}x a ties candidate (target <= {DARE_OVER_TIES_TARGET:g})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, default=REPO / "mergelab" / "demo" / "family",
                    help="bundled family folder (base + fine-tune model dirs)")
    ap.add_argument("--eval-data", type=Path, default=REPO / "mergelab" / "demo" / "data",
                    help="folder of the family's eval specs (*.yml)")
    ap.add_argument("--random-size", default="135M", help="random family size preset (135M, 40M, 10M) or 'none'")
    ap.add_argument("--candidates", type=int, default=3, help="timed candidates per method (median reported)")
    ap.add_argument("--eval-limit", type=int, default=None, help="cap items per scorer")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--workdir", type=Path, default=OUT / "bench_trial")
    ap.add_argument("--models-dir", type=Path, default=OUT / "bench_merge",
                    help="where random families are cached (shared with bench_merge)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--resident", action="store_true",
                    help="only the compact-vs-fast cache check: resident bytes/parameter and dare_ties/ties "
                    "candidate ratio on the random family (--dtype, default bfloat16)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the random family for --resident")
    ap.add_argument("--resident-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.resident_child:
        resident_child(args.random_size, args.dtype, args.resident_child, args.models_dir, args.candidates)
        return
    if args.resident:
        rows = bench_resident(args.random_size, args.dtype, args.models_dir, args.candidates, args.threads)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2))
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # from_pretrained's per-load bar would bury the figures
    args.workdir.mkdir(parents=True, exist_ok=True)
    from mergelab.kernels import jit_core

    compiled = "numba (mergelab[fast])" if jit_core.AVAILABLE else "off (torch kernels; numba missing or MERGELAB_JIT=0)"
    print(f"bench_trial: {machine_note()}, {args.threads} torch thread(s), compiled loops: {compiled}")
    report: dict = {"machine": machine_note(), "threads": args.threads, "compiled_loops": jit_core.AVAILABLE,
                    "sets": {}}

    fam = find_family(args.family)
    if fam is None:
        report["family"] = f"no bundled family at {args.family} (needs base/ and >= 2 fine-tune dirs)"
        print(report["family"])
    else:
        base, fts = fam
        print(f"family {args.family}: base {base.name}, fine-tunes {[p.name for p in fts]}")
        report["sets"]["family"] = bench_models("family", base, fts, n_candidates=max(args.candidates, 5),
                                                dtype=_dtype_of(base), workdir=args.workdir)
        report["eval"] = bench_eval(base, fts, args.eval_data, _dtype_of(base), args.eval_limit)
    if args.random_size != "none":
        shape = shape_for(args.random_size)
        rf = make_family(args.models_dir, shape, dtype="float16")
        print(f"random {args.random_size}: {shape.n_params() / 1e6:.1f}M params, base + 3 fine-tunes")
        report["sets"][f"random-{args.random_size}"] = bench_models(
            f"random-{args.random_size}", rf.base, rf.fine_tunes, n_candidates=args.candidates, dtype="float16",
            workdir=args.workdir)

    _print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")


def _dtype_of(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    return d if d in ("float16", "bfloat16", "float32") else "float16"


def _print(report: dict) -> None:
    rows = []
    for name, s in report["sets"].items():
        for method, m in s["methods"].items():
            rows.append([name, method, m["tensors"], f"{m['first_candidate_s']:.2f}", f"{m['candidate_s']:.3f}",
                         f"{m['candidate_cpu_s']:.3f}", f"{m['disk_merge_s']:.2f}", f"{m['disk_load_s']:.2f}",
                         f"{m['disk_over_memory']:.1f}x", f"{m['disk_over_memory_cpu']:.1f}x",
                         f"{m['disk_vs_memory_max_abs_diff']:.3g}"])
    print("\nPer-candidate cost (median over candidates; every parameter changed each time)")
    print(table(rows, ["models", "method", "tensors", "first s", "cand s", "cand CPU s", "disk merge s",
                       "load s", "disk/mem", "disk/mem CPU", "max|disk-mem|"]))
    ev = report.get("eval")
    if isinstance(ev, dict):
        print(f"\nEval time per scorer on the family (one ties candidate; its merge took "
              f"{ev['ties_candidate_merge_s']:.3f}s)")
        print(table([[k, v["type"], v["items"], f"{v['seconds']:.3f}"] for k, v in ev["scorers"].items()],
                    ["spec:scorer", "type", "items", "seconds"]))
    elif ev:
        print(f"\nEval: not measured: {ev}")
    print("\nTargets")
    for name, s in report["sets"].items():
        r = s["ties_over_linear"]
        print(f"{verdict(r <= TIES_OVER_LINEAR_TARGET)}  {name}: TIES candidate {r:.2f}x a linear candidate "
              f"(target <= {TIES_OVER_LINEAR_TARGET:g}x; CPU-time ratio {s['ties_over_linear_cpu']:.2f}x)")
        for method, m in s["methods"].items():
            print(f"{verdict(m['disk_over_memory'] >= DISK_OVER_MEMORY_TARGET)}  {name} {method}: in-memory merge "
                  f"{m['disk_over_memory']:.1f}x faster than merge-to-disk + load (target >= "
                  f"{DISK_OVER_MEMORY_TARGET:g}x; {m['candidate_s']:.3f}s vs {m['disk_s']:.2f}s; CPU-time ratio "
                  f"{m['disk_over_memory_cpu']:.1f}x)")


if __name__ == "__main__":
    main()
