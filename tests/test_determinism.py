"""The same recipe gives bit-identical merged weights for any torch thread count: the L1 sums of
DARE/DELLA's rescale are fixed-order, in the operators and in the chunked kernels alike."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergelab.engine import merge_to_dir
from mergelab.trial import TrialMerger
from operators import sparsify as sp

from conftest import load_dir, make_llama

METHODS = ["dare_ties", "dare_linear", "della", "ties"]


class threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self._old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self._old)
        return False


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    # a 640K-entry embedding and lm_head: far above torch's parallel grain (32768), so a plain
    # .sum() over them is split across threads
    root = tmp_path_factory.mktemp("wide")
    kw = {"layers": 1, "hidden": 32, "vocab": 20000}
    base = make_llama(root / "base", 0, **kw)
    return {"base": base, "a": make_llama(root / "ft_a", 1, base=base, **kw),
            "b": make_llama(root / "ft_b", 2, base=base, **kw)}


def _recipe(fam, method: str) -> dict:
    params = {"density": 0.4}
    if method == "della":
        params["epsilon"] = 0.1
    r = {"merge_method": method, "base_model": str(fam["base"]), "seed": 7, "dtype": "float32",
         "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.7, **params}},
                    {"model": str(fam["b"]), "parameters": {"weight": 0.5, **params}}]}
    if method == "ties":
        r["parameters"] = {"rescale": True}  # TIES with mergekit's L1 rescale
    return r


def test_l1_norm_is_the_same_for_any_thread_count():
    x = torch.randn(2_000_003, generator=torch.Generator().manual_seed(3))
    sums = []
    for n in (1, 2, 3):
        with threads(n):
            sums.append(sp.l1_norm(x))
    assert sums[0].dtype == torch.float32
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    # within float32 rounding of the exact (float64) sum
    assert abs(sums[0].item() / x.double().abs().sum().item() - 1) < 1e-6
    # hand-checkable small cases: shorter than a block, one block plus a tail, empty
    assert sp.l1_norm(torch.tensor([1.0, -2.0, 3.5])).item() == 6.5
    y = torch.full((3 * 65536 + 5,), -0.25)  # exact in float32 in any order
    assert sp.l1_norm(y).item() == 0.25 * (3 * 65536 + 5)
    assert sp.l1_norm(torch.empty(0)).item() == 0.0


@pytest.mark.parametrize("method", ["bernoulli", "della", "magnitude"])
def test_sparsify_l1_rescale_independent_of_threads(method):
    delta = torch.randn(1024, 1500, generator=torch.Generator().manual_seed(5))
    outs = []
    for n in (1, 2):
        d = delta.clone()
        g = torch.Generator().manual_seed(11)
        with threads(n):
            if method == "bernoulli":
                sp.bernoulli_(d, 0.3, g, rescale="l1")
            elif method == "della":
                sp.della_(d, 0.3, 0.1, g, rescale="l1")
            else:
                sp.magnitude_(d, 0.3, rescale="l1")
        outs.append(d)
    assert torch.equal(outs[0], outs[1])
    # the rescale keeps the L1 norm (up to the float32 rounding of the product)
    assert abs(sp.l1_norm(outs[0]).item() / sp.l1_norm(delta).item() - 1) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_disk_merge_independent_of_threads_and_equal_to_trial(wide_family, tmp_path, method):
    r = _recipe(wide_family, method)
    with threads(1):
        merge_to_dir(r, tmp_path / "t1")
    with threads(2):
        merge_to_dir(r, tmp_path / "t2")
        tm = TrialMerger(str(wide_family["base"]), [str(wide_family["a"]), str(wide_family["b"])])
        mem = tm.state_dict(r)
    one, two = load_dir(tmp_path / "t1"), load_dir(tmp_path / "t2")
    assert one.keys() == two.keys() == mem.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
        assert torch.equal(one[k], mem[k]), k
    # the merge did sparsify: the embedding differs from the base's
    base = load_dir(wide_family["base"])
    assert not torch.equal(one["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_merge_in_a_subprocess_with_three_threads(wide_family, tmp_path):
    r = _recipe(wide_family, "dare_ties")
    with threads(1):
        merge_to_dir(r, tmp_path / "here")
    script = (
        "import json, sys, torch; torch.set_num_threads(3)\n"
        "from mergelab.engine import merge_to_dir\n"
        "merge_to_dir(json.loads(sys.argv[1]), sys.argv[2])\n"
        "print(torch.get_num_threads())\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(r), str(tmp_path / "there")],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    here, there = load_dir(tmp_path / "here"), load_dir(tmp_path / "there")
    assert here.keys() == there.keys()
    for k in here:
        assert torch.equal(here[k], there[k]), k
