"""The in-memory trial merger equals the on-disk merge bit for bit, and recomputes only what changed."""
from __future__ import annotations

import logging

import pytest
import torch

from mergelab.engine import merge_to_dir
from mergelab.trial import TrialMerger

from conftest import load_dir


def recipe(fam, method, w=(0.6, 0.4), d=(0.5, 0.7), lam=1.0, seed=0, rng=None):
    models = [{"model": str(fam["a"]), "parameters": {"weight": w[0], "density": d[0]}},
              {"model": str(fam["b"]), "parameters": {"weight": w[1], "density": d[1]}}]
    if method in ("linear",):
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
        return {"merge_method": method, "models": models, "dtype": "float16"}
    out = {"merge_method": method, "base_model": str(fam["base"]), "models": models, "seed": seed,
           "parameters": {"lambda": lam}, "dtype": "float16"}
    if rng is not None:
        out["rng"] = rng
    if method in ("task_arithmetic", "tsv"):
        for m in models:
            m["parameters"].pop("density")
    return out


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "task_arithmetic", "tsv"])
def test_in_memory_equals_disk_bit_for_bit(tiny_family, tmp_path, method):
    r = recipe(tiny_family, method)
    merge_to_dir(r, tmp_path / "out")
    disk = load_dir(tmp_path / "out")
    tm = TrialMerger(None if method == "linear" else str(tiny_family["base"]),
                     [str(tiny_family["a"]), str(tiny_family["b"])])
    mem = tm.state_dict(r)
    assert mem.keys() == disk.keys()
    for k in disk:
        assert mem[k].dtype == disk[k].dtype == torch.float16
        assert torch.equal(mem[k], disk[k]), k
    # and the model's parameters hold exactly those values (fp16 -> fp32 is exact)
    model = tm.apply(r)
    params = dict(model.named_parameters())
    for k in disk:
        assert torch.equal(params[k].detach(), disk[k].float()), k
    if method == "tsv":  # from the kept decompositions, not the reference recomputing them
        assert set(tm.last_stats.kernels) == {"tsv"}


def test_only_changed_tensors_recomputed(tiny_family):
    tm = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])])
    n = len(load_dir(tiny_family["base"]))
    r1 = recipe(tiny_family, "ties")
    tm.apply(r1)
    assert tm.last_stats.changed_tensors == n
    tm.apply(r1)
    assert tm.last_stats.changed_tensors == 0
    # a gradient that changes only layer 1's weight for model a
    r2 = recipe(tiny_family, "ties")
    r2["models"][0]["parameters"]["weight"] = [0.6, 0.9]
    tm.apply(r2)
    per_layer = sum(1 for k in load_dir(tiny_family["base"]) if ".layers.1." in k)
    assert tm.last_stats.changed_tensors == per_layer
    # and the result still equals a fresh merge
    fresh = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])]).apply(r2)
    for (k, p), (_, q) in zip(tm.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), k


def test_streaming_fallback_same_result_and_says_so(tiny_family, caplog):
    r = recipe(tiny_family, "dare_ties")
    cached = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])]).state_dict(r)
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        tm = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])], max_memory=1000)
        streamed = tm.state_dict(r)
        tm.state_dict(r)
    assert sum("stream from disk" in m for m in caplog.messages) == 1
    assert all(torch.equal(cached[k], streamed[k]) for k in cached)


def test_dare_draws_are_drawn_once_per_seed_and_still_equal_disk(tiny_family, tmp_path):
    tm = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])], cache="fast")
    tm.state_dict(recipe(tiny_family, "dare_ties", seed=3, rng="mergekit"))
    cached = {k: [id(u) for u in v if u is not None] for k, v in tm._draws.items()}
    assert cached and all(k[0] == 3 and len(v) == 2 for k, v in cached.items())
    # another candidate with the search's seed: masks come from the same cached numbers
    r2 = recipe(tiny_family, "dare_ties", w=(0.3, 0.9), d=(0.2, 0.8), seed=3, rng="mergekit")
    mem = tm.state_dict(r2)
    assert {k: [id(u) for u in v if u is not None] for k, v in tm._draws.items()} == cached
    merge_to_dir(r2, tmp_path / "out")
    disk = load_dir(tmp_path / "out")
    assert all(torch.equal(mem[k], disk[k]) for k in disk)
    # a new seed replaces the draws (and still merges what the disk path merges)
    r3 = recipe(tiny_family, "dare_ties", seed=4, rng="mergekit")
    mem3 = tm.state_dict(r3)
    assert tm._draws and {k[0] for k in tm._draws} == {4}
    merge_to_dir(r3, tmp_path / "out3")
    disk3 = load_dir(tmp_path / "out3")
    assert all(torch.equal(mem3[k], disk3[k]) for k in disk3)


def test_cache_tiers_fall_back_per_tensor_under_max_memory(tiny_family, caplog):
    models = [str(tiny_family["a"]), str(tiny_family["b"])]
    r = recipe(tiny_family, "ties")
    probe = TrialMerger(str(tiny_family["base"]), models, cache="fast")
    plan = probe.plan(r)
    stored, fast = probe.cache_bytes(plan, "stored"), probe.cache_bytes(plan, "fast")
    assert fast > 3 * stored  # float32 copies, task vectors and orders on top of the sources
    ref = probe.state_dict(r)
    assert set(probe._tiers.values()) == {"fast"}
    # the fast tier does not fit, the stored one does: every tensor stays in memory, as stored
    tm = TrialMerger(str(tiny_family["base"]), models, cache="fast", max_memory=stored)
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        got = tm.state_dict(r)
    assert "stream from disk" not in caplog.text and "stored" in set(tm._tiers.values())
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # half the stored tier fits: the other tensors stream from disk, said once, same values
    tm = TrialMerger(str(tiny_family["base"]), models, max_memory=stored // 2)
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        got = tm.state_dict(r)
        tm.state_dict(r)
    tiers = list(tm._tiers.values())
    assert 0 < tiers.count("disk") < len(tiers) and tiers.count("fast") == 0
    assert sum("stream from disk" in m for m in caplog.messages) == 1
    assert f"{tiers.count('disk')} of {len(tiers)} tensors" in caplog.text
    assert sum(t.numel() * t.element_size() for t in tm._stored.values()) <= stored // 2
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def family16(request, tmp_path_factory):
    # 16-bit checkpoints (what the trial's DARE pass reads as stored); hidden 40 (an even head
    # size): tensors of 40 to 3,200 elements, the norms shorter than one carry step of the L1 sum
    from conftest import make_llama

    root = tmp_path_factory.mktemp(f"fam16_{str(request.param)[6:]}")
    kw = dict(hidden=40, dtype=request.param)
    base = make_llama(root / "base", 0, **kw)
    return [base] + [make_llama(root / f"ft{i}", i, base=base, **kw) for i in (1, 2, 3)]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_from_16bit_sources_equals_disk_and_torch_path(family16, tmp_path, monkeypatch, method):
    # the 16-bit pass (sources as stored, 1-byte draw keys) writes what `mergelab merge` writes and
    # what the torch kernels give (compiled loops off), over several candidates of one search
    from mergelab.kernels import cached, jit_core

    import importlib.util

    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba (the `fast` extra) is not installed: the 16-bit pass is compiled only")
    monkeypatch.setattr(jit_core, "AVAILABLE", True)  # also when the suite runs with MERGELAB_JIT=0
    calls = []
    real = cached.dare16_into
    monkeypatch.setattr(cached, "dare16_into", lambda *a: calls.append(real(*a)) or calls[-1])
    base, *fts = (str(p) for p in family16)
    tm = TrialMerger(base, fts, cache="fast")
    for i, (w, d) in enumerate((((0.5, 0.3, 0.2), (0.5, 0.6, 0.7)), ((0.9, -0.4, 0.3), (0.1, 0.95, 0.33)),
                                ((0.2, 0.2, 0.6), (0.5, 0.5, 0.5)))):
        r = {"merge_method": method, "base_model": base, "seed": 11, "dtype": "float16", "rng": "mergekit",
             "parameters": {"lambda": 1.0 + 0.1 * i, "normalize": i != 1},
             "models": [{"model": m, "parameters": {"weight": w[k], "density": d[k]}} for k, m in enumerate(fts)]}
        model = tm.apply(r)
        params = dict(model.named_parameters())
        merge_to_dir(r, tmp_path / f"out{i}")
        disk = load_dir(tmp_path / f"out{i}")
        for k in disk:
            assert torch.equal(params[k].detach(), disk[k].float()), (i, k)
        monkeypatch.setattr(jit_core, "AVAILABLE", False)  # the torch kernels, same candidate
        ref = TrialMerger(base, fts).state_dict(r)
        monkeypatch.setattr(jit_core, "AVAILABLE", True)
        assert all(torch.equal(ref[k], disk[k]) for k in disk)
    assert calls == [True] * (3 * len(disk))  # every tensor of every candidate took the pass
    assert tm._draws == {} and tm._deltas == {}  # no float32 draws or task vectors held
    # no L1 rescale: not the 16-bit pass (not even tried), the float32 kernels, the same values
    r["parameters"]["rescale"] = False
    params = dict(tm.apply(r).named_parameters())
    merge_to_dir(r, tmp_path / "out_norescale")
    disk = load_dir(tmp_path / "out_norescale")
    assert all(torch.equal(params[k].detach(), disk[k].float()) for k in disk)
    assert len(calls) == 3 * len(disk) and tm._draws


def test_ties_from_16bit_sources_equals_disk_and_torch_path(family16, tmp_path, monkeypatch):
    # TIES candidates read the 16-bit sources as stored (thresholds from the cached order): the same
    # values as `mergelab merge` and as the torch kernels
    import importlib.util

    from mergelab.kernels import jit_core, jit_taskvec

    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba (the `fast` extra) is not installed: the 16-bit pass is compiled only")
    monkeypatch.setattr(jit_core, "AVAILABLE", True)
    calls = []
    real = jit_taskvec.cut16_pass
    monkeypatch.setattr(jit_taskvec, "cut16_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, *fts = (str(p) for p in family16)
    tm = TrialMerger(base, fts, cache="fast")
    for i, (w, d) in enumerate((((0.5, 0.3, 0.2), (0.5, 0.6, 0.7)), ((0.9, -0.4, 0.3), (0.1, 0.95, 0.33)))):
        r = {"merge_method": "ties", "base_model": base, "dtype": "float16",
             "parameters": {"lambda": 1.0 + 0.1 * i, "normalize": i != 1},
             "models": [{"model": m, "parameters": {"weight": w[k], "density": d[k]}} for k, m in enumerate(fts)]}
        params = dict(tm.apply(r).named_parameters())
        merge_to_dir(r, tmp_path / f"out{i}")
        disk = load_dir(tmp_path / f"out{i}")
        assert all(torch.equal(params[k].detach(), disk[k].float()) for k in disk)
        monkeypatch.setattr(jit_core, "AVAILABLE", False)
        ref = TrialMerger(base, fts).state_dict(r)
        monkeypatch.setattr(jit_core, "AVAILABLE", True)
        assert all(torch.equal(ref[k], disk[k]) for k in disk)
    assert len(calls) == 2 * len(disk)  # every tensor of both candidates


def test_non_finite_candidate_raises_a_typed_error(tiny_family):
    from mergelab.errors import NonFiniteMergeError

    tm = TrialMerger(None, [str(tiny_family["a"]), str(tiny_family["b"])])
    bad = {"merge_method": "linear", "dtype": "float16", "parameters": {"normalize": False},
           "models": [{"model": str(tiny_family[k]), "parameters": {"weight": 3e5}} for k in ("a", "b")]}
    with pytest.raises(NonFiniteMergeError) as e:
        tm.apply(bad)
    assert e.value.tensor == "lm_head.weight" and e.value.count > 0  # the plan's first tensor
    good = recipe(tiny_family, "linear")
    tm.apply(good)  # the next candidate merges normally
    assert all(torch.isfinite(p).all() for p in tm.model.parameters())


def test_auto_cache_takes_the_fast_tier_only_while_it_fits_half_the_free_memory(tiny_family, monkeypatch):
    from mergelab import trial

    models = [str(tiny_family["a"]), str(tiny_family["b"])]
    r = recipe(tiny_family, "ties")
    roomy = TrialMerger(str(tiny_family["base"]), models)
    ref = roomy.state_dict(r)
    assert set(roomy._tiers.values()) == {"fast"}
    fast = roomy.cache_bytes(roomy.plan(r), "fast")
    monkeypatch.setattr(trial, "_available_memory", lambda: 2 * fast - 2)  # half of it is just too little
    tight = TrialMerger(str(tiny_family["base"]), models)
    got = tight.state_dict(r)
    assert set(tight._tiers.values()) == {"stored"} and not tight._deltas
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="auto, compact or fast"):
        TrialMerger(str(tiny_family["base"]), models, cache="small")


def test_tsv_cache_counts_the_parts_its_kernel_keeps(tiny_family):
    """TSV's kernel keeps one float32 tensor per source read (the base and each decorrelated part)
    in any tier; the budget counts them instead of the fast tier's task vectors."""
    r = recipe(tiny_family, "tsv")
    tm = TrialMerger(str(tiny_family["base"]), [str(tiny_family["a"]), str(tiny_family["b"])], cache="compact")
    plan = tm.plan(r)
    elements = sum(n for job in plan.jobs for n in tm._reads(job).values())
    ta_bytes = tm.cache_bytes(tm.plan(recipe(tiny_family, "task_arithmetic")), "stored")
    assert tm.cache_bytes(plan, "stored") == ta_bytes + 4 * elements
    assert tm.cache_bytes(plan, "fast") == tm.cache_bytes(plan, "stored")
    tm.apply(r)
    kept = sum(t.numel() for v in tm._derived.values() for t in (v[0], *v[1]))
    assert kept == elements  # what the kernel holds is what was counted
