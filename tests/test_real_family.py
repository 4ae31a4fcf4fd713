"""benchmarks/real_family.py and baseline_pycma.py: the skills' answers, disjoint seeded splits, the
baseline's grouping and in-place task arithmetic (no weights are downloaded: a tiny Llama stands in)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.baseline_pycma import TaskArithmetic  # noqa: E402
from benchmarks.real_family import SKILLS, RealFamilyConfig, make_generators, make_splits  # noqa: E402

WORDS = "apple river stone green table house light water music paper".split()


def test_time_skill_converts_24_to_12_hour_clock():
    gens = make_generators(RealFamilyConfig(), WORDS)
    seen = {}
    rng = random.Random(0)
    for _ in range(3000):
        p, a = gens["time"](rng)
        seen[p] = a
    assert seen["time 00:05 ="] == "12:05 am"
    assert seen["time 12:30 ="] == "12:30 pm"
    assert seen["time 23:59 ="] == "11:59 pm"
    assert seen["time 09:07 ="] == "9:07 am"


def test_date_and_rev_answers():
    gens = make_generators(RealFamilyConfig(), WORDS)
    rng = random.Random(1)
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    for _ in range(200):
        p, a = gens["date"](rng)
        y, m, d = p.removeprefix("date ").removesuffix(" =").split("-")
        assert a == f"{int(d)} {months[int(m) - 1]} {y}" and 1950 <= int(y) <= 2049 and 1 <= int(d) <= 28
        p, a = gens["rev"](rng)
        words = p.removeprefix("rev: ").removesuffix(" =").split()
        assert 3 <= len(words) <= 5 and a.split() == words[::-1]


def test_splits_disjoint_distinct_and_seeded():
    cfg = RealFamilyConfig(val_size=30, test_size=50)
    a = make_splits(cfg, make_generators(cfg, WORDS))
    b = make_splits(cfg, make_generators(cfg, WORDS))
    assert a == b
    for s in SKILLS:
        val, test = [p for p, _ in a[s]["val"]], [p for p, _ in a[s]["test"]]
        assert len(val) == len(set(val)) == 30 and len(test) == len(set(test)) == 50
        assert not set(val) & set(test)
        assert set(val) | set(test) <= a[s]["held_out"] and len(a[s]["held_out"]) == 140
    other = RealFamilyConfig(val_size=30, test_size=50, seed=1)
    assert make_splits(other, make_generators(other, WORDS))["date"] != a["date"]


def test_baseline_groups_and_in_place_task_arithmetic(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    for i, name in enumerate(["base", "x", "y"]):
        torch.manual_seed(i)
        m = LlamaForCausalLM(cfg)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    assert TaskArithmetic._group("model.embed_tokens.weight", 6, 3) == 0
    assert TaskArithmetic._group("model.norm.weight", 6, 3) == 0
    assert [TaskArithmetic._group(f"model.layers.{i}.mlp.up_proj.weight", 6, 3) for i in range(6)] == [1, 1, 2, 2, 3, 3]
    ta = TaskArithmetic(tmp_path, ["x", "y"], 3)
    from safetensors.torch import load_file
    base, x, y = (load_file(tmp_path / n / "model.safetensors") for n in ("base", "x", "y"))
    w = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]
    ta.set(w)
    params = dict(ta.model.named_parameters())
    k = "model.layers.3.self_attn.q_proj.weight"  # group 2
    torch.testing.assert_close(params[k], base[k] + 0.3 * (x[k] - base[k]) + 0.7 * (y[k] - base[k]))
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(params[k], base[k] + 0.1 * (x[k] - base[k]) + 0.5 * (y[k] - base[k]))
    ta.set([[0.0] * 4, [0.0] * 4])  # back to the base exactly: each set starts from the base
    torch.testing.assert_close(params[k], base[k], rtol=0, atol=0)
