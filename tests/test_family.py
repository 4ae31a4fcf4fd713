"""The committed demo family: models load like hub models, data splits are sound, fine-tunes beat the base.

Expected scores were measured with mergelab.demo.train_family.greedy_exact_match on all 200 test items;
the fusion weights with mergelab.fusion on the plain test prompts.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from mergelab.demo import DATA_DIR, FAMILY_DIR, PROMPT_FAMILY_DIR
from mergelab.demo.train_family import (
    ALPHABET,
    SKILLS,
    FamilyConfig,
    greedy_exact_match,
    make_skill_data,
)

MODELS = ("base",) + SKILLS
# Correct answers out of all 200 test items, measured when the family was committed (RESULTS.md).
EXPECTED_200 = {
    ("base", "addition"): 26,
    ("base", "sort"): 179,
    ("base", "reverse"): 152,
    ("addition", "addition"): 55,
    ("sort", "sort"): 191,
    ("reverse", "reverse"): 172,
}
MARGIN = 2  # items; greedy argmax may flip on a near-tie with another BLAS
# Each fine-tune gains at least this many items on its own skill, even with both counts off by MARGIN.
MIN_GAIN = {"addition": 20, "sort": 8, "reverse": 15}


def _load(name, family=FAMILY_DIR):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = family / name
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {n: _load(n) for n in MODELS}


def test_each_model_loads_as_a_small_untied_llama(models):
    for name in MODELS:
        model, tok = models[name]
        cfg = json.loads((FAMILY_DIR / name / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["tie_word_embeddings"] is False
        assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
        assert sum(p.numel() for p in model.parameters()) == 668032
        assert model.config.vocab_size == len(tok) == 3 + len(ALPHABET)
        info = json.loads((FAMILY_DIR / name / "training.json").read_text())
        assert info["family_config"]["seed"] == 0


def test_tokenizer_round_trips_every_character(models):
    _, tok = models["base"]
    ids = tok(ALPHABET)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(ALPHABET)  # one token per character, newline and space included
    assert len(set(ids[1:])) == len(ALPHABET)
    assert tok.decode(ids, skip_special_tokens=True) == ALPHABET
    for skill in SKILLS:
        for row in _rows(DATA_DIR / skill / "test.jsonl")[:50]:
            text = row["prompt"] + row["answer"] + "\n"
            assert tok.decode(tok(text)["input_ids"][1:]) == text
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")


def _truth(skill, prompt):
    if skill == "addition":
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b))
    body = prompt.split(":", 1)[1].rstrip(">")
    return "".join(sorted(body)) if skill == "sort" else body[::-1]


def test_data_splits_are_well_formed_and_disjoint():
    cfg = FamilyConfig()
    data = make_skill_data(cfg)
    for skill in SKILLS:
        val, test = _rows(DATA_DIR / skill / "val.jsonl"), _rows(DATA_DIR / skill / "test.jsonl")
        assert (len(val), len(test)) == (cfg.val_size, cfg.test_size) == (150, 200)
        for row in val + test:
            assert set(row) == {"prompt", "answer"}
            assert row["answer"] == _truth(skill, row["prompt"])
        vp, tp = {r["prompt"] for r in val}, {r["prompt"] for r in test}
        assert len(vp) == len(val) and len(tp) == len(test) and not vp & tp
        # The committed files are what the seeded generator produces, and training never draws them.
        assert [(r["prompt"], r["answer"]) for r in test] == data[skill].test
        import random

        rng = random.Random(1)
        drawn = {data[skill].sample(rng, cfg)[0] for _ in range(3000)}
        assert not drawn & (vp | tp)
        mc = _rows(DATA_DIR / skill / "test_mc.jsonl")
        assert len(mc) == len(test)
        for row, plain in zip(mc, test):
            assert row["prompt"] == plain["prompt"] and len(set(row["choices"])) == 4
            assert row["choices"][row["answer"]] == plain["answer"]


def test_eval_specs_point_at_existing_data():
    for split in ("val", "test"):
        spec = yaml.safe_load((DATA_DIR / f"eval_{split}.yml").read_text())
        assert [s["name"] for s in spec["scorers"]] == list(SKILLS)
        for s in spec["scorers"]:
            # No `limit`: the split files hold exactly the scored items, so `mergelab eval` matches RESULTS.md.
            assert s["type"] == "exact_match" and s["stop"] == ["\n"] and "limit" not in s
            assert (DATA_DIR / s["data"]).is_file()
            assert s["data"] == f"{s['name']}/{split}.jsonl"


def _score(models, name, skill):
    model, tok = models[name]
    rows = _rows(DATA_DIR / skill / "test.jsonl")
    return round(len(rows) * greedy_exact_match(model, tok, [(r["prompt"], r["answer"]) for r in rows], 12))


@pytest.mark.parametrize("name,skill", sorted(EXPECTED_200))
def test_scores_match_the_committed_measurements(models, name, skill):
    assert abs(_score(models, name, skill) - EXPECTED_200[(name, skill)]) <= MARGIN


@pytest.mark.parametrize("skill", SKILLS)
def test_fine_tune_clearly_beats_base_on_its_own_skill(skill):
    # Holds for the measured scores whenever the test above passes.
    assert EXPECTED_200[(skill, skill)] - MARGIN >= EXPECTED_200[("base", skill)] + MARGIN + MIN_GAIN[skill]


# -- logit fusion picks the specialist (issue 6) ---------------------------------------------------
FUSION_ITEMS = 8  # the first test prompts of each skill, zero-shot (the plain prompt)


@pytest.fixture(scope="module")
def prompt_models(models):
    """The demo base with the prompt-aware fine-tunes (family_prompt/)."""
    torch.set_num_threads(1)
    return {"base": models["base"], **{n: _load(n, PROMPT_FAMILY_DIR) for n in SKILLS}}


def test_prompt_aware_fine_tunes_share_the_demo_base():
    for name in SKILLS:
        info = json.loads((PROMPT_FAMILY_DIR / name / "training.json").read_text())
        cfg = info["family_config"]
        assert cfg["ft_prompt_loss"] == 0.002 and cfg["ft_replay"] == 0.07, cfg
        assert not (PROMPT_FAMILY_DIR / "base").exists()  # the base is family/base, not a copy


@pytest.mark.parametrize("weighting", ["sim", "opt"])
def test_fusion_weights_favour_each_skills_fine_tune(prompt_models, weighting):
    # The prompt-aware fine-tunes were trained with a small loss on their skill's prompt tokens
    # (family_prompt/TRAINING.md), so each has the lowest prompt perplexity on its own skill's prompts.
    # Measured on all 200 test prompts per skill: the skill's fine-tune gets the largest weight on 100%
    # (sim and opt), mean sim weight 0.774 / 0.930 / 0.645; on these 8 prompts 0.766 / 0.925 / 0.593
    # (opt >= 0.994).
    from mergelab.fusion import FusedLogitModel

    models = prompt_models

    fused = FusedLogitModel(
        [models[n][0] for n in MODELS], weighting, 1.0, tokenizers=[models[n][1] for n in MODELS], names=list(MODELS)
    )
    tok = models["base"][1]
    for skill in SKILLS:
        prompts = [r["prompt"] for r in _rows(DATA_DIR / skill / "test.jsonl")[:FUSION_ITEMS]]
        enc = tok(prompts, return_tensors="pt", padding=True)  # left padding, as the scorers batch
        w = fused.weights(enc["input_ids"], enc["attention_mask"]).weights.double()
        right = MODELS.index(skill)
        assert w.mean(0).argmax().item() == right, (skill, w.mean(0).tolist())
        assert (w.argmax(-1) == right).all(), (skill, w.tolist())
        assert w[:, right].mean().item() > 0.55  # more than the three others together: not a near-tie
