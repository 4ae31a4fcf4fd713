"""Tests of cross-tokenizer logit fusion: the vocabulary map, permuted and coarser tokenizers, the
cached re-tokenizing member against full forwards, the refusals, the CLI flag and recipe parameter."""
from __future__ import annotations

import random

import pytest
import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.fusion import FusedLogitModel, _CrossMember, _member, load_fusion
from mergelab.fusion_vocab import (
    _codes,
    _distance_table,
    build_vocab_map,
    edit_distance,
    normalize_token,
    token_texts,
    tokenizer_scheme,
    tokenizer_vocab_map,
)
from test_fusion import _left_pad, _tiny_llama  # the same tiny Llamas and padding as test_fusion

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+=,>-abcdefgh ")
# The coarse tokenizer's merges, in rank order: ("b", "d") before ("a", "b") makes "abd" read as
# a + bd, so appending "d" to "ab" changes an earlier own token into two new ones.
MERGES = [("b", "d"), ("1", "2"), ("+", "="), ("a", "b"), ("ab", "c"), ("c", "d"), ("e", "f"), ("ef", "g")]


# -- helpers ---------------------------------------------------------------------------------------
def _fast(tok, path=None):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if path is not None:
        fast.save_pretrained(path)
    return fast


def _wordlevel(vocab, path=None):
    """A one-character-per-token tokenizer with the given token -> id vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _fast(tok, path)


def _char_vocab():
    return {t: i for i, t in enumerate(SPECIALS + CHARS)}


def _coarse(path=None):
    """A BPE over the same characters with multi-character tokens ("12", "+=", "abc", ...); its
    ids are unrelated to the char tokenizer's (the specials last)."""
    from tokenizers import Tokenizer, decoders, models

    merged = [a + b for a, b in MERGES]
    tokens = list(reversed(CHARS)) + merged + SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, MERGES, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return _fast(tok, path)


def _ids(tok, text):
    """<s> + the characters of text, in the char tokenizer's ids."""
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


def _last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _mean_ce(model, ids):
    """Reference ℓ: mean cross-entropy of tokens 1.. of one unpadded row."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids))) / (len(ids) - 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A (char tokenizer), its permuted twin B, a coarse-tokenizer model C, a second char model D."""
    root = tmp_path_factory.mktemp("xtok")
    vocab = _char_vocab()
    tok_a = _wordlevel(vocab, root / "a")
    a = _tiny_llama(len(vocab), 1, root / "a")
    perm = list(range(len(vocab)))
    random.Random(0).shuffle(perm)  # token of A-id i has B-id perm[i]; specials included
    tok_b = _wordlevel({t: perm[i] for t, i in vocab.items()}, root / "b")
    b = _tiny_llama(len(vocab), 9)
    inv = torch.tensor(perm).argsort()  # B row j holds A row inv[j]
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.model.embed_tokens.weight.copy_(a.model.embed_tokens.weight[inv])
        b.lm_head.weight.copy_(a.lm_head.weight[inv])
    b.save_pretrained(root / "b")
    tok_c = _coarse(root / "c")
    c = _tiny_llama(len(tok_c.get_vocab()), 2, root / "c")
    d = _tiny_llama(len(vocab), 3, root / "d")
    _wordlevel(vocab, root / "d")
    return {"root": root, "a": a, "b": b, "c": c, "d": d, "tok_a": tok_a, "tok_b": tok_b, "tok_c": tok_c,
            "perm": perm}


# -- the vocabulary map ----------------------------------------------------------------------------
def test_edit_distance_hand_values_and_the_batched_table():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    rng = random.Random(1)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 6))) for _ in range(40)]
    for length in range(7):
        qs = [w for w in words if len(w) == length]
        for m in range(7):
            cs = [w for w in words if len(w) == m]
            if qs and cs:
                got = _distance_table(_codes(qs, length), _codes(cs, m))
                assert got.tolist() == [[edit_distance(q, c) for c in cs] for q in qs]


def test_map_exact_nearest_ties_specials_on_hand_made_vocabularies():
    other = ["help", "hellos", "hell", "jello", "cut", "cot", "abc", "abce", "beta", "a", "x", "<s>", "hello"]
    pivot = [
        "hello",  # 0 identical text: 12
        "hellp",  # 1 "hello" is 1 away at the same length (δ 0): 12; nothing nearer exists
        "hellx",  # 2 the same: 12
        "cat",  # 3 "cut" and "cot" both 1 away, same length: the lower id, 4
        "abcd",  # 4 "abc" (d 1, δ 1) and "abce" (d 1, δ 0): the smaller length difference, 7
        "zeta",  # 5 no token starts with z: all tokens are candidates; "beta" is 1 away: 8
        "",  # 6 empty: all tokens; the shortest, "a" (9) and "x" (10), are 1 away: the lower id
        "<bos>",  # 7 a special: by role, 11
        "hel",  # 8 "help" (0) and "hell" (2) are 1 away, both 4 long: the lower id, 0
        "jell",  # 9 only "jello" starts with j ("hell" is 1 away too, but starts with h): 3
        None,  # 10 no such id: the fallback, 3
        "x",  # 11 identical text: 10
    ]
    m = build_vocab_map(pivot, other, specials={7: 11}, exclude=[11], fallback=3)
    assert m.ids.tolist() == [12, 12, 12, 4, 7, 8, 9, 11, 0, 3, 3, 10]
    assert m.distance.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
    assert (m.exact, m.special, m.nearest) == (2, 1, 8)
    # without "hello": "hell" and "hellos" are both 1 away and 1 longer or shorter: the shorter
    # wins ("help" is 2 away)
    m2 = build_vocab_map(["hello"], ["help", "hellos", "hell", "jello"])
    assert m2.ids.tolist() == [2] and m2.distance.tolist() == [1]
    # an excluded other id is no candidate even for identical text
    m3 = build_vocab_map(["<s>", "ab"], ["<s>", "ab", "<"], exclude=[0])
    assert m3.ids.tolist() == [2, 1]


def _reference_map(pivot, other):
    """The documented rule, by brute force: exact text (lowest id), else among the candidates
    sharing the query's prefix (a space and the next character, else the first character, else
    all) the least (distance, |length difference|, length, id)."""
    def prefix(t):
        return t[:2] if len(t) > 1 and t[0] == " " else t[:1]

    out = []
    for t in pivot:
        same = [i for i, o in enumerate(other) if o == t]
        if same:
            out.append(same[0])
            continue
        cands = list(range(len(other)))
        for p in (prefix(t), t[:1]):
            sub = [i for i in cands if p and other[i].startswith(p)] if p else []
            if sub:
                cands = sub
                break
        out.append(min(cands, key=lambda i: (edit_distance(t, other[i]), abs(len(other[i]) - len(t)),
                                             len(other[i]), i)))
    return out


def test_map_equals_the_brute_force_rule_on_random_vocabularies():
    rng = random.Random(5)

    def word():
        w = "".join(rng.choice("abcé") for _ in range(rng.randint(1, 7)))
        return (" " + w) if rng.random() < 0.5 else w

    for case in range(4):
        other = list(dict.fromkeys(word() for _ in range(300)))
        pivot = [word() for _ in range(150)] + ["", "zz", " z"]
        m = build_vocab_map(pivot, other)
        assert m.ids.tolist() == _reference_map(pivot, other), case
        assert m.distance.tolist() == [edit_distance(t, other[i]) for t, i in zip(pivot, m.ids.tolist())]


def test_normalizations_byte_level_sentencepiece_and_byte_tokens():
    assert normalize_token("Ġhello", "byte_level") == " hello"
    assert normalize_token("ĊĊ", "byte_level") == "\n\n"
    assert normalize_token("Ã¤", "byte_level") == "ä"  # bytes C3 A4
    assert normalize_token("Ã", "byte_level") == "\udcc3"  # a lone lead byte: surrogate-escaped
    assert normalize_token("▁the", "sentencepiece") == " the"
    assert normalize_token("<0x0A>", "sentencepiece") == "\n"
    assert normalize_token("<0xC3>", "sentencepiece") == "\udcc3"
    assert normalize_token("Ġ<s>", "byte_level", literal=True) == "Ġ<s>"
    assert normalize_token("a▁b", "plain") == "a▁b"


def test_tokenizer_map_between_byte_level_and_sentencepiece_vocabularies():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bl_tokens = ["<s>", "</s>", "Ġhello", "Ċ", "Ã¤", "Ã", "world", "Ġworl"]
    bl = Tokenizer(models.BPE({t: i for i, t in enumerate(bl_tokens)}, [], unk_token=None))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    sp_tokens = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "▁hello", "ä", "▁world", "wor"]
    sp = Tokenizer(models.BPE({t: i for i, t in enumerate(sp_tokens)}, [], unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    from transformers import PreTrainedTokenizerFast

    f_bl = PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<s>", eos_token="</s>")
    f_sp = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer_scheme(f_bl) == "byte_level" and tokenizer_scheme(f_sp) == "sentencepiece"
    assert token_texts(f_bl)[2] == " hello" and token_texts(f_sp)[5] == " hello"
    m = tokenizer_vocab_map(f_bl, f_sp)
    # <s>, </s> by role; " hello", "\n", "ä", the lone byte C3 exactly; "world" -> "wor" (d 2,
    # same first letter; " world" starts with a space); " worl" -> " world" (d 1)
    assert m.ids.tolist() == [1, 2, 5, 3, 6, 4, 8, 7]
    assert (m.special, m.exact, m.nearest) == (2, 4, 2)


# -- cross-tokenizer members -----------------------------------------------------------------------
def test_permuted_twin_equals_the_model_itself(world):
    a, b, tok_a, tok_b, perm = world["a"], world["b"], world["tok_a"], world["tok_b"], world["perm"]
    fused = FusedLogitModel([a, b], "sim", tokenizers=[tok_a, tok_b], names=["A", "B"], cross_tokenizer=True)
    assert fused.cross_names == ["B"]
    member = fused.members[1]
    assert isinstance(member, _CrossMember)
    assert member.map.tolist() == perm  # every token exactly, the specials by role
    rows = [_ids(tok_a, "12+3=4"), _ids(tok_a, "ab,c"), _ids(tok_a, "7")]
    ids, mask = _left_pad(rows)
    with torch.inference_mode():  # as FusedLogitModel calls its members
        ell_b, last_b, _ = member.prompt(ids, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(last_b, la[:, -1], atol=1e-6)
    ref = torch.tensor([_mean_ce(a, r) for r in rows], dtype=torch.float64)
    assert torch.allclose(ell_b[:, 0].double(), ref, atol=1e-5)
    got = fused.generate_greedy(ids, mask, max_new_tokens=8)
    assert got == FusedLogitModel([a]).generate_greedy(ids, mask, max_new_tokens=8)
    w = fused.last_weights
    assert torch.allclose(w.log_ppl[:, 0], w.log_ppl[:, 1], atol=1e-6)
    assert torch.allclose(w.weights, torch.full((3, 2), 0.5), atol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(fused.weights(ids, mask).weights, w.weights)


def test_opt_in_with_identical_tokenizers_changes_nothing(world):
    a, d, tok_a = world["a"], world["d"], world["tok_a"]
    ids, mask = _left_pad([_ids(tok_a, "12+3="), _ids(tok_a, "abc")])
    for weighting in ("sim", "opt", "top1"):
        plain = FusedLogitModel([a, d], weighting, tokenizers=[tok_a, tok_a])
        opted = FusedLogitModel([a, d], weighting, tokenizers=[tok_a, tok_a], cross_tokenizer=True)
        assert opted.cross_names == [] and not any(isinstance(m, _CrossMember) for m in opted.members)
        assert opted.generate_greedy(ids, mask, 6) == plain.generate_greedy(ids, mask, 6)
        assert torch.equal(opted.last_weights.weights, plain.last_weights.weights)


def test_coarse_tokenizer_member_steps_equal_full_forwards(world):
    """Each step's mapped logits equal a full forward of C over the re-tokenized text: appends,
    merges that change the last own token (the cache crop path), a change into two new tokens,
    rows of different lengths (left padding), a finished row left alone."""
    a, c, tok_a, tok_c = world["a"], world["c"], world["tok_a"], world["tok_c"]
    fused = FusedLogitModel([a, c], "sim", tokenizers=[tok_a, tok_c], names=["A", "C"], cross_tokenizer=True)
    m = fused.members[1]
    prompts = ["01", "7+", "a", "e"]
    # the pivot characters appended per step, per row
    script = ["2+=abd", "=12ab3", "bcd12+", "fg1ab2"]
    rows = [_ids(tok_a, p) for p in prompts]
    ids, mask = _left_pad(rows)

    def expected(text):
        own = [tok_c.bos_token_id] + tok_c.encode(text, add_special_tokens=False)
        return own, _last_logits(c, own)[m.map]

    with torch.inference_mode():
        ell, last, state = m.prompt(ids, mask)
    for r, p in enumerate(prompts):
        own, want = expected(p)
        assert state["own"][r] == own
        assert torch.allclose(last[r], want, atol=1e-5)
        assert ell[r, 0].item() == pytest.approx(_mean_ce(c, own), abs=1e-5)
    texts = list(prompts)
    crops = 0
    for step in range(len(script[0])):
        skip = [step >= 4 and r == 3 for r in range(4)]  # row 3 finished after 4 steps
        tokens = [tok_a.convert_tokens_to_ids(script[r][step]) for r in range(4)]
        before = [list(o) for o in state["own"]]
        with torch.inference_mode():
            out = m.step(state, tokens, skip)
        for r in range(4):
            if not skip[r]:
                texts[r] += script[r][step]
            own, want = expected(texts[r])
            assert state["own"][r] == own, (step, r)
            assert torch.allclose(out[r], want, atol=1e-5), (step, r, (out[r] - want).abs().max())
            if own[: len(before[r])] != before[r]:
                crops += 1
            # the cache holds every own token once, unmasked; replaced ones are masked out
            assert int(state["mask"][r].sum()) == len(own)
    assert crops >= 6  # "12", "+=", "ab", "abd" -> a + bd, "abc", "cd", "ef", "efg" ...
    assert state["mask"].shape[1] > max(len(o) for o in state["own"])  # masked slots remain
    # "abd" is a + bd: one step fed two new own tokens
    assert tok_c.convert_ids_to_tokens(state["own"][0][-2:]) == ["a", "bd"]


def test_coarse_fusion_generation_equals_full_recomputation(world):
    """[A, D, C]: D shares A's tokenizer (the plain cached path), C does not; the tokens are the
    argmax of the weighted logits recomputed from scratch at every step."""
    a, c, d, tok_a, tok_c = world["a"], world["c"], world["d"], world["tok_a"], world["tok_c"]
    fused = FusedLogitModel([a, d, c], "sim", tau=2.0, tokenizers=[tok_a, tok_a, tok_c], cross_tokenizer=True)
    assert [type(x).__name__ for x in fused.members] == ["_HFMember", "_HFMember", "_CrossMember"]
    m = fused.members[2]
    rows = [_ids(tok_a, "12+3="), _ids(tok_a, "ab"), _ids(tok_a, "efg,1")]
    ids, mask = _left_pad(rows)
    got = fused.generate_greedy(ids, mask, max_new_tokens=7)
    fw = fused.last_weights

    def own(row):
        return [tok_c.bos_token_id] + tok_c.encode(tok_a.decode(row[1:]), add_special_tokens=False)

    ell = torch.tensor([[_mean_ce(a, r), _mean_ce(d, r), _mean_ce(c, own(r))] for r in rows], dtype=torch.float64)
    assert torch.allclose(fw.weights.double(), torch.softmax(-ell / 2.0, -1), atol=1e-5)
    for r, row in enumerate(rows):
        cur, ref = list(row), []
        for _ in range(7):
            w = fw.weights[r]
            logits = w[0] * _last_logits(a, cur) + w[1] * _last_logits(d, cur) + w[2] * _last_logits(c, own(cur))[m.map]
            t = int(logits.argmax())
            ref.append(t)
            cur.append(t)
        assert got[r] == ref, r


def test_member_without_a_cache_rescores_its_own_text(world):
    """A cross member that is a plain LogitModel (no KV cache) reads its whole re-tokenized text at
    every step: the same tokens as the cached transformers member."""
    from mergelab.eval.models import HFLogitModel

    class Plain:
        def __init__(self, inner):
            self.inner, self.device, self.vocab_size = inner, inner.device, inner.vocab_size

        def logits(self, input_ids, attention_mask, prompt_lengths=None):
            return self.inner.logits(input_ids, attention_mask)

    a, c, tok_a, tok_c = world["a"], world["c"], world["tok_a"], world["tok_c"]
    ids, mask = _left_pad([_ids(tok_a, "12+3="), _ids(tok_a, "ab")])
    cached = FusedLogitModel([a, c], "uniform", tokenizers=[tok_a, tok_c], cross_tokenizer=True)
    plain = FusedLogitModel([a, Plain(HFLogitModel(c, tok_c))], "uniform", tokenizers=[tok_a, tok_c],
                            cross_tokenizer=True)
    from mergelab.fusion import _ProtocolMember

    assert isinstance(plain.members[1].inner, _ProtocolMember)
    assert plain.generate_greedy(ids, mask, 6) == cached.generate_greedy(ids, mask, 6)


def test_incomplete_utf8_is_held_back_until_the_character_is_complete():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bl = Tokenizer(models.BPE({t: i for i, t in enumerate(["<s>", "</s>"] + sorted(alphabet))}, [], unk_token=None))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    from transformers import PreTrainedTokenizerFast

    pivot = PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<s>", eos_token="</s>")
    own_tok = _wordlevel({t: i for i, t in enumerate(SPECIALS + list("xä"))})
    member = _CrossMember(_member(_tiny_llama(6, 4)), pivot, own_tok, len(pivot.get_vocab()), "own")
    bos, x = pivot.bos_token_id, pivot.convert_tokens_to_ids("x")
    lead, cont = pivot.convert_tokens_to_ids("Ã"), pivot.convert_tokens_to_ids("¤")  # C3 A4 = ä
    assert member.own_ids([bos, x, lead]) == [1, 4]  # "x" + held-back lead byte
    assert member.own_ids([bos, x, lead, cont]) == [1, 4, 5]  # "xä"
    assert member.own_ids([bos]) == [1]


# -- refusals, CLI, recipe -------------------------------------------------------------------------
def test_refusals_name_the_models_and_what_works(world):
    a, c, tok_a, tok_c = world["a"], world["c"], world["tok_a"], world["tok_c"]
    with pytest.raises(MergelabError, match=r"opt.*first model's \(A\): C.*sim, uniform or top1"):
        FusedLogitModel([a, c], "opt", tokenizers=[tok_a, tok_c], names=["A", "C"], cross_tokenizer=True)
    fused = FusedLogitModel([a, c], "uniform", tokenizers=[tok_a, tok_c], names=["A", "C"], cross_tokenizer=True)
    with pytest.raises(MergelabError, match=r"opt"):
        fused.weighting = "opt"
    assert fused.weighting == "uniform"
    ids, mask = _left_pad([_ids(tok_a, "12")])
    with pytest.raises(MergelabError, match=r"perplexity and multiple-choice.*: C\..*exact match"):
        fused.logits(ids, mask)
    with pytest.raises(MergelabError, match=r"id 0 is '<pad>' in A but ' ' in C.*cross_tokenizer: true.*--cross-tokenizer"):
        FusedLogitModel([a, c], tokenizers=[tok_a, tok_c], names=["A", "C"])
    with pytest.raises(MergelabError, match="needs the models' tokenizers"):
        FusedLogitModel([a, c], cross_tokenizer=True)


def test_fuse_command_cross_tokenizer_flag(world):
    from click.testing import CliRunner

    from mergelab.cli.fuse_cmd import fuse

    root, a, c, tok_a, tok_c = world["root"], world["a"], world["c"], world["tok_a"], world["tok_c"]
    args = ["--models", str(root / "a"), str(root / "c"), "--prompt", "12+3=", "--max-new-tokens", "5",
            "--device", "cpu"]
    res = CliRunner().invoke(fuse, args + ["--cross-tokenizer"])
    assert res.exit_code == 0, res.output
    enc = tok_a("12+3=", return_tensors="pt")
    fused = FusedLogitModel([a, c], tokenizers=[tok_a, tok_c], cross_tokenizer=True)
    new = fused.generate_greedy(enc["input_ids"], enc["attention_mask"], 5, eos_token_id=tok_a.eos_token_id)
    w = fused.last_weights.weights[0].tolist()
    assert f"{w[0]:.3f}" in res.output and f"{w[1]:.3f}" in res.output
    assert f"cross-tokenizer: {root / 'c'}" in res.output
    assert res.output.rstrip().endswith(tok_a.decode(new[0], skip_special_tokens=True).rstrip())
    bad = CliRunner().invoke(fuse, args)
    assert bad.exit_code != 0 and "--cross-tokenizer" in str(bad.exception)
    bad = CliRunner().invoke(fuse, args + ["--cross-tokenizer", "--weights", "opt"])
    assert bad.exit_code != 0 and "sim, uniform or top1" in str(bad.exception)


def test_recipe_cross_tokenizer_parameter(world, tmp_path, monkeypatch):
    root, a, c, tok_a, tok_c = world["root"], world["a"], world["c"], world["tok_a"], world["tok_c"]
    data = {"merge_method": "logit_fusion", "models": [str(root / "a"), str(root / "c")],
            "parameters": {"weighting": "top1", "cross_tokenizer": True}}
    recipe = tmp_path / "fuse.yml"
    recipe.write_text(yaml.safe_dump(data))
    fused, tokenizer = load_fusion(recipe)
    assert fused.cross_names == [str(root / "c")] and tokenizer.get_vocab() == tok_a.get_vocab()
    ids, mask = _left_pad([_ids(tok_a, "12+"), _ids(tok_a, "ab")])
    ref = FusedLogitModel([a, c], "top1", tokenizers=[tok_a, tok_c], cross_tokenizer=True)
    assert fused.generate_greedy(ids, mask, 5) == ref.generate_greedy(ids, mask, 5)
    assert torch.equal(fused.last_weights.weights, ref.last_weights.weights)
    # off by default: the shared-vocabulary error; opt with the opt-in: refused before any weights
    del data["parameters"]["cross_tokenizer"]
    with pytest.raises(MergelabError, match="do not share a tokenizer"):
        load_fusion(data)
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    data["parameters"].update(cross_tokenizer=True, weighting="opt")
    with pytest.raises(MergelabError, match="sim, uniform or top1"):
        load_fusion(data)
    with pytest.raises(MergelabError, match="sim, uniform or top1"):
        load_fusion(recipe, weighting="opt")


def test_eval_refuses_position_scoring_before_weights_and_scores_exact_match(world, tmp_path, monkeypatch):
    import json

    import transformers
    from click.testing import CliRunner

    from mergelab.cli import cli

    root = world["root"]
    recipe = tmp_path / "fuse.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "logit_fusion", "models": [str(root / "a"), str(root / "c")],
                                      "parameters": {"weighting": "sim", "cross_tokenizer": True}}))
    (tmp_path / "em.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "3"}) + "\n"
                                               for p in ("1+2=", "ab+", "12=")))
    (tmp_path / "t.txt").write_text("12+3=15\n\nab cd")
    (tmp_path / "em.yml").write_text(yaml.safe_dump({"scorers": [
        {"name": "em", "type": "exact_match", "data": "em.jsonl", "max_new_tokens": 3}]}))
    (tmp_path / "ppl.yml").write_text(yaml.safe_dump({"scorers": [
        {"name": "em", "type": "exact_match", "data": "em.jsonl"},
        {"name": "wiki", "type": "perplexity", "data": "t.txt"}]}))
    ok = CliRunner().invoke(cli, ["eval", str(recipe), "--eval", str(tmp_path / "em.yml"), "--device", "cpu",
                                  "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((tmp_path / "r.json").read_text())
    # the same numbers as the eval of the fusion built by hand (generation works across tokenizers)
    from mergelab.eval.evaluator import Evaluator
    from mergelab.eval.spec import EvalSpec

    direct = FusedLogitModel([world["a"], world["c"]], "sim", tokenizers=[world["tok_a"], world["tok_c"]],
                             cross_tokenizer=True)
    expect = Evaluator(EvalSpec.load(tmp_path / "em.yml"), world["tok_a"]).evaluate(direct)
    assert saved["counts"]["em"] == 3 and saved["metrics"] == expect.metrics

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    bad = CliRunner().invoke(cli, ["eval", str(recipe), "--eval", str(tmp_path / "ppl.yml"), "--device", "cpu"])
    assert bad.exit_code != 0
    msg = str(bad.exception) + bad.output
    assert "perplexity scorer 'wiki'" in msg and str(root / "c") in msg and "exact match" in msg
