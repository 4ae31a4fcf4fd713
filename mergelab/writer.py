"""Streaming safetensors writer: shard layout fixed up front from the plan, each tensor's bytes
written as it arrives, everything in a temporary sibling directory renamed into place at the end.

What a crash can leave, and who removes it: a merge writes into `.OUT.partial-PID` next to OUT
and makes it OUT with one rename (with --overwrite, one atomic exchange of the two directories
where the filesystem supports it, else OUT is renamed to `.OUT.old-PID` first). The next writer to
OUT removes the partial directories of processes that are gone, and puts a dead process's
`.OUT.old-PID` back as OUT when OUT is missing, so OUT is always either the old or the new model.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergelabError

log = logging.getLogger(__name__)
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


_LEFTOVER = r"^\.{name}\.(?P<kind>partial|old)-(?P<pid>\d+)$"
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid on a leftover means a previous process had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def recover_leftovers(out_dir: str | Path) -> list[str]:
    """Clean up after merges to OUT that were killed: remove their `.OUT.partial-PID` directories
    and, when OUT itself is missing, put back the `.OUT.old-PID` that a process renamed away and
    did not live to replace. Directories of live processes are left alone. Returns what was done."""
    out = Path(out_dir)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(_LEFTOVER.format(name=re.escape(out.name)))
    found = []
    for p in parent.iterdir():
        m = pattern.match(p.name)
        if m and not p.is_symlink() and p.is_dir() and not _pid_alive(int(m["pid"])):
            found.append((m["kind"], p))
    done = []
    for kind, p in sorted(found, key=lambda kp: kp[0] != "old"):  # restore before removing
        if kind == "old" and not out.exists():
            os.replace(p, out)
            done.append(f"restored {out} from {p.name} (a merge with --overwrite was killed mid-swap)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by a merge that was killed")
    return done


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out_dir: str | Path, total_bytes: int, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without --overwrite), that sits on a
    read-only or unwritable filesystem, or whose disk has less free space than the model needs."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergelabError(f"The output {out} is a file, not a directory. Choose a directory path for the merged model.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergelabError(
            f"The output directory {out} already exists and is not empty. Choose a new "
            "directory, or pass --overwrite to replace it."
        )
    where = _nearest_existing(out.parent)
    if not where.is_dir():
        raise MergelabError(f"Cannot create the output {out}: {where} is a file. Choose another output directory.")
    if not os.access(where, os.W_OK | os.X_OK):
        try:  # access() cannot tell a read-only filesystem from missing permission; statvfs can
            ro = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        why = "is on a read-only filesystem" if ro else "is not writable by you"
        raise MergelabError(
            f"Cannot write the merged model to {out}: {where} {why}. Nothing was written. "
            "Choose an output directory you can write to."
        )
    try:
        free = shutil.disk_usage(where).free
    except OSError:  # a filesystem that cannot say: the write itself will tell
        return
    if total_bytes > free:
        raise MergelabError(
            f"Not enough disk space for the merged model at {out}: it needs {total_bytes / 1e6:,.1f} MB, "
            f"the disk holding {where} has {free / 1e6:,.1f} MB free. Nothing was written. Free some "
            "space or choose an output directory on another disk, and run again."
        )


def disk_error(e: OSError, out: Path, tmp: Path, written: int, total: int) -> MergelabError:
    """One paragraph for an OSError while writing the output (the partial files are removed)."""
    what = f"after {written / 1e6:,.1f} of {total / 1e6:,.1f} MB" if total else ""
    if e.errno in _SPACE_ERRNOS:
        return MergelabError(
            f"The disk filled up while writing the merged model to {out} ({e.strerror}, {what}). "
            f"Nothing was written to {out} and the partial files in {tmp.name} were removed. Free at "
            f"least {total / 1e6:,.1f} MB or choose an output directory on another disk, and run again."
        )
    if e.errno in _ACCESS_ERRNOS:
        return MergelabError(
            f"Cannot write the merged model to {out}: {e.strerror} ({e.filename or tmp}). Nothing was "
            "written. Choose an output directory you can write to (not on a read-only filesystem)."
        )
    return MergelabError(
        f"Writing the merged model to {out} failed: {e.strerror or e} ({e.filename or tmp}, {what}). "
        f"Nothing was written to {out} and the partial files were removed. Check the disk and run again."
    )


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE). False when
    the platform or filesystem cannot; the caller then falls back to two renames."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class ShardWriter:
    """Write tensors in the announced order into shards of at most `shard_size` bytes.

    Because names, dtypes and shapes are known before the first tensor is merged, each shard's
    header is written when the shard is opened, and each tensor's bytes go straight to disk:
    the writer never holds more than the tensor it is given."""

    def __init__(self, out_dir: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_size: int = 5 * 10**9, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        try:
            for note in recover_leftovers(self.out_dir):
                log.info(note)
        except OSError as e:  # cleaning up is best effort; check_output below names a real problem
            log.warning(f"could not clean up earlier merges to {self.out_dir}: {e}")
        self.overwrite = overwrite
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        self._entries: list[_Entry] = []
        for name, dtype, shape in entries:
            self._entries.append(_Entry(name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize))
        self._by_name = {e.name: e for e in self._entries}
        self._layout(shard_size)
        self.total_bytes = sum(e.nbytes for e in self._entries)
        check_output(self.out_dir, self.total_bytes, overwrite)
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
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise disk_error(e, self.out_dir, self.tmp, 0, self.total_bytes) from None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the error that brought us here is the one to report
            self._file = None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if issubclass(exc_type, OSError) and not isinstance(exc, MergelabError):
                raise disk_error(exc, self.out_dir, self.tmp, self.bytes_written, self.total_bytes) from None
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
        self._publish()
        return self.out_dir

    def _publish(self) -> None:
        """Make the complete temporary directory OUT. With an old OUT, one atomic exchange where
        possible (after it the old model sits under the partial name and is removed; a kill
        there leaves a stale partial directory, never a missing OUT); else rename the old one
        away first, which `recover_leftovers` undoes if the process dies before the second rename."""
        if not self.out_dir.exists():
            os.replace(self.tmp, self.out_dir)
            return
        if _exchange(self.tmp, self.out_dir):
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
        os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)


def output_config(config: dict, out_dtype: torch.dtype | None, vocab_size: int | None) -> dict:
    cfg = json.loads(json.dumps(config))
    if out_dtype in _DTYPE_STR:
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = _DTYPE_STR[out_dtype]
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg
