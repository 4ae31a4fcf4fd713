"""A local fake of the Hugging Face Hub HTTP API, enough for huggingface_hub's create_repo + commit.

Tests point the real client at it (HF_ENDPOINT / HfApi(endpoint=...)) and read back what it received.

Usage:
    with fake_hub() as hub:                       # or the `fakehub` pytest fixture
        hub.fail("commit", 500, times=1)          # script an answer for one endpoint
        ...push to hub.url...
        hub.commits[0].files                      # {path: bytes} decoded from the NDJSON commit
        hub.requests                              # every request: method, path, headers, body
        hub.unknown                               # requests no route matched (answered 404)

Endpoints (the ones huggingface_hub 2.4 calls for create_repo, create_branch and create_commit,
with regular and LFS uploads), by the name `fail()` takes:
    create_repo    POST /api/repos/create
    validate_yaml  POST /api/validate-yaml
    preupload      POST /api/models/{owner}/{name}/preupload/{revision}
    lfs_batch      POST /{owner}/{name}.git/info/lfs/objects/batch
    lfs_put        PUT  /fakehub-lfs/{oid}                  (the "upload" href the batch answers)
    lfs_verify     POST /{owner}/{name}.git/info/lfs/objects/verify
    commit         POST /api/models/{owner}/{name}/commit/{revision}
    repo_info      GET  /api/models/{owner}/{name}[/revision/{revision}]
    create_branch  POST /api/models/{owner}/{name}/branch/{branch}
    refs           GET  /api/models/{owner}/{name}/refs
    whoami         GET  /api/whoami-v2
Behaviour without scripted failures: tokens outside `valid_tokens` get 401 "Invalid credentials in
Authorization header"; owners in `readonly_owners` get 403 on create/preupload/commit/branch; a
branch passed to `protect()` gets 403 on commit with a protected-branch message. Preupload answers
"lfs" for the files the Hub keeps in LFS (names matching `lfs_patterns`, e.g. *.safetensors and
*.png, or larger than 10 MB) and "regular" for the rest, whose contents travel base64 inside the
commit. LFS objects go through the batch endpoint (basic transfer, with a verify action), a PUT of
the bytes (checked against the announced sha256 and size, as the storage does) and an `lfsFile`
line in the commit, which must name an object that was uploaded; an object stored before gets no
upload action. `lfs_objects` holds what was stored, by sha256.
"""
from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_fakehub_test_token_0123456789"
PROTECTED_MESSAGE = (
    "Cannot commit to protected branch refs/heads/{branch}: this ref is protected, "
    "open a pull request or push to another branch"
)

ENDPOINTS = (
    "create_repo",
    "validate_yaml",
    "preupload",
    "lfs_batch",
    "lfs_put",
    "lfs_verify",
    "commit",
    "repo_info",
    "create_branch",
    "refs",
    "whoami",
)


@dataclass
class RecordedRequest:
    """One request as the server saw it. Header names are lower-case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    endpoint: str | None  # route name, None when no route matched

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeCommit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]  # path -> decoded content
    deleted: list[str]
    lfs_files: list[dict]  # lfsFile entries as sent: {path, algo, oid, size}
    oid: str


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    branches: dict[str, list[str]] = field(default_factory=lambda: {"main": []})  # name -> commit oids
    files: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class _Script:
    status: int
    times: int | None  # None: every call
    message: str | None
    error_code: str | None
    body: Any = None
    headers: dict | None = None


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern]] = [
    ("POST", "create_repo", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>.+)$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_put", re.compile(r"^/fakehub-lfs/(?P<rev>[0-9a-f]{64})$")),
    ("POST", "lfs_verify", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>.+)$")),
    ("POST", "create_branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>.+)$")),
    ("GET", "refs", re.compile(rf"^/api/models/{_REPO}/refs$")),
    ("GET", "repo_info", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<rev>.+))?$")),
    ("GET", "whoami", re.compile(r"^/api/whoami-v2$")),
]


class FakeHub:
    """The server's state and controls. Start it with `fake_hub()` or the `fakehub` fixture."""

    def __init__(self, valid_tokens: tuple[str, ...] = (DEFAULT_TOKEN,)):
        self.valid_tokens: set[str] = set(valid_tokens)
        self.readonly_owners: set[str] = set()
        self.protected: set[tuple[str, str]] = set()
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.unknown: list[RecordedRequest] = []
        self.commits: list[FakeCommit] = []
        self.lfs_patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt", "*.png", "*.jpg", "*.gguf")
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self._scripts: dict[str, list[_Script]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ controls
    def fail(
        self,
        endpoint: str,
        status: int,
        *,
        times: int | None = None,
        message: str | None = None,
        error_code: str | None = None,
        body: Any = None,
        headers: dict | None = None,
    ) -> None:
        """Answer `status` on `endpoint` (the next `times` calls, or every call when None).

        `message` goes in the X-Error-Message header and the JSON body's "error", as the Hub does;
        `error_code` in X-Error-Code (e.g. "RepoNotFound"); `headers` are added as given (e.g.
        Retry-After); `body` replaces the JSON body. Scripts queue up in order.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
        with self._lock:
            self._scripts.setdefault(endpoint, []).append(
                _Script(status, times, message, error_code, body, headers)
            )

    def add_repo(self, repo_id: str, *, private: bool = False, branches: tuple[str, ...] = ()) -> FakeRepo:
        """A repo that already exists (e.g. someone else's, or one pushed before)."""
        repo = FakeRepo(repo_id, private=private)
        for b in branches:
            repo.branches.setdefault(b, [])
            repo.files.setdefault(b, {})
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    def protect(self, repo_id: str, branch: str = "main") -> None:
        """Commits to this branch get 403 with a protected-branch message."""
        self.protected.add((repo_id, branch))

    def calls(self, endpoint: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakehub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ request handling
    def _scripted(self, endpoint: str) -> _Script | None:
        with self._lock:
            queue = self._scripts.get(endpoint, [])
            while queue:
                s = queue[0]
                if s.times is None:
                    return s
                if s.times > 0:
                    s.times -= 1
                    if s.times == 0:
                        queue.pop(0)
                    return s
                queue.pop(0)
        return None

    def _handle(self, req: RecordedRequest, match: re.Match | None) -> tuple[int, dict, Any]:
        """-> (status, extra headers, JSON body)."""
        ep = req.endpoint
        if ep is None:
            return 404, {"X-Error-Message": "Not found (fakehub: unknown route)"}, {"error": "Not found"}

        script = self._scripted(ep)
        if script is not None:
            headers = dict(script.headers or {})
            if script.message is not None:
                headers["X-Error-Message"] = script.message
            if script.error_code is not None:
                headers["X-Error-Code"] = script.error_code
            body = script.body
            if body is None:
                body = {"error": script.message} if script.message is not None else {}
            return script.status, headers, body

        auth = req.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        # the object PUT goes to storage with a pre-signed URL, without the Hub token
        if token not in self.valid_tokens and ep != "lfs_put":
            msg = "Invalid credentials in Authorization header"
            return 401, {"X-Error-Message": msg}, {"error": msg}

        groups = match.groupdict() if match else {}
        repo_id = unquote(groups["repo"]) if groups.get("repo") else None
        rev = unquote(groups["rev"]) if groups.get("rev") else None
        return getattr(self, f"_ep_{ep}")(req, repo_id, rev)

    def _not_found(self, repo_id: str) -> tuple[int, dict, Any]:
        msg = "Repository not found"
        return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": msg}, {"error": msg}

    def _forbidden(self, owner: str) -> tuple[int, dict, Any]:
        msg = f"You don't have the rights to write to the namespace {owner}"
        return 403, {"X-Error-Message": msg}, {"error": msg}

    def _ep_create_repo(self, req, _repo, _rev):
        payload = req.json()
        owner, name = payload.get("organization"), payload["name"]
        repo_id = f"{owner}/{name}" if owner else f"tester/{name}"
        if owner in self.readonly_owners:
            return self._forbidden(owner)
        with self._lock:
            if repo_id in self.repos:
                msg = "You already created this model repo"
                return 409, {"X-Error-Message": msg}, {"error": msg, "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": _oid(repo_id)}

    def _ep_validate_yaml(self, req, _repo, _rev):
        import yaml

        content = req.json().get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                return 400, {}, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
            if meta is not None and not isinstance(meta, dict):
                return 400, {}, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}
        return 200, {}, {"errors": [], "warnings": []}

    def _ep_preupload(self, req, repo_id, rev):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found(repo_id)
        if repo_id.split("/")[0] in self.readonly_owners:
            return self._forbidden(repo_id.split("/")[0])
        files = req.json()["files"]
        return 200, {}, {
            "files": [
                {"path": f["path"], "uploadMode": "lfs" if self._is_lfs(f) else "regular",
                 "shouldIgnore": False, "oid": None}
                for f in files
            ],
            "commitOid": repo.branches.get(rev, [None])[-1] if repo.branches.get(rev) else None,
        }

    def _is_lfs(self, f: dict) -> bool:
        name = f["path"].rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, p) for p in self.lfs_patterns) or int(f.get("size") or 0) > 10 * 10**6

    def _ep_lfs_batch(self, req, repo_id, _rev):
        if repo_id not in self.repos:
            return self._not_found(repo_id)
        payload = req.json()
        if payload.get("operation") != "upload" or "basic" not in (payload.get("transfers") or ["basic"]):
            return 422, {}, {"message": "fakehub: only basic uploads are implemented"}
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # already stored: no actions, nothing to send
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/fakehub-lfs/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def _ep_lfs_put(self, req, _repo, oid):
        if hashlib.sha256(req.body).hexdigest() != oid:
            return 400, {}, {"error": "fakehub: the uploaded bytes do not match the object id"}
        with self._lock:
            self.lfs_objects[oid] = req.body
        return 200, {}, {}

    def _ep_lfs_verify(self, req, repo_id, _rev):
        obj = req.json()
        stored = self.lfs_objects.get(obj.get("oid"))
        if stored is None or len(stored) != obj.get("size"):
            return 404, {}, {"message": f"fakehub: object {obj.get('oid')} not stored with size {obj.get('size')}"}
        return 200, {}, {}

    def _ep_commit(self, req, repo_id, rev):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found(repo_id)
        if repo_id.split("/")[0] in self.readonly_owners:
            return self._forbidden(repo_id.split("/")[0])
        if (repo_id, rev) in self.protected:
            msg = PROTECTED_MESSAGE.format(branch=rev)
            return 403, {"X-Error-Message": msg}, {"error": msg}
        if rev not in repo.branches:
            msg = f"Invalid rev id: {rev}"
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg}, {"error": msg}
        header: dict = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        lfs: list[dict] = []
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    return 400, {}, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key == "lfsFile":
                stored = self.lfs_objects.get(value.get("oid"))
                if stored is None or len(stored) != value.get("size"):
                    msg = f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {value.get('path')}"
                    return 422, {"X-Error-Message": msg}, {"error": msg}
                lfs.append(value)
                files[value["path"]] = stored
            else:
                return 400, {}, {"error": f"unknown commit operation {key!r}"}
        oid = _oid(repo_id + rev + str(len(self.commits)) + req.body.decode("utf-8", "replace"))
        with self._lock:
            self.commits.append(
                FakeCommit(repo_id, rev, header.get("summary", ""), header.get("description", ""),
                           files, deleted, lfs, oid)
            )
            repo.branches[rev].append(oid)
            repo.files.setdefault(rev, {}).update(files)
        return 200, {}, {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "success": True,
        }

    def _ep_repo_info(self, req, repo_id, rev):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found(repo_id)
        branch = rev or "main"
        if branch not in repo.branches:
            msg = f"Invalid rev id: {branch}"
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg}, {"error": msg}
        commits = repo.branches[branch]
        return 200, {}, {
            "id": repo_id,
            "modelId": repo_id,
            "private": repo.private,
            "sha": commits[-1] if commits else _oid(repo_id),
            "siblings": [{"rfilename": p} for p in sorted(repo.files.get(branch, {}))],
        }

    def _ep_create_branch(self, req, repo_id, branch):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found(repo_id)
        if repo_id.split("/")[0] in self.readonly_owners:
            return self._forbidden(repo_id.split("/")[0])
        with self._lock:
            if branch in repo.branches:
                msg = "Reference already exists"
                return 409, {"X-Error-Message": msg}, {"error": msg}
            repo.branches[branch] = list(repo.branches["main"])
            repo.files[branch] = dict(repo.files["main"])
        return 200, {}, {}

    def _ep_refs(self, req, repo_id, _rev):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._not_found(repo_id)
        return 200, {}, {
            "branches": [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": (c[-1] if c else _oid(repo_id))}
                for b, c in repo.branches.items()
            ],
            "converts": [],
            "tags": [],
        }

    def _ep_whoami(self, req, _repo, _rev):
        return 200, {}, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}}


def _oid(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        endpoint, match = None, None
        for method, name, pattern in _ROUTES:
            if method == self.command and (m := pattern.match(parts.path)):
                endpoint, match = name, m
                break
        req = RecordedRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            endpoint=endpoint,
        )
        with self.fake._lock:
            self.fake.requests.append(req)
            if endpoint is None:
                self.fake.unknown.append(req)
        try:
            status, headers, payload = self.fake._handle(req, match)
        except Exception as e:  # a bug in the fake must show up as a failing answer, not a hang
            status, headers, payload = 500, {}, {"error": f"fakehub crashed: {e!r}"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", f"fakehub-{len(self.fake.requests)}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch


@contextlib.contextmanager
def fake_hub(**kwargs) -> Iterator[FakeHub]:
    """Start a FakeHub on 127.0.0.1 on a free port, in a thread; stop it on exit."""
    hub = FakeHub(**kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.close()


@pytest.fixture
def fakehub(monkeypatch) -> Iterator[FakeHub]:
    """A running FakeHub; HF_ENDPOINT points at it and HF_TOKEN is its valid token.

    Also keeps the test off the user's saved login and proxies.
    """
    import huggingface_hub.constants as hf_constants

    with fake_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", "/nonexistent/fakehub/token")
        yield hub
