"""Device check for issue 16 (needs CUDA): `python benchmarks/device_check_issue16.py` builds a layer
stack on the GPU and compares its logits with the disk merge, and merges sce / nuslerp / multislerp /
karcher on CPU and CUDA (max |d|). Not yet run on a GPU (no device was lent to the session)."""
import sys, time, torch
sys.path[:0] = [".", "tests"]
from pathlib import Path
from conftest import make_llama
from mergelab.engine import merge_to_dir
from mergelab.stack import StackBuilder
from transformers import AutoModelForCausalLM
root = Path("/tmp/h16gpu"); root.mkdir(exist_ok=True)
b = make_llama(root / "base", 0, layers=4, dtype=torch.bfloat16)
a = make_llama(root / "a", 1, layers=4, base=b, dtype=torch.bfloat16)
c = make_llama(root / "c", 2, layers=4, base=b, dtype=torch.bfloat16)
rec = {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
    {"sources": [{"model": str(c), "layer_range": [1, 2]}], "parameters": {"scale": [{"filter": "o_proj", "value": 0.7}, {"value": 1.0}]}},
    {"sources": [{"model": str(c), "layer_range": [2, 4]}]}]}
sb = StackBuilder([str(a), str(c)], device="cuda")
t0 = time.perf_counter(); m = sb.build(rec); t1 = time.perf_counter(); m = sb.build(rec); t2 = time.perf_counter()
print("stack build on", next(m.parameters()).device, f"first {t1-t0:.3f}s again {t2-t1:.4f}s")
merge_to_dir(rec, root / "disk", device="cuda", overwrite=True)
d = AutoModelForCausalLM.from_pretrained(root / "disk", dtype=torch.float32).cuda().eval()
x = torch.randint(0, 64, (2, 10), device="cuda")
with torch.no_grad():
    print("candidate logits == disk merge logits (cuda):", torch.equal(m(x).logits, d(x).logits))
from safetensors.torch import load_file
for meth, extra in [("sce", {"parameters": {"select_topk": 0.5}}), ("nuslerp", {"w": True}), ("multislerp", {"w": True}), ("karcher", {})]:
    models = [{"model": str(a)}, {"model": str(c)}]
    if extra.get("w"):
        models = [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(c), "parameters": {"weight": 0.7}}]
    r = {"merge_method": meth, "base_model": str(b), "models": models, **({k: v for k, v in extra.items() if k != "w"})}
    outs = {}
    for dev in ("cpu", "cuda"):
        merge_to_dir(r, root / f"{meth}_{dev}", device=dev, overwrite=True)
        outs[dev] = load_file(root / f"{meth}_{dev}" / "model.safetensors")
    diff = max((outs["cpu"][k].float() - outs["cuda"][k].float()).abs().max().item() for k in outs["cpu"])
    neq = sum(int((outs["cpu"][k] != outs["cuda"][k]).sum()) for k in outs["cpu"])
    print(f"{meth}: cpu vs cuda max|d| {diff:.3g}, entries differing {neq}")
