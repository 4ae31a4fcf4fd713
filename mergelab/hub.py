"""Push a merged model directory to the Hugging Face Hub in one commit, with its model card.

Checks the folder and the login before any request, retries transient failures, and turns the Hub's answers into one clear message each.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .card import CARD_FILE, RECIPE_FILE, model_card_files, read_provenance, sources_info_from_local
from .errors import MergelabError, name_list

DEFAULT_ENDPOINT = "https://huggingface.co"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_SCAN_LIMIT = 64 * 1024 * 1024  # files larger than this (weights) are not scanned for the token

Progress = Callable[[str, str], None]  # (stage, human message)
_sleep = time.sleep  # module attribute so tests can record the backoff delays


@dataclass
class PushResult:
    """What a push did (or, for a dry run, would do)."""

    repo_id: str
    revision: str
    endpoint: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes), sorted by path
    card: str  # the README.md uploaded (read from the folder or rendered)
    card_rendered: bool  # True when the folder had no README.md and mergelab rendered one
    card_written: bool  # True when this push wrote that README.md into the folder
    dry_run: bool
    token_source: str | None  # "HF_TOKEN", "saved login", "argument" or None (never the token)
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # step -> requests tried

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ---------------------------------------------------------------------------- folder checks
def list_upload_files(model_dir: Path) -> list[tuple[str, int]]:
    """The files a push uploads: every regular file under the folder except hidden ones."""
    model_dir = Path(model_dir)
    out = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue  # .git, editor and temp files (the card is written via a hidden tmp file)
        if p.is_file():
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def check_model_dir(model_dir: Path) -> None:
    """Raise MergelabError unless the folder looks like a complete merged model."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MergelabError(f"{model_dir}: no such directory. Pass the folder written by `mergelab merge` or `mergelab export`.")
    if not model_dir.is_dir():
        raise MergelabError(f"{model_dir}: is a file, not a model directory. Pass the folder written by `mergelab merge` or `mergelab export`.")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise MergelabError(
            f"{model_dir} is not a merged model: it has no config.json. Push the folder written by "
            "`mergelab merge` or `mergelab export` (it holds config.json, the *.safetensors weights "
            "and the tokenizer)."
        )
    try:
        if not isinstance(json.loads(cfg.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise MergelabError(f"{cfg}: not a valid model config ({e}). Re-export the model.") from None
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        others = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" It holds {name_list(others)}: mergelab only pushes safetensors." if others else ""
        raise MergelabError(
            f"{model_dir} is not a merged model: it has no *.safetensors weights.{hint} "
            "Push the folder written by `mergelab merge` or `mergelab export`."
        )
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MergelabError(f"{index}: not a valid shard index ({e!r}). Re-export the model.") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise MergelabError(
                f"{index} names shards that are missing from {model_dir}: {name_list(missing)}. "
                "The export did not finish: run `mergelab export` again."
            )
    for w in weights:
        _check_safetensors(w)


def _check_safetensors(path: Path) -> None:
    """Header readable and file not truncated: a half-written shard must not reach the Hub."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or n > min(_MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise MergelabError(
            f"{path}: not a readable safetensors file ({e}). Re-export the model."
        ) from None
    if size < 8 + n + end:
        raise MergelabError(
            f"{path} is truncated: {size} bytes, its header needs {8 + n + end}. "
            "The export did not finish: run `mergelab export` again."
        )


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    ok = (
        len(parts) == 2
        and all(_REPO_PART.match(p) for p in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith((".git", ".ipynb"))
    )
    if not ok:
        raise MergelabError(
            f"--repo {repo_id!r}: expected OWNER/NAME (your user or organization name, a slash, "
            "and a name of letters, digits, '-', '_' and '.', at most 96 characters, without "
            "'--' or '..'), e.g. --repo alice/my-merge."
        )


# ---------------------------------------------------------------------------- token
def resolve_token(token: str | None = None) -> tuple[str | None, str | None]:
    """(token, where it came from). The token itself is only ever handed to HfApi."""
    if token:
        return token, "argument"
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip(), "HF_TOKEN"
    from huggingface_hub import get_token

    try:
        saved = get_token()
    except Exception:  # an unreadable token file is the same as no login
        saved = None
    return (saved, "saved login") if saved else (None, None)


def _scan_for_token(model_dir: Path, files: list[tuple[str, int]], token: str, card: str) -> None:
    needle = token.encode()
    if needle in card.encode():
        raise MergelabError(
            f"The model card for {model_dir} contains your Hub token; nothing was uploaded. "
            "Remove it from the recipe / search files and try again."
        )
    for rel, size in files:
        path = model_dir / rel
        if rel.endswith(".safetensors"):  # only the JSON header can hold text
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                data = f.read(min(n, _MAX_SAFETENSORS_HEADER))
        elif size <= _SCAN_LIMIT:
            data = path.read_bytes()
        else:
            continue
        if needle in data:
            raise MergelabError(
                f"{path} contains your Hub token; nothing was uploaded. Remove the token from "
                "that file (tokens belong in HF_TOKEN or `hf auth login`, never in a model folder)."
            )


# ---------------------------------------------------------------------------- errors
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP stack the installed huggingface_hub uses."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        classes += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(classes)


def _server_text(err: Exception) -> str:
    parts = [str(err), getattr(err, "server_message", None) or ""]
    resp = getattr(err, "response", None)
    if resp is not None:
        parts.append(resp.headers.get("X-Error-Message") or "")
    return "\n".join(parts)


def _status(err: Exception) -> int | None:
    resp = getattr(err, "response", None)
    return getattr(resp, "status_code", None)


def _first_line(err: Exception) -> str:
    msg = getattr(err, "server_message", None) or str(err)
    return (msg.strip().splitlines() or [type(err).__name__])[0][:300]


def _is_transient(err: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError):
        return _status(err) in _RETRY_STATUS
    return isinstance(err, _transport_errors())


def _retry_after(err: Exception) -> float | None:
    resp = getattr(err, "response", None)
    value = resp.headers.get("Retry-After") if resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _explain(err: Exception, *, repo_id: str, revision: str, endpoint: str, token_source: str | None,
             attempts: int) -> MergelabError:
    """One paragraph for an error the Hub (or the network) gave."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    owner = repo_id.split("/")[0]
    where = f"the Hub at {endpoint}"
    if isinstance(err, OfflineModeIsEnabled):
        return MergelabError(
            f"Cannot push {repo_id}: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests. "
            "Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and run the push again."
        )
    status = _status(err)
    if isinstance(err, HfHubHTTPError) and status is not None:
        text = _server_text(err)
        if status == 401:
            return MergelabError(
                f"{where} rejected your token (401 Unauthorized, token from {token_source}): it is "
                "invalid, expired or revoked. Create a token with write access at "
                "https://huggingface.co/settings/tokens, then set HF_TOKEN or run `hf auth login`."
            )
        if status == 403 and re.search(r"protected", text, re.I):
            return MergelabError(
                f"Branch '{revision}' of {repo_id} is protected: {where} refuses direct commits to it "
                f"(403: {_first_line(err)}). Push to another branch with --revision BRANCH "
                "(mergelab creates it), then open a pull request from it on the Hub."
            )
        if status == 403:
            return MergelabError(
                f"Your token (from {token_source}) has no write access to '{owner}' on {where} "
                f"(403 Forbidden: {_first_line(err)}). Use a token with write permission for "
                f"'{owner}' (a fine-grained token needs write access to that user or organization), "
                "or push to your own namespace with --repo YOUR_NAME/NAME."
            )
        if isinstance(err, RevisionNotFoundError) or (status == 404 and "revision" in text.lower()):
            return MergelabError(
                f"Branch '{revision}' does not exist in {repo_id} on {where} and could not be "
                "created. Check --revision, or omit it to push to main."
            )
        if status == 404:
            return MergelabError(
                f"{where} answered 404 for {repo_id} although it was just created or found "
                f"({_first_line(err)}). Check the repo id and that your token can see it, then retry."
            )
        if status in _RETRY_STATUS:
            return MergelabError(
                f"{where} kept failing with HTTP {status} after {attempts} attempts "
                f"({_first_line(err)}). The Hub may be down or rate-limiting you: wait a few "
                "minutes and run the push again (files already uploaded are not sent twice)."
            )
        return MergelabError(f"{where} refused the push of {repo_id} (HTTP {status}: {_first_line(err)}).")
    if isinstance(err, _transport_errors()):
        return MergelabError(
            f"Could not reach {where} after {attempts} attempts ({type(err).__name__}: "
            f"{_first_line(err)}). Check your network connection and proxy settings, and "
            "HF_ENDPOINT if you set it, then run the push again."
        )
    if isinstance(err, ValueError) and "README.md" in str(err):
        return MergelabError(
            f"{where} rejected the model card's metadata: {' '.join(str(err).split())}. "
            "Fix the front matter of README.md (between the --- lines) and push again."
        )
    return MergelabError(f"The push of {repo_id} to {where} failed: {type(err).__name__}: {_first_line(err)}.")


def _with_retries(step: str, fn: Callable[[], Any], *, attempts: int, backoff: float,
                  progress: Progress | None, counter: dict[str, int], explain: Callable) -> Any:
    """Run fn, retrying transient failures with exponential backoff (backoff, 2x, 4x, ...)."""
    for i in range(1, attempts + 1):
        counter[step] = i
        try:
            return fn()
        except MergelabError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes one message below
            if not _is_transient(err) or i == attempts:
                raise explain(err, attempts=i) from err
            delay = min(backoff * 2 ** (i - 1), 60.0)
            ra = _retry_after(err)
            if ra is not None:
                delay = max(delay, min(ra, 120.0))
            if progress:
                progress("retry", f"{step}: {_first_line(err)}; retry {i}/{attempts - 1} in {delay:g}s")
            _sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- push
class _CountingReader(io.BufferedReader):
    """A file huggingface_hub reads to upload (a BufferedIOBase, as it requires), reporting the
    bytes read once `on_bytes` is set, i.e. after the client hashed it. Only reads past the
    furthest point reached count, so the 512-byte sample preupload reads is not counted twice."""

    on_bytes: Callable[[int], None] | None = None
    _reached = 0

    def _seen(self, n: int) -> None:
        if self.on_bytes is None or not n:
            return
        pos = self.tell()
        if pos > self._reached:
            self.on_bytes(pos - self._reached)
            self._reached = pos

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._seen(len(data))
        return data

    def read1(self, size: int = -1) -> bytes:
        data = super().read1(size)
        self._seen(len(data))
        return data

    def readinto(self, b) -> int:
        n = super().readinto(b)
        self._seen(n or 0)
        return n


class _NoXetFallbackNote(logging.Filter):
    """huggingface_hub notes that file objects cannot go through Xet storage: mergelab uploads
    file objects on purpose (to count the bytes sent), so the LFS path they take is the expected one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not supported by Xet Storage" not in record.getMessage()


logging.getLogger("huggingface_hub._commit_api").addFilter(_NoXetFallbackNote())


def _card_for(model_dir: Path) -> tuple[str, dict[str, bytes]]:
    """(card text, files still to write beside it: its pictures, empty when the folder has a
    README.md). Fails early on an unusable card."""
    readme = model_dir / CARD_FILE
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        try:
            from huggingface_hub import metadata_load

            metadata_load(readme)
        except Exception as e:
            raise MergelabError(
                f"{readme}: its front matter (between the --- lines) is not valid YAML ({e}). "
                "Fix it, or delete README.md to have mergelab write the card again."
            ) from None
        return text, {}
    recipe, search = read_provenance(model_dir)
    if recipe is None:
        raise MergelabError(
            f"{model_dir} has neither a README.md nor {RECIPE_FILE}, so no model card can be "
            "written. Push the folder written by `mergelab merge` / `mergelab export`, or add a README.md."
        )
    files = model_card_files(model_dir, recipe, search, sources_info_from_local(recipe))
    card = files.pop(CARD_FILE)
    return card, {name: data for name, data in files.items() if not (model_dir / name).is_file()}


def push_folder(
    model_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_bytes: Callable[[int], None] | None = None,
    attempts: int = 4,
    backoff: float = 2.0,
) -> PushResult:
    """Upload MODEL_DIR to the Hub repo REPO_ID in one commit; create the repo if missing.

    Everything that can be checked locally is checked before any request. A dry run makes no
    request and writes nothing. `on_bytes(n)` is told each chunk of file bytes sent (a retried
    commit sends them again). Transient failures (connection errors, 408/429/5xx) are retried
    `attempts` times per step with delays backoff, 2*backoff, 4*backoff... seconds.
    """
    model_dir = Path(model_dir)
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    say = progress or (lambda stage, msg: None)
    check_repo_id(repo_id)
    check_model_dir(model_dir)
    if revision is not None and not revision.strip():
        raise MergelabError("--revision is empty: give a branch name, or omit it to push to main.")
    branch = revision or "main"
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    readme = model_dir / CARD_FILE
    card_missing = not readme.is_file()
    card, pictures = _card_for(model_dir)
    files = list_upload_files(model_dir)
    if card_missing:
        files = sorted(files + [(CARD_FILE, len(card.encode("utf-8")))]
                       + [(name, len(data)) for name, data in pictures.items()])
    token_value, token_source = resolve_token(token)
    result = PushResult(
        repo_id=repo_id, revision=branch, endpoint=endpoint, files=files, card=card,
        card_rendered=card_missing, card_written=False, dry_run=dry_run, token_source=token_source,
    )
    if dry_run:
        return result
    if token_value is None:
        raise MergelabError(
            f"Not logged in to the Hub: no token in HF_TOKEN and no saved login, so {repo_id} "
            "cannot be pushed. Run `hf auth login` (or set HF_TOKEN) with a token that has write "
            "access; create one at https://huggingface.co/settings/tokens."
        )
    _scan_for_token(model_dir, [f for f in files if (model_dir / f[0]).is_file()], token_value, card)

    if card_missing:  # the folder then holds exactly what the Hub will hold
        for name, data in [*pictures.items(), (CARD_FILE, card.encode("utf-8"))]:
            tmp = model_dir / f".{name}.tmp-{os.getpid()}"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, model_dir / name)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise MergelabError(
                    f"Cannot write the model card {name} into {model_dir} ({e.strerror}); nothing was "
                    "uploaded. The folder has no README.md, and mergelab writes the card into it before "
                    "the upload so the folder holds what the Hub will. Copy the folder somewhere "
                    "writable, or add a README.md, and push again."
                ) from None
        result.card_written = True
        say("card", f"wrote {model_dir / CARD_FILE}")

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token_value)

    def explain(err: Exception, attempts: int) -> MergelabError:
        return _explain(err, repo_id=repo_id, revision=branch, endpoint=endpoint,
                        token_source=token_source, attempts=attempts)

    retry = dict(attempts=attempts, backoff=backoff, progress=progress, counter=result.attempts,
                 explain=explain)

    say("create_repo", f"creating {repo_id} on {endpoint} (kept if it exists)")
    def create_repo():
        try:
            return api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        except ValueError as e:
            # huggingface_hub 2.4: when creation is refused (401/403) but the repo exists, it
            # builds the repo URL without the endpoint and rejects any host but the default one
            # (HfUriError). The repo exists and is readable: go on; the commit says if we may write.
            if type(e).__name__ == "HfUriError" and endpoint != DEFAULT_ENDPOINT:
                return f"{endpoint}/{repo_id}"
            raise

    repo_url = _with_retries("create_repo", create_repo, **retry)
    result.repo_url = str(repo_url)

    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        say("branch", f"creating branch {revision} (kept if it exists)")
        _with_retries(
            "create_branch",
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model"),
            **retry,
        )

    summary = message or _default_message(model_dir)
    total = result.total_bytes
    say("upload", f"uploading {len(files)} files ({_human(total)}) in one commit to {repo_id}@{branch}")

    def commit():
        # Fresh operations each attempt: the client marks them as uploaded/committed in place.
        readers = [_CountingReader(io.FileIO(model_dir / rel, "rb")) for rel, _ in files]
        try:
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=r) for (rel, _), r in zip(files, readers)]
            for r in readers:
                r.on_bytes = on_bytes
            return api.create_commit(
                repo_id, ops, commit_message=summary, repo_type="model", revision=revision,
            )
        finally:
            for r in readers:
                r.close()

    info = _with_retries("commit", commit, **retry)
    result.commit_url = info.commit_url
    result.commit_oid = info.oid
    say("done", f"committed {info.commit_url}")
    return result


def _default_message(model_dir: Path) -> str:
    try:
        recipe, search = read_provenance(model_dir)
    except MergelabError:
        recipe, search = None, None
    method = (recipe or {}).get("merge_method")
    what = f"{method} merge" if method else "merged model"
    if search and search.get("n_trials") is not None:
        what += f" (searched, {search['n_trials']} trials)"
    return f"Upload {what} with mergelab"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def describe_upload(result: PushResult) -> str:
    """The file table a dry run prints: one line per file, then the total."""
    width = max((len(p) for p, _ in result.files), default=4)
    lines = [f"Would upload to {result.endpoint}/{result.repo_id} (branch {result.revision}) in one commit:"]
    for path, size in result.files:
        note = "  (model card, rendered now)" if path == CARD_FILE and result.card_rendered else ""
        lines.append(f"  {path:<{width}}  {_human(size):>10}{note}")
    lines.append(f"  {'total':<{width}}  {_human(result.total_bytes):>10}  ({len(result.files)} files)")
    if result.token_source:
        lines.append(f"Token: found ({result.token_source}).")
    else:
        lines.append("Token: none found; a real push needs `hf auth login` or HF_TOKEN.")
    return "\n".join(lines)

