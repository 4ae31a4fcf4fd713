"""Every kernel an operator declares (`OperatorSpec.kernels`) against that operator's reference
function, tensor by tensor, on every device present: the seam's promise that which kernel runs
never changes a value."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mergelab.engine import JobReader, prepare, run_operator
from mergelab.kernels import inputs as kinputs
from mergelab.kernels import jit_core
from mergelab.kernels.select import REFERENCE, KernelCall, Merged, _impl, applicable, run_job
from mergelab.trial import TrialMerger
from operators import get_operator, operator_names

from conftest import make_llama

DEVICES = ["cpu", "cuda"]


@pytest.fixture(scope="module")
def fam16(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels16")
    base = make_llama(root / "base", 0, dtype=torch.bfloat16)
    return [base] + [make_llama(root / f"ft{i}", i, base=base, dtype=torch.bfloat16) for i in (1, 2, 3)]


def _recipe(fam, op: str, rng: str | None) -> dict:
    weights, densities = (0.6, -0.4, 1.3), (0.3, 0.8, 0.45)
    models = []
    for k, m in enumerate(fam[1:]):
        p = {"weight": weights[k]}
        if op not in ("linear", "task_arithmetic") and get_operator(op).param("density") is not None:
            p["density"] = densities[k]
        models.append({"model": str(m), "parameters": p})
    r = {"merge_method": op, "models": models, "dtype": "float32", "out_dtype": "bfloat16", "seed": 5,
         "parameters": {} if op == "linear" else {"lambda": 1.1}}
    if op == "linear":
        r["parameters"] = {"normalize": False}
    else:
        r["base_model"] = str(fam[0])
    if rng:
        r["rng"] = rng
    return r


def _cases():
    for op in operator_names():
        spec = get_operator(op)
        for k in spec.kernels:
            for rng in ([None, "mergekit"] if spec.uses_random else [None]):
                if k.applies is None or k.applies([{"density": 0.5}], {p.name: p.default for p in spec.params
                                                                       if p.scope == "global"}, rng):
                    yield op, k.name, k.where, rng


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,kernel,where,rng", list(_cases()))
def test_every_kernel_equals_its_operators_reference(fam16, device, op, kernel, where, rng, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CUDA cases run where torch sees a GPU")
    if importlib.util.find_spec("numba") is not None:  # the compiled kernels are under test, also with MERGELAB_JIT=0
        monkeypatch.setattr(jit_core, "AVAILABLE", True)
    spec = get_operator(op)
    kspec = next(k for k in spec.kernels if k.name == kernel and k.where == where)
    if device not in kspec.devices:
        pytest.skip(f"kernel {kernel} ({where}) declares devices {kspec.devices}: the reference runs on {device}")
    dev = torch.device(device)
    plan, sources = prepare(_recipe(fam16, op, rng))
    impl = _impl(kspec.impl)
    merged = 0
    for cache in (["fast", "compact"] if where == "memory" else [None]):
        tm = None
        if where == "memory":
            tm = TrialMerger(plan.recipe.base_model, plan.recipe.model_refs, device=dev, cache=cache, sources=sources)
            tm._assign_tiers(plan)
        for job in plan.jobs:
            if job.copy:
                continue
            reads = {(r.ref, r.tensor): sources[r.ref].get(r.tensor).to(dev, torch.float32)
                     for r in ([job.base] if job.base is not None else []) + list(job.models)}
            base = reads[(job.base.ref, job.base.tensor)] if job.base is not None else None
            want = run_operator(job, plan, base, [reads[(r.ref, r.tensor)] for r in job.models]).to(job.out_dtype)
            dest = torch.empty(job.shape, dtype=torch.float32, device=dev)
            source = tm if tm is not None else JobReader(job, sources, kinputs.Workspace())
            got = impl(KernelCall(plan, job, where, dev, torch.float32, source, dest))
            assert got is not None, f"{kernel} declined {job.name}"  # this family suits every kernel
            got = dest.to(job.out_dtype) if got is True else got
            assert torch.equal(got.cpu().view(torch.int16), want.cpu().view(torch.int16)), (cache, job.name)
            merged += 1
    assert merged > 0


def test_selection_takes_the_first_applicable_kernel_and_names_it(fam16, monkeypatch):
    # dare_ties with mergekit's stream in memory: dare16 first; with the counter stream: chunked
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba (the `fast` extra) is not installed: dare16 is compiled only")
    monkeypatch.setattr(jit_core, "AVAILABLE", True)  # also when the suite runs with MERGELAB_JIT=0
    plan, sources = prepare(_recipe(fam16, "dare_ties", "mergekit"))
    job = next(j for j in plan.jobs if not j.copy)
    tm = TrialMerger(plan.recipe.base_model, plan.recipe.model_refs, cache="fast", sources=sources)
    tm._assign_tiers(plan)
    call = KernelCall(plan, job, "memory", torch.device("cpu"), torch.float32, tm,
                      torch.empty(job.shape, dtype=torch.float32))
    assert [k.name for k in applicable(get_operator("dare_ties"), call)] == ["dare16", "chunked"]
    assert run_job(call) == Merged("dare16", None)
    plan2, _ = prepare(_recipe(fam16, "dare_ties", None))
    call2 = KernelCall(plan2, plan2.jobs[-1], "memory", torch.device("cpu"), torch.float32, tm, None)
    assert [k.name for k in applicable(get_operator("dare_ties"), call2)] == ["chunked"]
    # float64 compute: no declared kernel suits it, the reference runs
    call3 = KernelCall(plan2, plan2.jobs[-1], "disk", torch.device("cpu"), torch.float64,
                       JobReader(plan2.jobs[-1], sources, kinputs.Workspace()))
    assert applicable(get_operator("dare_ties"), call3) == [] and run_job(call3).kernel == REFERENCE



def test_dare16_declines_when_the_compiled_loops_are_off(fam16, monkeypatch):
    # MERGELAB_JIT=0 (or no numba): dare16 cannot build its draw keys, so it declines and the
    # chunked kernel merges the tensor (before, building the keys raised)
    monkeypatch.setattr(jit_core, "AVAILABLE", False)
    plan, sources = prepare(_recipe(fam16, "dare_ties", "mergekit"))
    job = next(j for j in plan.jobs if not j.copy)
    tm = TrialMerger(plan.recipe.base_model, plan.recipe.model_refs, cache="fast", sources=sources)
    tm._assign_tiers(plan)
    assert tm.dare16_sources(job, plan) is None
    call = KernelCall(plan, job, "memory", torch.device("cpu"), torch.float32, tm,
                      torch.empty(job.shape, dtype=torch.float32))
    assert run_job(call) == Merged("chunked", None)

def test_operators_declare_what_the_kernels_recipes_and_search_read_instead_of_names():
    # the chunked/compiled kernels read `weighted_sum` / `task_vector` from the spec, never the name:
    # every operator that declares them says what they compute, and no other operator declares them
    chunked = {op for op in operator_names() if any(k.name == "chunked" for k in get_operator(op).kernels)}
    assert chunked == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"}
    for op in operator_names():
        spec = get_operator(op)
        assert not (spec.weighted_sum and spec.task_vector is not None), op
        declares = spec.weighted_sum or (spec.task_vector is not None
                                         and spec.task_vector.sparsification in ("none", "magnitude", "bernoulli"))
        assert (op in chunked) == declares, op
        if spec.task_vector is not None:
            assert spec.task_vector.name == op
    assert [op for op in operator_names() if get_operator(op).weighted_sum] == ["linear"]
    assert [op for op in operator_names() if get_operator(op).averages_unlisted_base] == ["karcher", "linear"]
    assert [op for op in operator_names() if get_operator(op).layer_source] == \
        ["dare_linear", "dare_ties", "linear", "task_arithmetic", "ties"]
    assert [op for op in operator_names() if get_operator(op).layer_stacking] == ["passthrough"]
