"""Streaming safetensors writer: shard layout fixed up front from the plan, each tensor's bytes
written as it arrives, everything in a temporary sibling directory renamed into place at the end."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergelabError
from .plan import DTYPES
from .sources import _ST_DTYPES

# the inverses of the tables the reader and the planner use, so the three never disagree
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_DTYPE_STR = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    begin: int = 0


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5G', '123' -> bytes (decimal units like mergekit; GiB/MiB binary)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            num = s[: -len(u)]
            try:
                v = int(float(num) * units[u])
            except ValueError:
                break
            if v <= 0:
                break
            return v
    try:
        v = int(s)
        if v > 0:
            return v
    except ValueError:
        pass
    raise MergelabError(f"--shard-size `{text}` is not a size. Use bytes or a unit, e.g. 5GB, 500MB, 2GiB.")


def shard_layout(sizes: list[int], shard_size: int) -> list[tuple[int, int]]:
    """(shard, byte offset in the shard) of each tensor written in order: a new shard starts when
    the next tensor would overflow a non-empty one (a tensor larger than shard_size gets its own)."""
    out, shard, used = [], 0, 0
    for n in sizes:
        if used and used + n > shard_size:
            shard, used = shard + 1, 0
        out.append((shard, used))
        used += n
    return out


class ShardWriter:
    """Write tensors in the announced order into shards of at most `shard_size` bytes.

    Because names, dtypes and shapes are known before the first tensor is merged, each shard's
    header is written when the shard is opened, and each tensor's bytes go straight to disk:
    the writer never holds more than the tensor it is given."""

    def __init__(self, out_dir: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_size: int = 5 * 10**9, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise MergelabError(
                f"The output directory {self.out_dir} already exists and is not empty. Choose a new "
                "directory, or pass --overwrite to replace it."
            )
        self.overwrite = overwrite
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        self._entries: list[_Entry] = []
        for name, dtype, shape in entries:
            self._entries.append(_Entry(name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize))
        self._by_name = {e.name: e for e in self._entries}
        self._layout(shard_size)
        self._pos = 0
        self._file = None
        self._open_shard = -1
        self.bytes_written = 0

    def _layout(self, shard_size: int) -> None:
        for e, (shard, begin) in zip(self._entries, shard_layout([e.nbytes for e in self._entries], shard_size)):
            e.shard, e.begin = shard, begin
        self.n_shards = self._entries[-1].shard + 1 if self._entries else 0

    def shard_name(self, i: int) -> str:
        if self.n_shards == 1:
            return "model.safetensors"
        return f"model-{i + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def __enter__(self):
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _start_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header = {"__metadata__": {"format": "pt"}}
        for e in self._entries:
            if e.shard == i:
                header[e.name] = {"dtype": _ST_NAMES[e.dtype], "shape": list(e.shape),
                                  "data_offsets": [e.begin, e.begin + e.nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.tmp / self.shard_name(i), "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._open_shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self._entries[self._pos]
        if e.name != name:
            raise RuntimeError(f"writer expected tensor {e.name}, got {name}")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"tensor {name}: got {tensor.dtype}{tuple(tensor.shape)}, announced {e.dtype}{e.shape}")
        if e.shard != self._open_shard:
            self._start_shard(e.shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self.bytes_written += e.nbytes
        self._pos += 1

    def finish(self, extra_files: dict[str, bytes | str] | None = None, copy_files: list[Path] | None = None) -> Path:
        if self._pos != len(self._entries):
            raise RuntimeError(f"writer got {self._pos} of {len(self._entries)} tensors")
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.n_shards > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in self._entries)},
                "weight_map": {e.name: self.shard_name(e.shard) for e in sorted(self._entries, key=lambda e: e.name)},
            }
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in copy_files or []:
            shutil.copy2(f, self.tmp / f.name)
        for name, content in (extra_files or {}).items():
            p = self.tmp / name
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        # make it durable before it becomes visible under its final name
        for p in self.tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir


def output_config(config: dict, out_dtype: torch.dtype | None, vocab_size: int | None) -> dict:
    cfg = json.loads(json.dumps(config))
    if out_dtype in _DTYPE_STR:
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = _DTYPE_STR[out_dtype]
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg
