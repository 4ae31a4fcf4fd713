"""Shared helpers for the merge benchmarks: random-weight Llama families written as safetensors,
subprocess runs with peak-memory sampling, safetensors directory comparison, and text tables."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"

# The same per-tensor scale for every model: weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.02); a
# fine-tune adds N(0, NOISE) so task vectors are small next to the weights, as in real ones.
WEIGHT_STD = 0.02
NOISE = 0.002


# -- model shapes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    def config(self):
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=2048, tie_word_embeddings=self.tied, bos_token_id=1, eos_token_id=2,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes exactly as transformers builds them (on the meta device: no memory)."""
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(self.config())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.tied:
            shapes.pop("lm_head.weight", None)  # saved once, as the embedding (like save_pretrained)
        return shapes

    def n_params(self) -> int:
        return sum(_numel(s) for s in self.tensor_shapes().values())

    def largest_numel(self) -> int:
        return max(_numel(s) for s in self.tensor_shapes().values())

    def key(self) -> str:
        return (f"h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"-v{self.vocab}{'-tied' if self.tied else ''}")


# SmolLM-135M's shapes, and two smaller ones for quick runs.
PRESETS = {
    "135M": LlamaShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152),
    "40M": LlamaShape(hidden=288, intermediate=768, layers=30, heads=9, kv_heads=3, vocab=49152),
    "10M": LlamaShape(hidden=256, intermediate=640, layers=8, heads=4, kv_heads=2, vocab=8192),
}


def shape_for(size: str) -> LlamaShape:
    if size in PRESETS:
        return PRESETS[size]
    raise SystemExit(f"unknown --size {size!r}; choose one of {', '.join(PRESETS)}")


def scaled_4x(s: LlamaShape) -> LlamaShape:
    """About 4x the parameters: twice as wide (hidden, intermediate, heads) and enough layers to
    reach 4x in total, so the largest tensor (the embedding) grows too."""
    wide = replace(s, hidden=2 * s.hidden, intermediate=2 * s.intermediate, heads=2 * s.heads,
                   kv_heads=2 * s.kv_heads, layers=1)
    target = 4 * s.n_params()
    one = wide.n_params()
    per_layer = replace(wide, layers=2).n_params() - one
    layers = max(1, round((target - (one - per_layer)) / per_layer))
    return replace(wide, layers=layers)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- random families ----------------------------------------------------------------------------
@dataclass
class Family:
    shape: LlamaShape
    root: Path
    base: Path
    fine_tunes: list[Path]
    dtype: str

    @property
    def all_dirs(self) -> list[Path]:
        return [self.base, *self.fine_tunes]

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for d in self.all_dirs for f in d.glob("*.safetensors"))


def make_family(workdir: Path, shape: LlamaShape, n_fine_tunes: int = 3, dtype: str = "float16",
                seed: int = 0, log=print) -> Family:
    """A base and `n_fine_tunes` 'fine-tunes' (base + small noise), cached under workdir by shape."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    root = Path(workdir) / "models" / f"{shape.key()}-{dtype}-s{seed}"
    names = ["base"] + [f"ft{i + 1}" for i in range(n_fine_tunes)]
    fam = Family(shape, root, root / "base", [root / n for n in names[1:]], dtype)
    shapes = shape.tensor_shapes()
    cfg = shape.config()
    cfg.dtype = dtype
    for i, name in enumerate(names):
        d = root / name
        marker = d / ".complete"
        if marker.is_file():
            continue
        t0 = time.perf_counter()
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        tensors: dict[str, torch.Tensor] = {}
        base_file = None if i == 0 else safe_open(root / "base" / "model.safetensors", framework="pt")
        for tname, tshape in shapes.items():
            if base_file is None:
                if tname.endswith("norm.weight"):
                    t = 1.0 + WEIGHT_STD * torch.randn(tshape, generator=gen)
                else:
                    t = WEIGHT_STD * torch.randn(tshape, generator=gen)
            else:
                t = base_file.get_tensor(tname).float() + NOISE * torch.randn(tshape, generator=gen)
            tensors[tname] = t.to(tdtype)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.to_json_file(str(d / "config.json"))
        marker.write_text(json.dumps({"shape": asdict(shape), "seed": seed, "dtype": dtype}))
        del tensors
        log(f"  made {d} ({shape.n_params() / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f}s")
    return fam


def warm_page_cache(paths: list[Path]) -> None:
    """Read the inputs once so every timed run starts from the same (cached) state."""
    for d in paths:
        for f in Path(d).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# -- measured subprocess runs -------------------------------------------------------------------
@dataclass
class RunResult:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_rss: int  # bytes, max of the kernel's VmHWM / ru_maxrss
    peak_anon: int  # bytes, max over samples of RssAnon summed over the process tree
    samples: int
    peak_file: int = 0  # bytes, max over samples of RssFile (mapped file pages, e.g. mmap'd safetensors)
    cpu_s: float = 0.0  # user + system CPU seconds of the process (and its reaped children)
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == 0


_KB = re.compile(r"^(\w+):\s+(\d+) kB", re.M)


def _status_kb(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return {k: int(v) for k, v in _KB.findall(text)}


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                try:
                    kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def run_measured(cmd: list[str], *, env: dict | None = None, interval: float = 0.01, nice: int = 10,
                 log_path: Path | None = None, timeout: float | None = None) -> RunResult:
    """Run `cmd` and measure wall time, peak resident memory and peak anonymous memory.

    Peak resident = max(VmHWM sampled, ru_maxrss from wait4) of the main process (the kernel's own
    high-water marks, exact); peak anonymous = largest sum of RssAnon over the process tree seen
    by sampling every `interval` s (anonymous memory = what the process allocated itself, not
    the page cache of memory-mapped files)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    err_path = (log_path.with_suffix(".stderr") if log_path else None)
    err = open(err_path, "wb") if err_path else subprocess.PIPE
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=err, preexec_fn=lambda: os.nice(nice))
    peak = {"anon": 0, "hwm": 0, "n": 0, "file": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon = mapped = 0
            for q in _tree(p.pid):
                st = _status_kb(q)
                anon += st.get("RssAnon", 0)
                mapped += st.get("RssFile", 0)
                if q == p.pid:
                    peak["hwm"] = max(peak["hwm"], st.get("VmHWM", 0))
            peak["anon"] = max(peak["anon"], anon)
            peak["file"] = max(peak["file"], mapped)
            peak["n"] += 1
            done.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    killer = None
    if timeout:
        killer = threading.Timer(timeout, p.kill)
        killer.start()
    _, status, ru = os.wait4(p.pid, 0)  # rusage of exactly this child: ru_maxrss is its peak RSS
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if killer:
        killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    tail = ""
    if err_path:
        err.close()
        tail = err_path.read_text(errors="replace")[-2000:]
    elif p.stderr is not None:
        tail = p.stderr.read().decode(errors="replace")[-2000:]
    if log_path:
        out.close()
    return RunResult(cmd=list(cmd), rc=p.returncode, wall_s=wall,
                     peak_rss=max(peak["hwm"], ru.ru_maxrss) * 1024, peak_anon=peak["anon"] * 1024,
                     samples=peak["n"], cpu_s=ru.ru_utime + ru.ru_stime, stderr_tail=tail,
                     peak_file=peak["file"] * 1024)


def self_peak_rss() -> int:
    """This process's peak resident memory so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- safetensors directories --------------------------------------------------------------------
def tensor_index(d: Path) -> dict[str, Path]:
    """tensor name -> file, for a single-file or sharded safetensors directory."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def iter_pairs(a: Path, b: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor in a, tensor in b) for the names both hold, one pair at a time."""
    from safetensors import safe_open

    ia, ib = tensor_index(a), tensor_index(b)
    handles: dict[Path, object] = {}

    def get(f, k):
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_tensor(k)

    for k in ia:
        if k in ib:
            yield k, get(ia[k], k), get(ib[k], k)


@dataclass
class Comparison:
    tensors: int
    only_a: list[str]
    only_b: list[str]
    max_abs_diff: float
    worst_tensor: str
    dtypes: str
    frac_different: float = 0.0  # fraction of all compared entries that are not exactly equal

    def summary(self) -> str:
        s = (f"max |a-b| = {self.max_abs_diff:.3g} ({self.worst_tensor}), "
             f"{100 * self.frac_different:.4f}% of entries differ")
        if self.only_a or self.only_b:
            s += f"; only in a: {self.only_a[:3]} only in b: {self.only_b[:3]}"
        return s


def compare_dirs(a: Path, b: Path) -> Comparison:
    ia, ib = tensor_index(a), tensor_index(b)
    worst, worst_name, n = 0.0, "", 0
    ndiff = ntot = 0
    dts = set()
    for k, x, y in iter_pairs(a, b):
        n += 1
        dts.add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            return Comparison(n, [], [], float("inf"), f"{k} shape {tuple(x.shape)} vs {tuple(y.shape)}", "")
        diff = (x.float() - y.float()).abs()
        d = diff.max().item() if x.numel() else 0.0
        ndiff += int((diff != 0).sum())
        ntot += diff.numel()
        if d > worst or not worst_name:
            worst, worst_name = d, k
    return Comparison(n, sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia)), worst, worst_name, ",".join(sorted(dts)),
                      ndiff / max(ntot, 1))


@dataclass
class SparsityStats:
    frac_equal_base: float  # fraction of entries equal to the base (in the output dtype)
    mean_abs_tv: float  # mean |merged - base| over all entries
    mean_abs_tv_nonzero: float  # mean |merged - base| over the entries that differ from the base


def task_vector_stats(merged: Path, base: Path) -> SparsityStats:
    """What a random sparsifier leaves: two outputs of the same DARE recipe, drawn from different
    random streams, agree in these statistics, not entry by entry."""
    eq = tot = 0
    s = 0.0
    for _, m, b in iter_pairs(merged, base):
        if m.shape != b.shape:  # a vocabulary pad; not expected for these families
            continue
        tv = m.float() - b.to(m.dtype).float()
        eq += int((tv == 0).sum())
        tot += tv.numel()
        s += float(tv.abs().double().sum())
    return SparsityStats(eq / max(tot, 1), s / max(tot, 1), s / max(tot - eq, 1))


def dir_bytes(d: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(d).glob(pattern))


# -- output -------------------------------------------------------------------------------------
def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def mb(n: float, digits: int = 0) -> str:
    return f"{n / 1e6:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine_note() -> str:
    try:
        load = os.getloadavg()
        load_s = f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    except OSError:
        load_s = "load unknown"
    return f"{os.cpu_count()} CPUs, {load_s}, torch {torch.__version__}"
