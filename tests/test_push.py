"""`mergelab push` against a local fake Hub: the real huggingface_hub client code runs end to end.

Checks what the server received (files byte for byte, one commit, token only in headers) and each error message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import mergelab.hub as hub_mod
from fakehub import DEFAULT_TOKEN, fakehub  # noqa: F401 - fixture
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.hub import push_folder

# the card's pictures, written and pushed when the optional `plots` extra (matplotlib) is installed
PICTURES = (["mergelab_recipe.png", "mergelab_scores.png"] if importlib.util.find_spec("matplotlib") else [])

RECIPE = {
    "merge_method": "ties",
    "base_model": "acme/base-1b",
    "models": [
        {"model": "acme/math-1b", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "acme/code-1b", "parameters": {"weight": 0.4, "density": 0.5}},
    ],
    "parameters": {"normalize": True},
    "dtype": "float32",
}
SEARCH = {
    "optimizer": "cmaes",
    "n_trials": 4,
    "eval_spec": {"kind": "perplexity", "data": "wiki.txt"},
    "best_trial": 3,
    "best_metrics": {"ppl": 7.5},
    "source_metrics": {"acme/math-1b": {"ppl": 8.0}, "acme/code-1b": {"ppl": 9.0}},
    "history": [-9.0, -8.5, -7.5, -7.5],
    "run_name": "tiny-run",
}


def make_model(root: Path, *, sharded: bool = False, card: bool = False) -> Path:
    """A tiny but complete merged-model folder (no real model needed)."""
    d = root / "merged"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (d / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (d / "mergelab_recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    (d / "mergelab_search.json").write_text(json.dumps(SEARCH))
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(8, 4, generator=g), "lm_head.weight": torch.randn(8, 4, generator=g)}
    if sharded:
        save_file({"embed.weight": tensors["embed.weight"]}, d / "model-00001-of-00002.safetensors")
        save_file({"lm_head.weight": tensors["lm_head.weight"]}, d / "model-00002-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({
            "metadata": {"total_size": 256},
            "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                           "lm_head.weight": "model-00002-of-00002.safetensors"},
        }))
    else:
        save_file(tensors, d / "model.safetensors")
    if card:
        (d / "README.md").write_text("---\nlicense: mit\ntags:\n- merge\n---\n\n# hand-written card\n")
    return d


def endpoints_in_order(hub) -> list[str]:
    """The endpoints called, each object's PUT directly followed by its verify (the client
    uploads objects from several threads, so across objects the two may interleave)."""
    names = [r.endpoint for r in hub.requests]
    puts = names.count("lfs_put")
    assert puts == names.count("lfs_verify")
    rest = [n for n in names if n not in ("lfs_put", "lfs_verify")]
    i = rest.index("lfs_batch") + 1 if puts else len(rest)
    return rest[:i] + ["lfs_put", "lfs_verify"] * puts + rest[i:]


def folder_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def free_port_closed() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------- success paths
def test_push_uploads_exactly_the_folder_in_one_commit(tmp_path, fakehub):
    d = make_model(tmp_path)
    stages = []
    result = push_folder(d, "alice/tiny-merge", progress=lambda s, m: stages.append(s))

    assert (d / "README.md").is_file() and result.card_written and result.card_rendered
    # the weights (and the card's pictures, with the `plots` extra) take the LFS path, as on the Hub
    # (objects go up in parallel threads: their PUTs and verifies interleave)
    assert endpoints_in_order(fakehub) == ["create_repo", "validate_yaml", "preupload", "lfs_batch",
                                           *["lfs_put", "lfs_verify"] * len(PICTURES + ["w"]), "commit"]
    assert fakehub.unknown == []
    assert len(fakehub.commits) == 1
    commit = fakehub.commits[0]
    assert commit.repo_id == "alice/tiny-merge" and commit.revision == "main"
    assert commit.files == folder_bytes(d)  # every file, byte for byte, card and LFS objects included
    assert sorted(commit.files) == sorted([
        "README.md", "config.json", "generation_config.json", "mergelab_recipe.yaml",
        "mergelab_search.json", "model.safetensors", "tokenizer.json", *PICTURES,
    ])
    weights = (d / "model.safetensors").read_bytes()
    assert sorted(commit.lfs_files, key=lambda f: f["path"]) == sorted([
        {"path": p, "algo": "sha256", "oid": hashlib.sha256((d / p).read_bytes()).hexdigest(),
         "size": (d / p).stat().st_size} for p in ["model.safetensors", *PICTURES]], key=lambda f: f["path"])
    assert fakehub.lfs_objects[hashlib.sha256(weights).hexdigest()] == weights
    assert commit.deleted == []
    assert commit.summary == "Upload ties merge (searched, 4 trials) with mergelab"
    assert result.commit_url == f"{fakehub.url}/alice/tiny-merge/commit/{commit.oid}"
    assert result.commit_oid == commit.oid
    assert result.repo_url == f"{fakehub.url}/alice/tiny-merge"
    assert result.attempts == {"create_repo": 1, "commit": 1}
    assert stages == ["card", "create_repo", "upload", "done"]
    # The token travels in the Authorization header of every request and nowhere else.
    for r in fakehub.requests:  # ... and never to the object storage the LFS PUT goes to
        assert r.headers.get("authorization") == (None if r.endpoint == "lfs_put" else f"Bearer {DEFAULT_TOKEN}")
        assert DEFAULT_TOKEN.encode() not in r.body
    for content in commit.files.values():
        assert DEFAULT_TOKEN.encode() not in content
    assert DEFAULT_TOKEN not in result.card
    # The card that was committed is the provenance card.
    card = commit.files["README.md"].decode()
    assert "base_model:\n- acme/base-1b\n- acme/math-1b\n- acme/code-1b\n" in card
    assert "| **this merge** (trial 3) | 7.5 |" in card


def test_push_sharded_keeps_existing_card_and_creates_private_repo(tmp_path, fakehub):
    d = make_model(tmp_path, sharded=True, card=True)
    before = (d / "README.md").read_bytes()
    result = push_folder(d, "alice/sharded", private=True, message="my message")
    assert not result.card_written and not result.card_rendered
    assert (d / "README.md").read_bytes() == before
    (commit,) = fakehub.commits
    assert commit.files == folder_bytes(d)
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= set(commit.files)
    assert commit.summary == "my message"
    assert fakehub.calls("create_repo")[0].json() == {
        "name": "sharded", "organization": "alice", "visibility": "private", "type": "model"}
    assert fakehub.repos["alice/sharded"].private is True


def test_push_to_existing_repo_and_new_branch(tmp_path, fakehub):
    fakehub.add_repo("alice/old")
    d = make_model(tmp_path)
    result = push_folder(d, "alice/old", revision="try-1")
    assert endpoints_in_order(fakehub) == [
        "create_repo", "create_branch", "validate_yaml", "preupload", "lfs_batch",
        *["lfs_put", "lfs_verify"] * len(PICTURES + ["w"]), "commit"]
    assert fakehub.requests[0].endpoint == "create_repo"  # answered 409, accepted as "exists"
    (commit,) = fakehub.commits
    assert commit.revision == "try-1"
    assert result.revision == "try-1"
    assert "try-1" in fakehub.repos["alice/old"].branches


def test_cli_push_prints_commit_url(tmp_path, fakehub, capsys):
    d = make_model(tmp_path)
    assert main(["push", str(d), "--repo", "alice/cli", "-m", "from the cli"]) == 0
    out, err = capsys.readouterr()
    (commit,) = fakehub.commits
    assert out == f"{fakehub.url}/alice/cli/commit/{commit.oid}\n"
    assert commit.summary == "from the cli"
    assert DEFAULT_TOKEN not in out + err


# ---------------------------------------------------------------------------- dry run
def test_dry_run_makes_no_request_and_writes_nothing(tmp_path, fakehub, capsys):
    d = make_model(tmp_path)
    before = folder_bytes(d)
    assert main(["push", str(d), "--repo", "alice/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert fakehub.requests == []
    assert folder_bytes(d) == before  # README.md not written
    sizes = {p: len(b) for p, b in before.items()}
    for path, size in sizes.items():
        assert any(line.split()[:1] == [path] and f"{size} B" in line for line in out.splitlines()), path
    planned = hub_mod.push_folder(d, "alice/dry", dry_run=True)
    card_size = len(planned.card.encode())
    pictures = sum(size for path, size in planned.files if path in PICTURES)
    total = sum(sizes.values()) + card_size + pictures
    assert f"README.md" in out and "(model card, rendered now)" in out
    assert f"({len(sizes) + 1 + len(PICTURES)} files)" in out
    assert f"{total / 1024:.1f} KB" in out
    assert "tags:\n- merge\n- mergelab\n- ties\n" in out  # the card is printed
    assert "Token: found (HF_TOKEN)." in out
    assert DEFAULT_TOKEN not in out
    assert fakehub.requests == []


def test_dry_run_needs_no_token_nor_network(tmp_path, monkeypatch, fakehub):
    monkeypatch.delenv("HF_TOKEN")
    d = make_model(tmp_path)
    r = push_folder(d, "alice/dry", dry_run=True, endpoint=f"http://127.0.0.1:{free_port_closed()}")
    assert r.token_source is None and r.commit_url is None
    assert "Token: none found" in hub_mod.describe_upload(r)
    assert fakehub.requests == []


# ---------------------------------------------------------------------------- errors
def test_not_logged_in(tmp_path, monkeypatch, fakehub):
    monkeypatch.delenv("HF_TOKEN")
    d = make_model(tmp_path)
    with pytest.raises(MergelabError, match=r"Not logged in to the Hub: no token in HF_TOKEN"):
        push_folder(d, "alice/x")
    assert fakehub.requests == []
    assert not (d / "README.md").exists()


def test_invalid_token_401(tmp_path, monkeypatch, fakehub):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    d = make_model(tmp_path)
    with pytest.raises(MergelabError) as e:
        push_folder(d, "alice/x", backoff=0)
    msg = str(e.value)
    assert "rejected your token (401 Unauthorized, token from HF_TOKEN)" in msg
    assert "hf_not_a_valid_token" not in msg
    assert fakehub.commits == []


@pytest.mark.parametrize("repo_exists", [False, True])
def test_no_write_access_403(tmp_path, fakehub, repo_exists):
    fakehub.readonly_owners.add("bigorg")
    if repo_exists:  # a public repo of someone else: the client goes on to preupload, refused too
        fakehub.add_repo("bigorg/model")
    d = make_model(tmp_path)
    with pytest.raises(MergelabError) as e:
        push_folder(d, "bigorg/model", backoff=0)
    msg = str(e.value)
    assert "has no write access to 'bigorg'" in msg and "403 Forbidden" in msg
    assert "--repo YOUR_NAME/NAME" in msg
    assert fakehub.commits == []
    expected = ["create_repo", "repo_info"] + (["validate_yaml", "preupload"] if repo_exists else [])
    assert [r.endpoint for r in fakehub.requests] == expected


def test_protected_branch_403_then_revision(tmp_path, fakehub):
    fakehub.add_repo("alice/guarded")
    fakehub.protect("alice/guarded", "main")
    d = make_model(tmp_path)
    with pytest.raises(MergelabError) as e:
        push_folder(d, "alice/guarded", backoff=0)
    msg = str(e.value)
    assert "Branch 'main' of alice/guarded is protected" in msg
    assert "--revision BRANCH" in msg and "pull request" in msg
    assert fakehub.commits == []
    # The advice works: a branch push goes through.
    result = push_folder(d, "alice/guarded", revision="merge-candidate")
    (commit,) = fakehub.commits
    assert commit.revision == "merge-candidate" and result.commit_oid == commit.oid


def test_server_error_then_success_retries(tmp_path, fakehub, monkeypatch):
    delays = []
    monkeypatch.setattr(hub_mod, "_sleep", delays.append)
    fakehub.fail("create_repo", 503, times=2)
    fakehub.fail("commit", 500, times=1, message="Internal Error")
    d = make_model(tmp_path)
    result = push_folder(d, "alice/flaky", attempts=4, backoff=0.25)
    assert result.attempts == {"create_repo": 3, "commit": 2}
    assert delays == [0.25, 0.5, 0.25]  # create_repo: 0.25, 0.5; commit: 0.25
    assert len(fakehub.calls("create_repo")) == 3 and len(fakehub.calls("commit")) == 2
    (commit,) = fakehub.commits  # the failed attempt left nothing behind
    assert commit.files == folder_bytes(d)


def test_persistent_503_gives_message(tmp_path, fakehub, monkeypatch):
    delays = []
    monkeypatch.setattr(hub_mod, "_sleep", delays.append)
    fakehub.fail("create_repo", 503, message="Service Unavailable")
    d = make_model(tmp_path)
    with pytest.raises(MergelabError) as e:
        push_folder(d, "alice/down", attempts=3, backoff=1.0)
    assert "kept failing with HTTP 503 after 3 attempts" in str(e.value)
    assert delays == [1.0, 2.0]
    assert len(fakehub.calls("create_repo")) == 3


def test_retry_after_header_is_honoured(tmp_path, fakehub, monkeypatch):
    delays = []
    monkeypatch.setattr(hub_mod, "_sleep", delays.append)
    fakehub.fail("create_repo", 429, times=1, headers={"Retry-After": "3"})
    fakehub.fail("create_repo", 429, times=1, headers={"Retry-After": "0"})
    d = make_model(tmp_path)
    result = push_folder(d, "alice/limited", attempts=3, backoff=0.5)
    assert delays == [3.0, 1.0]  # max(backoff 0.5, Retry-After 3), then max(1.0, 0)
    assert result.attempts["create_repo"] == 3


def test_connection_refused_gives_message(tmp_path, fakehub, monkeypatch):
    delays = []
    monkeypatch.setattr(hub_mod, "_sleep", delays.append)
    d = make_model(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port_closed()}"
    with pytest.raises(MergelabError) as e:
        push_folder(d, "alice/x", endpoint=endpoint, attempts=3, backoff=0.1)
    msg = str(e.value)
    assert f"Could not reach the Hub at {endpoint} after 3 attempts (ConnectError" in msg
    assert delays == [0.1, 0.2]


# ---------------------------------------------------------------------------- local checks
@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").unlink(), r"is not a merged model: it has no config\.json"),
        (lambda d: (d / "model.safetensors").unlink(), r"is not a merged model: it has no \*\.safetensors"),
        (lambda d: (d / "config.json").write_text("{nope"), r"config\.json: not a valid model config"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
         r"model\.safetensors is truncated: \d+ bytes, its header needs \d+"),
        (lambda d: (d / "README.md").write_text("---\nlicense: [mit\n---\n"), r"front matter .* not valid YAML"),
    ],
)
def test_not_a_merged_model_is_refused_before_network(tmp_path, fakehub, breakage, message):
    d = make_model(tmp_path)
    breakage(d)
    with pytest.raises(MergelabError, match=message):
        push_folder(d, "alice/x")
    assert fakehub.requests == []


def test_missing_shard_and_missing_dir(tmp_path, fakehub):
    d = make_model(tmp_path, sharded=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergelabError, match=r"names shards that are missing .*model-00002-of-00002"):
        push_folder(d, "alice/x")
    with pytest.raises(MergelabError, match=r"no such directory"):
        push_folder(tmp_path / "nope", "alice/x")
    assert fakehub.requests == []


@pytest.mark.parametrize("repo_id", ["justaname", "a/b/c", "alice/bad--name", "alice/", "alice/x.git"])
def test_bad_repo_id(tmp_path, fakehub, repo_id):
    d = make_model(tmp_path)
    with pytest.raises(MergelabError, match=r"expected OWNER/NAME"):
        push_folder(d, repo_id)
    assert fakehub.requests == []


def test_token_in_a_file_is_never_uploaded(tmp_path, fakehub):
    d = make_model(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"note": DEFAULT_TOKEN}))
    with pytest.raises(MergelabError, match=r"generation_config\.json contains your Hub token; nothing was uploaded"):
        push_folder(d, "alice/x")
    assert fakehub.requests == []


def test_run_directory_without_a_finished_trial_says_so(tmp_path, fakehub):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "resolved.json").write_text("{}")
    (run / "trials.jsonl").write_text("")
    with pytest.raises(MergelabError, match=r"Run .*r1 has no finished trial yet; nothing to export"):
        main(["--debug", "push", str(run), "--repo", "alice/x"])
    assert fakehub.requests == []


def test_run_directory_pushes_its_exported_best(tmp_path, fakehub, monkeypatch):
    run = tmp_path / "runs" / "r2"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "resolved.json").write_text("{}")
    exported = make_model(tmp_path)
    opened = []

    class FakeRunDir:
        @classmethod
        def open(cls, path):
            opened.append(Path(path))
            return cls()

        is_run_dir = staticmethod(lambda p: True)

    def export_best(rd, on_tensor=None):
        assert isinstance(rd, FakeRunDir)
        return exported

    monkeypatch.setitem(sys.modules, "search.rundir", types.SimpleNamespace(RunDir=FakeRunDir))
    monkeypatch.setitem(sys.modules, "search.export", types.SimpleNamespace(export_best=export_best))
    assert main(["push", str(run), "--repo", "alice/best"]) == 0
    assert opened == [run]
    (commit,) = fakehub.commits
    assert commit.files == folder_bytes(exported)


# ---------------------------------------------------------------------------- push RUN --dry-run
FIXTURE_RUNS = Path(__file__).parent / "fixtures" / "runs"


def _run_copy(tmp_path: Path, hub_source: bool) -> Path:
    """The finished-cmaes fixture run, its model paths pointing at this checkout's fixture models
    (with hub_source, the base model named by a Hub id instead)."""
    import shutil

    run = tmp_path / "runs" / "finished-cmaes"
    shutil.copytree(FIXTURE_RUNS / "finished-cmaes", run)
    models = str(FIXTURE_RUNS / "models")
    for name in ("trials.jsonl", "resolved.json", "summary.json", "config.yaml"):
        p = run / name
        text = p.read_text().replace("/work/main/tests/fixtures/runs/models", models)
        if hub_source:
            text = text.replace(f"{models}/base", "acme/base-1b")
        p.write_text(text)
    return run


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("hub_source", [False, True])
def test_dry_run_of_a_run_writes_nothing_and_opens_no_connection(tmp_path, fakehub, capsys, monkeypatch,
                                                                 hub_source):
    run = _run_copy(tmp_path, hub_source)
    before = _tree(tmp_path)
    opened = []
    real_create = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: opened.append(a) or real_create(*a, **k))
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: opened.append(addr) or (_ for _ in ()).throw(
        OSError("a dry run must not connect")))
    assert main(["push", str(run), "--repo", "alice/merged", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(tmp_path) == before and not (run / "best" / "model").exists()
    assert opened == [] and fakehub.requests == []
    assert "The best trial (7) is not exported yet" in out and "Dry run: nothing was uploaded or written." in out
    assert "README.md" in out and "mergelab_recipe.yaml" in out and "# finished-cmaes" in out
    if hub_source:
        assert "Weight sizes unknown without the network" in out and "acme/base-1b" in out
    else:
        from safetensors import safe_open

        with safe_open(str(FIXTURE_RUNS / "models" / "base" / "model.safetensors"), "pt") as f:
            nbytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
        line = next(l for l in out.splitlines() if l.strip().startswith("model.safetensors"))
        assert hub_mod._human(nbytes) in line


# ---------------------------------------------------------------------------- LFS
def test_lfs_objects_already_stored_are_not_sent_again_and_progress_counts_bytes(tmp_path, fakehub):
    d = make_model(tmp_path, sharded=True, card=True)
    sent = []
    push_folder(d, "alice/first", on_bytes=sent.append)
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert len(fakehub.calls("lfs_put")) == 2
    # every byte of every file is read once for the upload (regular files for the commit body)
    assert sum(sent) == sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    before = len(fakehub.requests)
    push_folder(d, "alice/second")  # same objects: the batch answers without upload actions
    later = [r.endpoint for r in fakehub.requests[before:]]
    assert "lfs_batch" in later and "lfs_put" not in later
    assert sorted(f["path"] for f in fakehub.commits[-1].lfs_files) == shards
    assert fakehub.repos["alice/second"].files["main"] == folder_bytes(d)


def test_lfs_upload_refused_by_storage_is_one_message(tmp_path, fakehub, monkeypatch):
    monkeypatch.setattr(hub_mod, "_sleep", lambda s: None)
    fakehub.fail("lfs_batch", 403, message="You have exceeded your storage quota")
    with pytest.raises(MergelabError, match=r"no write access to 'alice'.*storage quota"):
        push_folder(make_model(tmp_path), "alice/full", attempts=2)
    assert fakehub.commits == [] and fakehub.lfs_objects == {}


def test_push_of_a_run_exports_then_uploads_with_progress(tmp_path, fakehub, capsys):
    run = _run_copy(tmp_path, hub_source=False)
    assert main(["push", str(run), "--repo", "alice/from-run"]) == 0
    err = capsys.readouterr().err
    best = run / "best" / "model"
    (commit,) = fakehub.commits
    assert commit.files == folder_bytes(best)
    assert "model.safetensors" in {f["path"] for f in commit.lfs_files}
    # the export counts tensors, the upload bytes; both end complete
    from safetensors import safe_open

    with safe_open(str(best / "model.safetensors"), "pt") as f:
        n = len(list(f.keys()))
    assert re.search(rf"export .* {n}/{n} tensors", err), err
    total = sum(len(b) for b in commit.files.values())
    assert re.search(r"push .* ([\d.]+)/\1 kB", err) and f"{total / 1000:.1f}" in err, err


def test_read_only_folder_without_a_card_is_one_message(tmp_path, fakehub, monkeypatch):
    import errno

    d = make_model(tmp_path)

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(MergelabError, match=r"Cannot write the model card .* into .*merged \(Read-only file system\); "
                                            r"nothing was uploaded"):
        push_folder(d, "alice/ro")
    assert fakehub.requests == [] and not (d / "README.md").exists()
