"""Model sources: a local directory or a Hugging Face repo id, read one tensor (or a slice of one)
at a time from safetensors files (single file or sharded) with positioned reads, never loaded whole."""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergelabError, name_list

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
# files a merge needs; nothing else is downloaded
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # byte offset of the tensor's data in `file`

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header and the byte offset where the data section starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise MergelabError(f"{path} is not a valid safetensors file (bad header length).")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergelabError(f"{path} is not a valid safetensors file (unreadable header: {e}).") from None
    if not isinstance(header, dict):
        raise MergelabError(f"{path} is not a valid safetensors file (its header is not a JSON object).")
    return header, 8 + n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bfloat16 included),
    for positioned reads and writes without an extra copy."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def resolve_local_path(ref: str, *, download: bool = True) -> Path:
    """A local directory for `ref`: the directory itself, or a hub snapshot (fetched with
    huggingface_hub, honouring HF_HOME, HF_TOKEN and HF_HUB_OFFLINE)."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MergelabError(
                f"Model `{ref}` is a file, not a model directory. Point at the directory that "
                "holds config.json and the *.safetensors weights."
            )
        return p
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise MergelabError(
            f"Model `{ref}` is neither an existing directory nor a Hugging Face repo id "
            "(`org/name` or `org/name@revision`). Check the path (relative to "
            f"{Path.cwd()}) or the repo id."
        )
    if not download:
        return p
    repo, _, revision = ref.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=HUB_PATTERNS)
        )
    except LocalEntryNotFoundError:
        raise MergelabError(
            f"Model `{ref}` is not in the local Hugging Face cache and cannot be downloaded "
            "(offline: HF_HUB_OFFLINE is set or there is no network). Download it once with "
            "network access, or point at a local directory."
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise MergelabError(
            f"Could not fetch model `{ref}` from the Hugging Face Hub (HTTP {status}). Check the "
            "repo id and revision; for gated or private repos set HF_TOKEN or run `hf auth login`."
        ) from None


class ModelSource:
    """One model's tensors, read lazily. Thread-safe for concurrent `get` calls."""

    def __init__(self, ref: str, path: Path):
        self.ref = ref
        self.path = path
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = self._index()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, ref: str) -> "ModelSource":
        return cls(ref, resolve_local_path(ref))

    # -- metadata ------------------------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MergelabError(
                f"Model `{self.ref}` ({self.path}) has no config.json, so it is not a Hugging Face "
                "model directory. Point at the directory saved with `save_pretrained`."
            )
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergelabError(f"{cfg} is not valid JSON ({e}). Fix or re-save the model.") from None
        if not isinstance(config, dict):
            raise MergelabError(f"{cfg} is not a model config: expected a JSON object, got "
                                f"{type(config).__name__}. Fix or re-save the model.")
        return config

    def _index(self) -> dict[str, TensorInfo]:
        idx = self.path / "model.safetensors.index.json"
        files: list[Path]
        if idx.is_file():
            try:
                files = sorted({self.path / f for f in json.loads(idx.read_text())["weight_map"].values()})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise MergelabError(f"{idx} is not a valid safetensors index ({e}).") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MergelabError(
                    f"Model `{self.ref}`: the index names shards that are missing: "
                    f"{name_list(missing)}. Re-download or re-save the model."
                )
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                p.name for p in self.path.glob("*.pt")
            )
            if bins:
                raise MergelabError(
                    f"Model `{self.ref}` ({self.path}) has only pickle checkpoints "
                    f"({name_list(bins, 3)}), which mergelab does not read because loading pickles "
                    "can run arbitrary code. Convert it once to safetensors, e.g. "
                    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                    "safe_serialization=True)` with a transformers version you trust."
                )
            raise MergelabError(
                f"Model `{self.ref}` ({self.path}) has no *.safetensors weights. Point at a "
                "directory saved with `save_pretrained(..., safe_serialization=True)`."
            )
        out: dict[str, TensorInfo] = {}
        for f in files:
            header, data_start = _read_header(f)
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise MergelabError(
                        f"{f}: the header entry of tensor {name} lacks a valid dtype, shape or "
                        "data_offsets. The file is corrupt; re-download or re-save it."
                    ) from None
                dtype = _ST_DTYPES.get(dtype_name)
                if dtype is None:
                    raise MergelabError(
                        f"{f}: tensor {name} has dtype {dtype_name}, which mergelab cannot merge."
                    )
                info = TensorInfo(str(f), dtype, shape, data_start + begin)
                if end - begin != info.nbytes or data_start + end > size:
                    raise MergelabError(
                        f"{f}: tensor {name} has data offsets {begin}..{end}, which do not match its "
                        f"shape {list(info.shape)} and dtype {meta['dtype']} or run past the end of "
                        "the file. The file is truncated or corrupt; re-download or re-save it."
                    )
                out[name] = info
        return out

    @property
    def num_layers(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        return None

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", False)))

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    # -- data ----------------------------------------------------------------------------------
    # Positioned reads (os.preadv) into caller buffers instead of memory-mapping: the page cache
    # holds the file, not this process, so resident memory stays at the buffers actually used,
    # and concurrent reads from several threads need no lock (only opening a file does).
    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = os.open(file, os.O_RDONLY)
                    self._fds[file] = fd
        return fd

    def will_need(self, name: str) -> bool:
        """Ask the kernel to start reading tensor `name` into the page cache (asynchronous
        readahead). False where the platform or file system does not take the hint."""
        info = self.tensors.get(name)
        if info is None:
            return True
        if not hasattr(os, "posix_fadvise"):
            return False
        try:
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            return False
        return True

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill the contiguous CPU tensor `out` (the tensor's dtype) with elements
        [start, start + out.numel()) of tensor `name` in flat order; returns `out`."""
        info = self.tensors[name]
        if out.dtype != info.dtype or not out.is_contiguous() or start + out.numel() > info.numel:
            raise ValueError(f"read_into({name}): bad buffer {out.dtype}{tuple(out.shape)} at {start}")
        if out.numel() == 0:
            return out
        view = tensor_bytes(out)
        pos = info.offset + start * out.element_size()
        fd = self._fd(info.file)
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise MergelabError(f"{info.file}: unexpected end of file while reading {name}.")
            done += got
        return out

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, freshly allocated."""
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r}, {len(self.tensors)} tensors)"


def open_sources(refs: list[str]) -> dict[str, ModelSource]:
    out: dict[str, ModelSource] = {}
    for r in refs:
        if r not in out:
            out[r] = ModelSource.open(r)
    return out
