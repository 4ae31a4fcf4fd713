"""Hub repo ids as model sources, resolved by huggingface_hub from a local cache offline."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_dir, write_recipe


def _cache_repo(hf_home: Path, repo: str, src: Path, commit: str) -> None:
    """Lay out a model the way huggingface_hub's cache stores a downloaded snapshot."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_repo_ids_resolve_from_cache_offline(tiny_family, tmp_path):
    hf_home = tmp_path / "hf"
    _cache_repo(hf_home, "acme/tiny-base", tiny_family["base"], "a" * 40)
    _cache_repo(hf_home, "acme/tiny-a", tiny_family["a"], "b" * 40)
    r = write_recipe(tmp_path / "r.yml", {
        "merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-a", "parameters": {"weight": 1.0}}]})
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    p = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(r), str(tmp_path / "out"), "--quiet"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out, a = load_dir(tmp_path / "out"), load_dir(tiny_family["a"])
    assert all(torch.equal(out[k], a[k]) for k in a)
    # a repo that is not cached fails offline with a clear message, before any merging
    r2 = write_recipe(tmp_path / "r2.yml", {
        "merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
        "models": [{"model": "acme/not-cached@v2", "parameters": {"weight": 1.0}}]})
    p = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(r2), str(tmp_path / "out2")],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert "acme/not-cached@v2" in p.stderr and "not in the local Hugging Face cache" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out2").exists()
