"""mergelab on a GPU at real model sizes, side by side with mergekit and the I/O floor, in one run.

Steps (env STEPS, comma list; results in $OUT/results.json, written after every step):
  models  a synthetic Llama-shaped family made on the device (SIZE=1b: Llama-3.2-1B shapes, untied
          head, 1.50B parameters; 8b: Llama-3.1-8B shapes; tiny), bf16 safetensors, base + NFT fine-tunes
  floor   the I/O floor of a disk merge: bytes read and written over this machine's page-cache copy
          bandwidth, plus interpreter and import start-up
  merge   `mergelab merge --device DEV` and mergekit (`--cuda` on a GPU) when it runs here: wall, RSS
  trial   TrialMerger on DEV per method: first candidate, next candidates, peak GPU memory (bytes per
          parameter, eval model included), kernels that ran (TrialMerger.last_stats)
  equal   DEV output of each merge against the CPU's, tensor by tensor (a sample of tensors), and
          the trial merger's model against the disk merge
Then the ratios: mergekit / mergelab, mergelab / floor, dare_ties / ties candidate.

Run: SIZE=1b DEV=cuda python3 benchmarks/bench_gpu.py   (SIZE=tiny DEV=cpu runs anywhere in seconds)
Env: OUT (results folder), GW (work folder), MERGEKIT (command prefix for mergekit-yaml; default: the
importable mergekit), NFT (fine-tunes; 8b: 2), STEPS.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "bench_gpu_out"))
W = Path(os.environ.get("GW") or os.path.join(tempfile.gettempdir(), "bench_gpu_work"))
DEV = os.environ.get("DEV", "cuda")
SIZE = os.environ.get("SIZE", "1b")
NFT = int(os.environ.get("NFT", "2" if SIZE == "8b" else "3"))
STEPS = os.environ.get("STEPS", "models,floor,merge,trial,equal").split(",")
METHODS = os.environ.get("METHODS", "linear,ties,dare_ties").split(",")
PY = sys.executable
RES: dict = {"size": SIZE, "dev": DEV, "fine_tunes": NFT}


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(RES, indent=1, default=str))


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def timed(cmd: list[str], timeout: float) -> dict:
    """Run cmd in W; wall seconds, the child's peak RSS (MB), exit status, tail of its output."""
    t = time.perf_counter()
    with open(W / "cmd.log", "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=W)
        deadline = t + timeout
        while True:
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, st, ru = os.wait4(p.pid, 0)
                st = -9
                break
            time.sleep(0.02)
    tail = (W / "cmd.log").read_text()[-800:]
    return {"wall_s": round(time.perf_counter() - t, 2), "rss_mb": round(ru.ru_maxrss / 1024), "status": st,
            "tail": tail if st else tail[-160:]}


# ---- the family -----------------------------------------------------------------------------

def shapes() -> tuple[dict, dict]:
    H, I, L, V, nh, nkv = {  # Llama-3.2-1B, Llama-3.1-8B shapes (untied head); tiny for a smoke run
        "tiny": (64, 128, 2, 128, 4, 2), "1b": (2048, 8192, 16, 128256, 32, 8),
        "8b": (4096, 14336, 32, 128256, 32, 8)}[SIZE]
    hd = H // nh
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (nkv * hd, H),
              p + "self_attn.v_proj.weight": (nkv * hd, H), p + "self_attn.o_proj.weight": (H, H),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
              p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
              p + "post_attention_layernorm.weight": (H,)}
    cfg = json.loads((REPO / "mergelab/demo/family/base/config.json").read_text())
    cfg.update(hidden_size=H, intermediate_size=I, num_hidden_layers=L, vocab_size=V, num_attention_heads=nh,
               num_key_value_heads=nkv, head_dim=hd, torch_dtype="bfloat16", dtype="bfloat16",
               tie_word_embeddings=False, max_position_embeddings=2048)
    return s, cfg


def names() -> list[str]:
    return ["base"] + [f"ft{i}" for i in range(1, NFT + 1)]


def step_models() -> None:
    import torch
    from safetensors.torch import save_file

    s, cfg = shapes()
    dev = DEV if DEV == "cpu" or torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    t0 = time.perf_counter()
    RES["params"] = sum(int(torch.Size(sh).numel()) for sh in s.values())
    for k, name in enumerate(names()):
        d = W / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        sd = {}
        gb = torch.Generator(device=dev).manual_seed(0)  # the base's numbers again for each model
        for n, sh in s.items():
            x = torch.ones(sh, device=dev) if len(sh) == 1 else torch.randn(sh, device=dev, generator=gb) * 0.02
            if k:
                x += torch.randn(sh, device=dev, generator=g) * (0.002 if len(sh) > 1 else 0.01)
            sd[n] = x.to(torch.bfloat16).cpu()
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (REPO / "mergelab/demo/family/base" / f).exists():
                shutil.copy(REPO / "mergelab/demo/family/base" / f, d / f)
    RES["model_bytes"] = (W / "models/base/model.safetensors").stat().st_size
    RES["models_s"] = round(time.perf_counter() - t0, 1)
    log("models", RES["params"], "parameters", RES["model_bytes"] / 1e9, "GB each")


def recipe(method: str) -> dict:
    m = [str(W / "models" / n) for n in names()[1:]]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": x, "parameters": {"weight": 1.0}} for x in m],
                "dtype": "float32", "out_dtype": "bfloat16"}
    p = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
    r = {"merge_method": method, "base_model": str(W / "models/base"), "dtype": "float32", "out_dtype": "bfloat16",
         "models": [{"model": x, "parameters": dict(p)} for x in m]}
    if method.startswith("dare"):
        r["parameters"] = {"lambda": 1.0}
        r["seed"] = 7
    return r


# ---- the I/O floor ----------------------------------------------------------------------------

def step_floor() -> None:
    """Read every source once (warm page cache) and write one model's bytes: the copy bandwidth a
    merge cannot beat, measured here, plus the interpreter and import start-up a merge pays."""
    files = [W / "models" / n / "model.safetensors" for n in names()]
    buf = bytearray(64 << 20)
    for f in files:  # warm the page cache (a merge right after the models were written finds them there)
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass
    t = time.perf_counter()
    read = 0
    for f in files[1:] + files[:1]:
        with open(f, "rb", buffering=0) as h:
            while (k := h.readinto(buf)):
                read += k
    read_s = time.perf_counter() - t
    out = W / "floor.bin"
    t = time.perf_counter()
    with open(out, "wb", buffering=0) as h:
        left = RES["model_bytes"]
        while left > 0:
            left -= h.write(memoryview(buf)[: min(len(buf), left)])
    write_s = time.perf_counter() - t
    out.unlink()
    imports = "import torch, mergelab.engine, mergelab.cli" + ("; torch.cuda.init()" if DEV != "cpu" else "")
    start = min(timed([PY, "-c", imports], 120)["wall_s"] for _ in range(2))
    per_merge = {m: (NFT + (m != "linear")) * RES["model_bytes"] for m in METHODS}  # linear reads no base
    RES["floor"] = {"read_gb_s": round(read / read_s / 1e9, 2), "write_gb_s": round(RES["model_bytes"] / write_s / 1e9, 2),
                    "startup_s": start,
                    "merge_floor_s": {m: round(b / (read / read_s) + RES["model_bytes"] / (RES["model_bytes"] / write_s)
                                               + start, 2) for m, b in per_merge.items()}}
    log("floor", RES["floor"])


# ---- disk merges ------------------------------------------------------------------------------

def _mergekit_cmd() -> list[str] | None:
    if os.environ.get("MERGEKIT"):
        return shlex.split(os.environ["MERGEKIT"])
    probe = subprocess.run([PY, "-c", "import mergekit.scripts.run_yaml"], capture_output=True, env=env())
    if probe.returncode:
        return None
    return [PY, "-c", "from mergekit.scripts.run_yaml import main; main()"]


def step_merge() -> None:
    import yaml

    RES.setdefault("merge", {})
    mk = _mergekit_cmd()
    RES["mergekit"] = " ".join(mk) if mk else "not installed"
    for method in METHODS:
        rp = W / f"{method}.yml"
        rp.write_text(yaml.safe_dump(recipe(method)))
        out = W / "out" / f"mergelab-{DEV}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, "-m", "mergelab", "merge", str(rp), str(out), "--device", DEV, "--overwrite", "--quiet"]
        RES["merge"][f"mergelab/{DEV}/{method}"] = got = timed(cmd, 150)
        log("mergelab", DEV, method, got["wall_s"], "s", got["rss_mb"], "MB, status", got["status"])
        save()
        if mk is None:
            continue
        out = W / "out" / f"mergekit-{DEV}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = mk + [str(rp), str(out), "--allow-crimes", "--copy-tokenizer", "--random-seed", "7"]
        cmd += ["--cuda"] if DEV != "cpu" else []
        RES["merge"][f"mergekit/{DEV}/{method}"] = got = timed(cmd, 150)
        log("mergekit", DEV, method, got["wall_s"], "s", got["rss_mb"], "MB, status", got["status"])
        shutil.rmtree(out, ignore_errors=True)  # the disk holds a few models only
        save()


# ---- trial candidates -------------------------------------------------------------------------

def step_trial() -> None:
    import random

    import torch

    sys.path.insert(0, str(REPO))
    from mergelab.trial import TrialMerger

    RES.setdefault("trial", {})
    base = str(W / "models/base")
    fts = [str(W / "models" / n) for n in names()[1:]]
    rng = random.Random(0)
    cuda = DEV != "cpu"
    for method in METHODS:
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            tm = TrialMerger(None if method == "linear" else base, fts, device=DEV)
            times, stats = [], []
            for _ in range(4):
                r = recipe(method)
                for mm in r["models"]:
                    mm["parameters"]["weight"] = round(rng.uniform(0.1, 1.0), 4)
                    if "density" in mm["parameters"]:
                        mm["parameters"]["density"] = round(rng.uniform(0.2, 0.9), 4)
                t = time.perf_counter()
                tm.apply(r)
                if cuda:
                    torch.cuda.synchronize()
                times.append(round(time.perf_counter() - t, 3))
                stats.append(asdict(tm.last_stats))
            peak = torch.cuda.max_memory_allocated() if cuda else None
            nxt = sorted(times[1:])
            RES["trial"][method] = {"first_s": times[0], "next_s": times[1:], "median_next_s": nxt[len(nxt) // 2],
                                    "setup_s": round(time.perf_counter() - t0, 2),
                                    "peak_gib": round(peak / 2**30, 2) if peak else None,
                                    "peak_bytes_per_param": round(peak / RES["params"], 2) if peak else None,
                                    "last_stats": stats[-1]}
            log("trial", method, times, "peak GiB", RES["trial"][method]["peak_gib"], stats[-1]["kernels"])
            del tm
        except Exception as e:  # noqa: BLE001  (a failed method is a result too)
            RES["trial"][method] = {"error": repr(e)[:800]}
            log("trial", method, "error", repr(e)[:300])
        save()


# ---- equality ---------------------------------------------------------------------------------

def step_equal() -> None:
    """DEV's disk output against the CPU's on a sample of tensors (every kind: attention, MLP,
    norm, the smaller of the vocabulary tensors at tiny sizes), computed by the engine on the CPU."""
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(REPO))
    from mergelab.kernels import inputs as kinputs
    from mergelab.engine import JobReader, compute_job, prepare

    RES.setdefault("equal", {})
    for method in METHODS:
        out = W / "out" / f"mergelab-{DEV}-{method}"
        if not out.exists():
            continue
        plan, sources = prepare(recipe(method))
        pick = [j for j in plan.jobs if j.name.startswith("model.layers.0.") or j.name == "model.norm.weight"]
        if SIZE == "tiny":
            pick = plan.jobs
        worst, unequal, total = 0.0, 0, 0
        ws = kinputs.Workspace()
        with safe_open(str(out / "model.safetensors"), "pt") if (out / "model.safetensors").exists() else \
                _open_sharded(out) as h:
            for job in pick:
                cpu = compute_job(job, JobReader(job, sources, ws), plan, torch.device("cpu")).out
                dev = h.get_tensor(job.name)
                diff = (cpu.float() - dev.float()).abs()
                worst = max(worst, float(diff.max()))
                unequal += int((cpu.view(torch.int16) != dev.view(torch.int16)).sum())
                total += cpu.numel()
        RES["equal"][method] = {"tensors": len(pick), "elements": total, "unequal": unequal, "max_abs": worst}
        log("equal", method, RES["equal"][method])
        save()
    if DEV != "cpu":  # the random operators straight, counter stream, on both devices
        from operators import MergeInputs, get_operator

        g = torch.Generator().manual_seed(0)
        base = torch.randn(1031, 2053, generator=g) * 0.02
        models = [base + torch.randn(base.shape, generator=g) * 0.002 for _ in range(NFT)]
        for op in ("dare_ties", "dare_linear", "della", "della_linear", "ties"):
            spec = get_operator(op)
            params = {p.name: p.default for p in spec.params if p.scope == "global"} | {"rescale": True}
            mps = [{p.name: p.default for p in spec.params if p.scope == "model"} | {"weight": 0.7, "density": 0.4,
                                                                                     "epsilon": 0.1}
                   for _ in models]
            outs = [spec.fn(MergeInputs(name="x", base=base.to(d), models=[m.to(d) for m in models],
                                        model_params=mps, params=params, seed=3)).cpu() for d in ("cpu", DEV)]
            RES["equal"][f"operator {op}"] = {"unequal": int((outs[0] != outs[1]).sum()), "elements": outs[0].numel(),
                                              "max_abs": float((outs[0] - outs[1]).abs().max())}
        log("equal operators", {k: v["unequal"] for k, v in RES["equal"].items() if k.startswith("operator")})
        save()


class _open_sharded:
    """safe_open over a sharded output folder (get_tensor by name)."""

    def __init__(self, d: Path):
        idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        self.d, self.idx = d, idx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_tensor(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self.d / self.idx[name]), "pt") as h:
            return h.get_tensor(name)


# ---- ratios -----------------------------------------------------------------------------------

def ratios() -> dict:
    out: dict = {}
    merge, floor, trial = RES.get("merge", {}), RES.get("floor", {}), RES.get("trial", {})
    for m in METHODS:
        lab, mk = merge.get(f"mergelab/{DEV}/{m}"), merge.get(f"mergekit/{DEV}/{m}")
        if lab and not lab["status"]:
            if mk and not mk["status"]:
                out[f"merge {m}: mergekit / mergelab (target >= 3)"] = round(mk["wall_s"] / lab["wall_s"], 2)
            if floor:
                out[f"merge {m}: mergelab / I/O floor (target <= 2)"] = round(lab["wall_s"] / floor["merge_floor_s"][m], 2)
    t = {m: trial[m].get("median_next_s") for m in METHODS if m in trial}
    if t.get("ties") and t.get("dare_ties"):
        out["trial dare_ties / ties candidate (target <= 1.5)"] = round(t["dare_ties"] / t["ties"], 2)
    for m, v in t.items():
        if v is not None:
            out[f"trial {m} candidate s"] = v
    return out


def main() -> None:
    W.mkdir(parents=True, exist_ok=True)
    import torch

    RES["torch"] = torch.__version__
    RES["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    save()
    for s in STEPS:
        t = time.perf_counter()
        try:
            globals()[f"step_{s}"]()
        except Exception:  # noqa: BLE001  (the next steps still run; the error is a result)
            import traceback

            RES[f"{s}_error"] = traceback.format_exc()[-1500:]
            log(s, "FAILED", RES[f"{s}_error"][-300:])
        RES.setdefault("step_s", {})[s] = round(time.perf_counter() - t, 1)
        RES["ratios"] = ratios()
        save()
    print(json.dumps(RES["ratios"], indent=1))


if __name__ == "__main__":
    main()
