"""Faults at the edges of `mergelab merge`: a full disk, a read-only or unwritable output, a merge
killed with SIGKILL (while writing, and in the middle of an --overwrite swap). Each must give one
paragraph and exit 2, or leave OUT as either the old or the new model, never half of one."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import load_dir, write_recipe
from mergelab.cli import main
from mergelab.writer import recover_leftovers

N_TENSORS, ROWS = 24, 512  # two sources of 24 x 512 x 512 float32 = 24 MB each


def _source(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(ROWS, ROWS, generator=g)
               for i in range(N_TENSORS)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": N_TENSORS,
                                                  "architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return _source(root / "a", 1), _source(root / "b", 2)


def _recipe(tmp_path: Path, pair, wa: float, name: str = "r.yml") -> Path:
    a, b = pair
    return write_recipe(tmp_path / name, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": wa}}, {"model": str(b), "parameters": {"weight": 1 - wa}}]})


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}


def _first_value(out: Path) -> float:
    return float(load_dir(out)["model.layers.0.mlp.up_proj.weight"][0, 0])


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, readonly: bool = False):
    """A real tiny filesystem at `path` (root can mount one); None when mounting is not allowed."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(path)], check=True)


def _one_paragraph(err: str) -> str:
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- disk full
def test_disk_too_small_is_refused_before_merging(tmp_path, pair, capsys, monkeypatch):
    """A real 8 MB filesystem for a 24 MB model: refused up front, nothing written there."""
    import shutil

    with _tmpfs(tmp_path / "small", "8m") as disk:
        if disk is None:  # no mount permitted: the same check against a faked free-space answer
            disk = tmp_path / "small"
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=8 * 2**20))
        assert main(["merge", str(_recipe(tmp_path, pair, 0.5)), str(disk / "out"), "--quiet"]) == 2
        line = _one_paragraph(capsys.readouterr().err)
        assert "Not enough disk space" in line and "25.2 MB" in line and "Nothing was written" in line
        assert list(disk.iterdir()) == []


def test_disk_fills_up_mid_merge(tmp_path, pair, capsys, monkeypatch):
    """The disk runs out while shards are written (free space looked sufficient at the start):
    one paragraph, exit 2, the partial directory removed, no OUT."""
    import shutil

    from mergelab import writer

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with _tmpfs(tmp_path / "small", "8m") as disk:
        if disk is None:  # no mount permitted: a writer whose file fails as a full disk does
            disk = tmp_path / "small"
            disk.mkdir(exist_ok=True)
            real_open = open

            class _Full:
                def __init__(self, f):
                    self.f, self.n = f, 0

                def write(self, b):
                    self.n += len(b)
                    if self.n > 8 * 2**20:
                        raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
                    return self.f.write(b)

                def __getattr__(self, k):
                    return getattr(self.f, k)

            monkeypatch.setattr(writer, "open", lambda *a, **k: _Full(real_open(*a, **k)), raising=False)
        assert main(["merge", str(_recipe(tmp_path, pair, 0.5)), str(disk / "out"), "--quiet"]) == 2
        line = _one_paragraph(capsys.readouterr().err)
        assert "disk filled up" in line and "No space left on device" in line and "were removed" in line
        assert list(disk.iterdir()) == []


def test_read_only_output_is_one_paragraph_also_in_dry_run(tmp_path, pair, capsys):
    with _tmpfs(tmp_path / "ro", "1m", readonly=True) as disk:
        if disk is None:
            pytest.fail("mounting a tmpfs is needed to make a read-only filesystem (run the tests as root)")
        for extra in (["--dry-run"], []):
            assert main(["merge", str(_recipe(tmp_path, pair, 0.5)), str(disk / "sub" / "out"), *extra]) == 2
            line = _one_paragraph(capsys.readouterr().err)
            assert f"{disk} is on a read-only filesystem" in line and "Choose an output directory" in line


def test_permission_denied_while_creating_output(tmp_path, pair, capsys, monkeypatch):
    """EACCES from the filesystem (root is never refused by chmod, so the error is injected)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if ".partial-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["merge", str(_recipe(tmp_path, pair, 0.5)), str(tmp_path / "out"), "--quiet"]) == 2
    line = _one_paragraph(capsys.readouterr().err)
    assert "Cannot write the merged model" in line and "Permission denied" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- SIGKILL
def _kill_when_partial(proc: subprocess.Popen, parent: Path, name: str, after_bytes: int) -> Path:
    """SIGKILL `proc` once its partial directory holds `after_bytes` bytes; returns that directory."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in parent.glob(f".{name}.partial-{proc.pid}"):
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            if size >= after_bytes:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return p
        if proc.poll() is not None:
            raise AssertionError(f"the merge ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.002)
    raise AssertionError("the merge never started writing")


def test_sigkilled_merge_leaves_a_partial_the_next_merge_removes(tmp_path, pair, capsys):
    out = tmp_path / "out"
    r = _recipe(tmp_path, pair, 0.5)
    proc = subprocess.Popen([sys.executable, "-m", "mergelab", "merge", str(r), str(out), "--quiet",
                             "--shard-size", "2MB"], env=_env(), stderr=subprocess.PIPE, text=True)
    partial = _kill_when_partial(proc, tmp_path, "out", 4 * 2**20)
    assert partial.is_dir() and not out.exists()  # what a kill leaves today: nothing looks complete
    assert main(["merge", str(r), str(out), "--quiet"]) == 0
    assert f"removed {partial.name}, left by a merge that was killed" in capsys.readouterr().err
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert _first_value(out) == pytest.approx(0.5 * float(load_dir(pair[0])["model.layers.0.mlp.up_proj.weight"][0, 0])
                                              + 0.5 * float(load_dir(pair[1])["model.layers.0.mlp.up_proj.weight"][0, 0]), abs=1e-6)


def test_partial_of_a_live_process_is_left_alone(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    assert recover_leftovers(tmp_path / "out") == []
    assert live.is_dir()


_KILL_IN_SWAP = textwrap.dedent("""
    import os, signal, sys
    from mergelab import writer
    from mergelab.cli import main
    mode = sys.argv[1]
    if mode == "rename":   # a filesystem without atomic exchange: die between the two renames
        writer._exchange = lambda a, b: False
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".old-" in str(b):
                os.kill(os.getpid(), signal.SIGKILL)
        writer.os.replace = replace
    else:                  # die right after the exchange, before the old model is removed
        real = writer._exchange
        def exchange(a, b):
            assert real(a, b), "this filesystem has no atomic exchange"
            os.kill(os.getpid(), signal.SIGKILL)
        writer._exchange = exchange
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("mode", ["rename", "exchange"])
def test_overwrite_killed_mid_swap_leaves_old_or_new_model(tmp_path, pair, mode):
    out = tmp_path / "out"
    assert main(["merge", str(_recipe(tmp_path, pair, 0.5, "old.yml")), str(out), "--quiet"]) == 0
    old_value = _first_value(out)
    new = _recipe(tmp_path, pair, 0.2, "new.yml")
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_SWAP, mode, "merge", str(new), str(out),
                           "--overwrite", "--quiet"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    hidden = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".out."))
    if mode == "rename":
        # killed between the renames: OUT is gone, old and new models wait under hidden names
        assert not out.exists() and hidden == [".out.old", ".out.partial"]
    else:
        # the exchange is one step: OUT is already the new model, the old one is under the partial name
        assert _first_value(out) != old_value and hidden == [".out.partial"]
    expected = old_value if mode == "rename" else _first_value(out)
    # the next merge to OUT (here one refused because OUT exists) restores or cleans first
    assert main(["merge", str(new), str(out), "--quiet"]) == 2
    assert _first_value(out) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert len(load_dir(out)) == N_TENSORS


# ---------------------------------------------------------------------------- recipe values
@pytest.mark.parametrize("change,needle", [
    ({"out_dtype": ["float16"]}, "`out_dtype`: Input should be 'float32', 'float16' or 'bfloat16'"),
    ({"weight": []}, "`models[0].parameters.weight` is an empty list"),
    ({"weight": [{"filter": "self_attn", "value": 0.3}]},
     "`models[0].parameters.weight` has no catch-all entry, so tensors whose names contain none of `self_attn`"),
    ({"weight": [{"filter": "mlp", "value": []}, {"value": 1}]}, "`models[0].parameters.weight[0].value` is an empty list"),
])
def test_bad_values_are_refused_by_the_dry_run_and_the_merge(tmp_path, pair, capsys, change, needle):
    r = {"merge_method": "linear", "models": [{"model": str(pair[0]), "parameters": {"weight": 0.5}},
                                              {"model": str(pair[1]), "parameters": {"weight": 0.5}}]}
    if "weight" in change:
        r["models"][0]["parameters"]["weight"] = change["weight"]
    else:
        r.update(change)
    path = write_recipe(tmp_path / "r.yml", r)
    for extra in (["--dry-run"], []):
        assert main(["merge", str(path), str(tmp_path / "out"), "--quiet", *extra]) == 2
        assert needle in _one_paragraph(capsys.readouterr().err)
        assert not (tmp_path / "out").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_filter_list_with_catch_all_merges(tmp_path, pair):
    r = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(pair[0]), "parameters": {"weight": [{"filter": "layers.0.", "value": 1.0}, {"value": 0.0}]}},
        {"model": str(pair[1]), "parameters": {"weight": [{"filter": "layers.0.", "value": 0.0}, {"value": 1.0}]}}]})
    assert main(["merge", str(r), str(tmp_path / "out"), "--quiet"]) == 0
    got, a, b = load_dir(tmp_path / "out"), load_dir(pair[0]), load_dir(pair[1])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_an_error_mid_merge_is_one_paragraph_without_a_half_bar(tmp_path, pair, capsys, monkeypatch):
    """What the merge command shows when the engine stops part-way (e.g. the non-finite check of a
    merged tensor): the error's paragraph alone on stderr, exit 2, nothing at OUT or beside it."""
    from mergelab import engine
    from mergelab.errors import MergelabError

    real = engine.iter_merged

    def stop_at_third(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 2:
                raise MergelabError("The merged tensor `model.layers.2.mlp.up_proj.weight` holds inf or NaN values.")
            yield item

    monkeypatch.setattr(engine, "iter_merged", stop_at_third)
    assert main(["merge", str(_recipe(tmp_path, pair, 0.5)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: The merged tensor `model.layers.2.mlp.up_proj.weight` holds inf or NaN values."
    assert [p.name for p in tmp_path.iterdir()] == ["r.yml"]
