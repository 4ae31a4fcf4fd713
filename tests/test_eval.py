"""Tests of the quick eval: spec validation, each scorer's exact numbers on model doubles,
HFLogitModel padding and cached generation, the lm-eval adapter (offline) and `mergelab eval`."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.errors import MergelabError
from mergelab.eval import EvalSpec, Evaluator, HFLogitModel, load_data
from mergelab.eval.data import subset
from mergelab.eval.protocol import LogitModel
from mergelab.eval.scorers import extract_answer

torch.set_num_threads(1)

CHARS = list("0123456789+-=*/ abcdefghijklmnopqrstuvwxyz:,.?[]>\n")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# -- fixtures: a char tokenizer, a tiny random Llama, model doubles ----------------------------------
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tok):
    return make_llama(tok)


class UniformModel:
    """Predicts all-zero logits: every token has probability 1/V."""

    def __init__(self, vocab_size):
        self.device = torch.device("cpu")
        self.vocab_size = vocab_size
        self.calls = []

    def logits(self, input_ids, attention_mask, prompt_lengths=None):
        self.calls.append(input_ids.shape)
        return torch.zeros(*input_ids.shape, self.vocab_size)

    def generate_greedy(self, input_ids, attention_mask, max_new_tokens, eos_token_id=None, stop=None):
        return [[] for _ in range(input_ids.shape[0])]


class BigramModel(UniformModel):
    """logits[b, t] = table[input_ids[b, t]]: a hand-written next-token table."""

    def __init__(self, table):
        super().__init__(table.shape[1])
        self.table = table

    def logits(self, input_ids, attention_mask, prompt_lengths=None):
        return self.table[input_ids]


class FixedTextModel(UniformModel):
    """Emits a fixed text token by token, honouring max_new_tokens and the stop callback, and
    records the prompts it was given."""

    def __init__(self, tok, text):
        super().__init__(len(tok))
        self.tok, self.out = tok, tok(text, add_special_tokens=False)["input_ids"]
        self.prompts = []

    def generate_greedy(self, input_ids, attention_mask, max_new_tokens, eos_token_id=None, stop=None):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            self.prompts.append(self.tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=False))
            new = []
            for t in self.out[:max_new_tokens]:
                new.append(t)
                if stop is not None and stop(new):
                    break
            rows.append(new)
        return rows


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def spec_of(tmp_path, scorers, **top) -> EvalSpec:
    path = tmp_path / "eval.yml"
    path.write_text(yaml.safe_dump({"scorers": scorers, **top}), encoding="utf-8")
    return EvalSpec.load(path)


def test_doubles_satisfy_the_protocol(tok, llama):
    assert isinstance(UniformModel(5), LogitModel)
    assert isinstance(HFLogitModel(llama, tok), LogitModel)


# -- perplexity --------------------------------------------------------------------------------------
def test_uniform_model_has_perplexity_equal_to_vocab_size(tmp_path, tok):
    (tmp_path / "wiki.txt").write_text("hello world\nsecond line\n\nanother paragraph\n\n\nthird one.\n")
    spec = spec_of(tmp_path, [{"name": "wiki", "type": "perplexity", "data": "wiki.txt"}])
    result = Evaluator(spec, tok).evaluate(UniformModel(len(tok)))
    V = len(tok)
    assert result.metrics["wiki/perplexity"] == pytest.approx(V, rel=1e-6)
    assert result.metrics["wiki/nll"] == pytest.approx(math.log(V), rel=1e-7)
    assert result.scores["wiki"] == pytest.approx(-math.log(V), rel=1e-7)
    assert result.combined == pytest.approx(-math.log(V), rel=1e-7)
    assert result.directions == {"wiki/perplexity": "lower", "wiki/nll": "lower"}
    assert result.counts == {"wiki": 3}  # three blank-line separated documents
    by_line = spec_of(tmp_path, [{"name": "wiki", "type": "perplexity", "data": "wiki.txt", "split": "lines"}])
    assert Evaluator(by_line, tok).evaluate(UniformModel(V)).counts == {"wiki": 4}
    whole = spec_of(tmp_path, [{"name": "wiki", "type": "perplexity", "data": "wiki.txt", "split": "none"}])
    assert Evaluator(whole, tok).scorers[0].n_items == 1


def test_perplexity_windows_score_every_token_once(tmp_path, tok):
    texts = ["abcdefghijklmnopqrstuvwxyz" * 2, "short", "x"]
    write_jsonl(tmp_path / "t.jsonl", [{"body": t} for t in texts])
    spec = spec_of(tmp_path, [{"name": "p", "type": "perplexity", "data": "t.jsonl", "field": "body", "max_length": 8}])
    ev = Evaluator(spec, tok, batch_size=4)
    scorer = ev.scorers[0]
    # BOS is prepended, so every character of every text is predicted exactly once.
    assert sum(int(b.cont_lens.sum()) for b in scorer.batches) == sum(len(t) for t in texts)
    assert max(b.ids.shape[1] for b in scorer.batches) == 8
    assert ev.evaluate(UniformModel(len(tok))).metrics["p/nll"] == pytest.approx(math.log(len(tok)), rel=1e-7)


def test_perplexity_matches_direct_cross_entropy_on_a_real_model(tmp_path, tok, llama):
    texts = ["the cat sat", "on the mat, quietly", "a"]
    write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    spec = spec_of(tmp_path, [{"name": "p", "type": "perplexity", "data": "t.jsonl"}])
    result = Evaluator(spec, tok, batch_size=3).evaluate(HFLogitModel(llama, tok))
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])  # <s> + chars
            logits = llama(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert result.metrics["p/nll"] == pytest.approx(total / n, rel=1e-5)
    assert result.metrics["p/perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


# -- multiple choice ---------------------------------------------------------------------------------
def _logprob_rows(tok, rows: dict[str, dict[str, float]]) -> torch.Tensor:
    """A bigram table whose rows are log-probabilities: given p for some next chars, the rest of
    the mass is spread evenly."""
    V = len(tok)
    table = torch.full((V, V), 0.0)
    for prev, nexts in rows.items():
        (pid,) = tok(prev, add_special_tokens=False)["input_ids"]
        rest = (1 - sum(math.exp(v) for v in nexts.values())) / (V - len(nexts))
        row = torch.full((V,), math.log(rest))
        for ch, lp in nexts.items():
            (cid,) = tok(ch, add_special_tokens=False)["input_ids"]
            row[cid] = lp
        table[pid] = row
    return table


def test_multiple_choice_picks_the_likelier_choice_and_length_normalization_changes_it(tmp_path, tok):
    # After ':' the model says 'a' with log p -1.0 and 'b' with -0.5; after 'b', 'b' again -0.5.
    # Choice "a": sum -1.0 (mean -1.0). Choice "bbb": sum -1.5 (mean -0.5).
    table = _logprob_rows(tok, {":": {"a": -1.0, "b": -0.5}, "b": {"b": -0.5}})
    write_jsonl(tmp_path / "mc.jsonl", [
        {"prompt": "q:", "choices": ["a", "bbb"], "answer": 0},
        {"prompt": "r:", "choices": ["bbb", "a"], "answer": "a"},
        {"prompt": "s:", "choices": ["b", "a"], "answer": 1},  # "b": -0.5 beats "a": -1.0, so wrong
    ])
    spec = spec_of(tmp_path, [
        {"name": "raw", "type": "multiple_choice", "data": "mc.jsonl"},
        {"name": "norm", "type": "multiple_choice", "data": "mc.jsonl", "normalize": "length", "weight": 2},
    ])
    result = Evaluator(spec, tok).evaluate(BigramModel(table))
    assert result.metrics["raw/accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["norm/accuracy"] == 0.0  # per token "bbb" (-0.5) beats "a" (-1.0) everywhere
    assert result.combined == pytest.approx(2 / 3 + 2 * 0.0)
    assert result.directions["raw/accuracy"] == "higher"


def test_multiple_choice_batches_group_whole_items_and_report_after_each(tmp_path, tok):
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": f"{i}:", "choices": ["a", "b", "c"], "answer": 0} for i in range(5)])
    spec = spec_of(tmp_path, [{"name": "mc", "type": "multiple_choice", "data": "mc.jsonl"}])
    ev = Evaluator(spec, tok, batch_size=7)  # 7 rows hold two 3-choice items
    assert [len(g) for g, _ in ev.scorers[0].batches] == [2, 2, 1]
    calls = []
    result = ev.evaluate(UniformModel(len(tok)), report=lambda *a: calls.append(a))
    # Uniform logits tie every choice; ties go to the first choice, which is the answer.
    assert calls == [("mc", 1, 1.0), ("mc", 2, 1.0), ("mc", 3, 1.0)]
    assert result.scores["mc"] == 1.0


# -- exact match -------------------------------------------------------------------------------------
def test_extract_answer_uses_the_last_match_after_cutting_at_stops():

    assert extract_answer("x=12 then 7\ny=99", ["\n"], re.compile(r"\d+"), True) == "7"
    assert extract_answer("x=12 then 7\ny=99", [], re.compile(r"=(\d+)"), True) == "99"
    assert extract_answer("no digits", [], re.compile(r"\d+"), True) is None
    assert extract_answer("  42 ", [], None, True) == "42"
    assert extract_answer("  42 ", [], None, False) == "  42 "


def test_exact_match_with_regex_extraction_on_a_fixed_output_model(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [
        {"prompt": "1+1=", "answer": "42"},
        {"prompt": "2+2=", "answer": 42},
        {"prompt": "3+3=", "answer": "7"},
        {"prompt": "4+4=", "answer": "99"},  # 99 comes after the stop string: never seen
    ])
    spec = spec_of(tmp_path, [{
        "name": "add", "type": "exact_match", "data": "em.jsonl", "max_new_tokens": 40,
        "stop": ["\n"], "extract_regex": r"is (\d+)",
    }])
    model = FixedTextModel(tok, "it is 5, so it is 42.\nand it is 99")
    calls = []
    result = Evaluator(spec, tok, batch_size=3).evaluate(model, report=lambda *a: calls.append(a))
    assert result.metrics == {"add/accuracy": 0.5}
    assert [c[:2] for c in calls] == [("add", 1), ("add", 2)]
    assert calls[-1][2] == 0.5
    # Generation stopped at the first "\n": the stop callback was honoured.
    assert all("99" not in (p or "") for p in Evaluator(spec, tok).scorers[0].last_predictions)


def test_exact_match_max_new_tokens_caps_generation(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "q", "answer": "12"}])
    base = {"name": "a", "type": "exact_match", "data": "em.jsonl"}
    model = FixedTextModel(tok, "123")
    assert Evaluator(spec_of(tmp_path, [{**base, "max_new_tokens": 2}]), tok).evaluate(model).scores["a"] == 1.0
    assert Evaluator(spec_of(tmp_path, [{**base, "max_new_tokens": 3}]), tok).evaluate(model).scores["a"] == 0.0


def test_chat_template_is_applied_per_scorer(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1+1", "answer": "2"}])
    spec = spec_of(tmp_path, [
        {"name": "chat", "type": "exact_match", "data": "em.jsonl", "chat_template": True},
        {"name": "plain", "type": "exact_match", "data": "em.jsonl"},
    ])
    model = FixedTextModel(tok, "2")
    result = Evaluator(spec, tok).evaluate(model)
    assert model.prompts == ["<s>[1+1]>", "<s>1+1"]  # one BOS each: the template's, the tokenizer's
    assert result.scores == {"chat": 1.0, "plain": 1.0}


def test_chat_template_without_template_in_tokenizer_is_a_clear_error(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1+1", "answer": "2"}])
    spec = spec_of(tmp_path, [{"name": "chat", "type": "exact_match", "data": "em.jsonl", "chat_template": True}])
    with pytest.raises(MergelabError, match=r"Scorer 'chat' sets chat_template: true, but this model's tokenizer has no chat template"):
        Evaluator(spec, tok)


# -- determinism, limit, report ----------------------------------------------------------------------
def test_limit_and_seed_pick_the_same_items_every_time(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": f"p{i}", "answer": "x"} for i in range(20)])
    scorer = {"name": "a", "type": "exact_match", "data": "em.jsonl", "limit": 5, "seed": 3}
    seen = []
    for _ in range(2):
        model = FixedTextModel(tok, "x")
        Evaluator(spec_of(tmp_path, [scorer]), tok, batch_size=2).evaluate(model)
        seen.append(model.prompts)
    assert seen[0] == seen[1] and len(seen[0]) == 5
    assert seen[0] == [f"<s>p{i}" for i in subset(20, 5, 3)]
    other = FixedTextModel(tok, "x")
    Evaluator(spec_of(tmp_path, [{**scorer, "seed": 4}]), tok).evaluate(other)
    assert sorted(other.prompts) != sorted(seen[0])
    assert subset(20, None, 3) == subset(20, None, 3) and sorted(subset(20, None, 3)) == list(range(20))


def test_same_spec_twice_gives_identical_numbers_on_a_real_model(tmp_path, tok, llama):
    (tmp_path / "t.txt").write_text("abc def\n\nghi jkl mno\n\npqr")
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": f"{i}=", "choices": ["ab", "c"], "answer": i % 2} for i in range(6)])
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)])
    spec = spec_of(tmp_path, [
        {"name": "ppl", "type": "perplexity", "data": "t.txt"},
        {"name": "mc", "type": "multiple_choice", "data": "mc.jsonl", "limit": 4},
        {"name": "em", "type": "exact_match", "data": "em.jsonl", "max_new_tokens": 4},
    ], batch_size=4)
    model = HFLogitModel(llama, tok)
    a = Evaluator(spec, tok).evaluate(model)
    b = Evaluator(spec, tok).evaluate(model)
    assert a.metrics == b.metrics and a.scores == b.scores and a.combined == b.combined
    assert a.combined == pytest.approx(-a.metrics["ppl/nll"] + a.scores["mc"] + a.scores["em"])
    d = a.to_dict()
    assert set(d) >= {"metrics", "scores", "combined", "directions", "timings", "weights", "counts"}
    assert json.loads(json.dumps(d))["combined"] == a.combined


def test_report_may_raise_to_abort(tmp_path, tok):
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": f"{i}:", "choices": ["a", "b"], "answer": 0} for i in range(6)])
    spec = spec_of(tmp_path, [{"name": "mc", "type": "multiple_choice", "data": "mc.jsonl"}])
    model = UniformModel(len(tok))

    class Pruned(Exception):
        pass

    def report(name, step, value):
        if step == 2:
            raise Pruned

    with pytest.raises(Pruned):
        Evaluator(spec, tok, batch_size=2).evaluate(model, report=report)
    assert len(model.calls) == 2  # the third batch never ran


# -- HFLogitModel ------------------------------------------------------------------------------------
def _left_batch(tok, texts):
    seqs = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return seqs, ids, mask


def test_left_padding_gives_the_same_logits_as_single_items(tok, llama):
    lm = HFLogitModel(llama, tok)
    seqs, ids, mask = _left_batch(tok, ["12+34=", "5=", "hello there"])
    batched = lm.logits(ids, mask)
    assert batched.dtype == torch.float32 and batched.shape == (3, ids.shape[1], len(tok))
    for row, s in enumerate(seqs):
        alone = lm.logits(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
        torch.testing.assert_close(batched[row, ids.shape[1] - len(s):], alone, rtol=1e-5, atol=1e-5)


def test_cached_greedy_generation_equals_step_by_step_argmax(tok, llama):
    lm = HFLogitModel(llama, tok)
    seqs, ids, mask = _left_batch(tok, ["12+34=", "5=", "abc"])
    out = lm.generate_greedy(ids, mask, max_new_tokens=6)
    for row, s in enumerate(seqs):
        s, expect = list(s), []
        for _ in range(6):
            nxt = int(lm.logits(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1].argmax())
            expect.append(nxt)
            s.append(nxt)
        assert out[row] == expect


def test_generation_stops_per_row(tok, llama):
    lm = HFLogitModel(llama, tok)
    seqs, ids, mask = _left_batch(tok, ["12+34=", "5="])
    full = lm.generate_greedy(ids, mask, max_new_tokens=5)
    # Row 0 stops after its second token, row 1 runs on; stopping one row never changes another.
    stopped = lm.generate_greedy(ids, mask, 5, stop=lambda new: new[:2] == full[0][:2] and len(new) == 2)
    assert stopped[0] == full[0][:2] and stopped[1] == full[1]
    eos = full[1][2]
    cut = lm.generate_greedy(ids, mask, 5, eos_token_id=eos)
    assert cut[1] == full[1][: full[1].index(eos) + 1]


# -- validation --------------------------------------------------------------------------------------
def test_missing_field_names_file_and_line(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    spec = spec_of(tmp_path, [{"name": "a", "type": "exact_match", "data": "em.jsonl"}])
    with pytest.raises(MergelabError, match=r"em\.jsonl:2: the line has no `answer` field"):
        load_data(spec)


def test_bad_data_messages(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": oops}\n')
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": 2}])
    write_jsonl(tmp_path / "mc2.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": "z"}])
    cases = [
        ({"type": "exact_match", "data": "empty.jsonl"}, r"empty\.jsonl of scorer 'a' is empty"),
        ({"type": "exact_match", "data": "bad.jsonl"}, r"bad\.jsonl:2: not valid JSON"),
        ({"type": "exact_match", "data": "nope.jsonl"}, r"nope\.jsonl of scorer 'a' does not exist"),
        ({"type": "multiple_choice", "data": "mc.jsonl"}, r"mc\.jsonl:1: `answer` index 2 is out of range"),
        ({"type": "multiple_choice", "data": "mc2.jsonl"}, r"mc2\.jsonl:1: `answer` \"z\" is not one of"),
        ({"type": "perplexity", "data": "empty.jsonl"}, r"is empty"),
    ]
    for scorer, pattern in cases:
        with pytest.raises(MergelabError, match=pattern):
            load_data(spec_of(tmp_path, [{"name": "a", **scorer}]))


def test_spec_errors_are_clear_and_come_before_any_data_is_read(tmp_path):
    with pytest.raises(MergelabError, match=r"scorers\[1\] \(x\) has unknown type 'bleu'. Known scorer types: perplexity, multiple_choice, exact_match, lm_eval"):
        spec_of(tmp_path, [{"name": "ok", "type": "perplexity", "data": "t.txt"}, {"name": "x", "type": "bleu"}])
    with pytest.raises(MergelabError, match=r"scorers\[0\] \(a\)\.max_new_tokens: Input should be greater than or equal to 1"):
        spec_of(tmp_path, [{"name": "a", "type": "exact_match", "data": "d.jsonl", "max_new_tokens": 0}])
    with pytest.raises(MergelabError, match=r"scorers\[0\] \(a\)\.extract_regex: .*not a valid Python regular expression"):
        spec_of(tmp_path, [{"name": "a", "type": "exact_match", "data": "d.jsonl", "extract_regex": "(\\d"}])
    with pytest.raises(MergelabError, match=r"scorers\[0\] \(a\)\.normalise: unknown option"):
        spec_of(tmp_path, [{"name": "a", "type": "multiple_choice", "data": "d.jsonl", "normalise": "length"}])
    with pytest.raises(MergelabError, match=r"used twice"):
        spec_of(tmp_path, [{"name": "a", "type": "perplexity", "data": "d"}, {"name": "a", "type": "perplexity", "data": "e"}])
    with pytest.raises(MergelabError, match=r"exactly one of `task`"):
        spec_of(tmp_path, [{"name": "a", "type": "lm_eval"}])
    with pytest.raises(MergelabError, match=r"does not exist"):
        EvalSpec.load(tmp_path / "missing.yml")


def test_data_paths_are_relative_to_the_spec_and_limit_override(tmp_path):
    sub = tmp_path / "specs"
    sub.mkdir()
    spec = spec_of(sub, [{"name": "a", "type": "perplexity", "data": "../t.txt", "limit": 3}])
    assert spec.scorers[0].data == sub / "../t.txt"
    assert spec.with_limit(7).scorers[0].limit == 7 and spec.scorers[0].limit == 3
    embedded = EvalSpec.from_dict({"scorers": [{"name": "a", "type": "perplexity", "data": "t.txt"}]}, base_dir=sub)
    assert embedded.scorers[0].data == sub / "t.txt"


# -- lm-eval adapter (offline: local task YAML + local JSONL) ----------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def _lm_eval_spec(tmp_path, **scorer):
    return spec_of(tmp_path, [{"name": "h", "type": "lm_eval", **scorer}])


def test_lm_eval_multiple_choice_task_matches_our_scorer(tmp_path, tok, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra mergelab[lmeval]")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # data_files are resolved against the task YAML, not the cwd
    table = _logprob_rows(tok, {":": {"a": -1.0, "b": -0.5}, "b": {"b": -0.5}})
    spec = spec_of(tmp_path, [
        {"name": "h", "type": "lm_eval", "task_yaml": str(FIXTURES / "tiny_mc.yaml")},
        {"name": "ours", "type": "multiple_choice", "data": str(FIXTURES / "tiny_mc.jsonl")},
    ])
    calls = []
    result = Evaluator(spec, tok).evaluate(BigramModel(table), report=lambda *a: calls.append(a))
    assert result.metrics["h/acc"] == pytest.approx(2 / 3)
    assert result.metrics["ours/accuracy"] == pytest.approx(2 / 3)
    assert result.directions["h/acc"] == "higher" and result.scores["h"] == pytest.approx(2 / 3)
    assert calls[0] == ("h", 1, pytest.approx(2 / 3))


def test_lm_eval_generation_task_with_limit_and_seed(tmp_path, tok, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra mergelab[lmeval]")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = _lm_eval_spec(tmp_path, task="mergelab_tiny_gen", include_path=str(FIXTURES))
    model = FixedTextModel(tok, "42\nand more")
    result = Evaluator(spec, tok).evaluate(model)
    assert result.metrics["h/exact_match"] == pytest.approx(3 / 4)  # "until" cut the text at "\n"
    assert result.counts == {"h": 4}
    limited = _lm_eval_spec(tmp_path, task="mergelab_tiny_gen", include_path=str(FIXTURES), limit=2, seed=1)
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    picked = sorted(subset(4, 2, 1))
    model = FixedTextModel(tok, "42\n")
    result = Evaluator(limited, tok).evaluate(model)
    assert sorted(model.prompts) == sorted(f"<s>{prompts[i]}" for i in picked)
    assert result.metrics["h/exact_match"] == sum(prompts[i] != "3+3=" for i in picked) / 2


def test_lm_eval_loglikelihood_requests_match_direct_computation(tmp_path, tok, llama):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra mergelab[lmeval]")
    from types import SimpleNamespace

    from mergelab.eval.lmeval import _adapter_class

    lm = _adapter_class()(tok, batch_size=2, max_length=64, chat=False)
    lm.model = HFLogitModel(llama, tok)
    pairs = [("12+34=", "46"), ("hello", " world"), ("", "abc")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=("abc",))])
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(pairs, got):
            c = tok(ctx)["input_ids"] if ctx else [tok.bos_token_id]
            ids = torch.tensor([c + tok(cont, add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(llama(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            n = len(ids[0]) - len(c)
            expect = logp[-n:].gather(-1, targets[-n:, None]).sum().item()
            assert lp == pytest.approx(expect, rel=1e-5, abs=1e-5)
            assert greedy == bool((logp[-n:].argmax(-1) == targets[-n:]).all())
    # A rolling log-likelihood of "abc" is the "" -> "abc" continuation (BOS-prefixed) above.
    assert rolling[0] == pytest.approx(got[2][0], rel=1e-5)


def test_lm_eval_unknown_task_is_a_clear_error(tmp_path, tok):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra mergelab[lmeval]")
    spec = _lm_eval_spec(tmp_path, task="no_such_task", include_path=str(FIXTURES))
    with pytest.raises(MergelabError, match=r"lm-eval knows no task 'no_such_task'"):
        load_data(spec)
    with pytest.raises(MergelabError, match=r"task_yaml .*missing\.yaml does not exist"):
        load_data(_lm_eval_spec(tmp_path, task_yaml="missing.yaml"))


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_eval_on_a_saved_model_directory(tmp_path, tok, llama):
    from click.testing import CliRunner

    from mergelab.cli import cli

    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text("abc def\n\nghi")
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(5)])
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [
        {"name": "ppl", "type": "perplexity", "data": "t.txt", "weight": 0.5},
        {"name": "add", "type": "exact_match", "data": "em.jsonl", "max_new_tokens": 3},
    ]}))
    out_json = tmp_path / "out" / "r.json"
    res = CliRunner().invoke(cli, ["eval", str(model_dir), "--eval", str(tmp_path / "eval.yml"),
                                   "--device", "cpu", "--json", str(out_json), "--limit", "3"])
    assert res.exit_code == 0, res.output
    saved = json.loads(out_json.read_text())
    # The same numbers as the library on the same model and spec.
    spec = EvalSpec.load(tmp_path / "eval.yml").with_limit(3)
    expect = Evaluator(spec, tok).evaluate(HFLogitModel(llama, tok))
    assert saved["metrics"] == pytest.approx(expect.metrics, rel=1e-6)
    assert saved["combined"] == pytest.approx(expect.combined, rel=1e-6)
    assert saved["counts"] == {"ppl": 2, "add": 3}
    assert saved["directions"]["ppl/perplexity"] == "lower"
    lines = res.output.splitlines()  # stderr (transformers' progress bars) is mixed in
    assert re.search(r"scorer\s+metric\s+value\s+direction\s+weight\n", res.output)
    assert any(l.split()[:4] == ["ppl", "score", "=", "-nll"] and l.split()[-1] == "0.5" for l in lines)
    assert any(l.split()[:3] == ["ppl", "perplexity", f"{expect.metrics['ppl/perplexity']:.6g}"] for l in lines)
    assert f"combined score (sum of weight x score, higher is better): {expect.combined:.6g}" in res.output


def test_cli_errors_come_before_model_loading(tmp_path):
    from mergelab.cli import main

    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [{"name": "a", "type": "exact_match", "data": "gone.jsonl"}]}))
    # The model path does not exist either: the data error must be the one reported.
    assert main(["eval", str(tmp_path / "nomodel"), "--eval", str(tmp_path / "eval.yml")]) == 2
    (tmp_path / "em.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [{"name": "a", "type": "exact_match", "data": "em.jsonl"}]}))
    with pytest.raises(MergelabError, match=r"nomodel does not exist"):
        main(["--debug", "eval", str(tmp_path / "nomodel"), "--eval", str(tmp_path / "eval.yml")])
    with pytest.raises(MergelabError, match=r"gone\.jsonl of scorer 'a' does not exist"):
        (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [{"name": "a", "type": "exact_match", "data": "gone.jsonl"}]}))
        main(["--debug", "eval", str(tmp_path / "nomodel"), "--eval", str(tmp_path / "eval.yml")])


def test_cli_eval_merges_a_recipe_in_memory(tmp_path, tok):
    from click.testing import CliRunner

    from mergelab.cli import cli

    dirs = []
    for seed in (1, 2):
        d = tmp_path / f"m{seed}"
        make_llama(tok, seed).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(d), "parameters": {"weight": 0.5}} for d in dirs]}))
    (tmp_path / "t.txt").write_text("abc def\n\nghi jkl")
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [{"name": "ppl", "type": "perplexity", "data": "t.txt"}]}))
    files_before = sorted(p for p in tmp_path.rglob("*"))
    res = CliRunner().invoke(cli, ["eval", str(recipe), "--eval", str(tmp_path / "eval.yml"),
                                   "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert sorted(p for p in tmp_path.rglob("*")) == sorted(files_before + [tmp_path / "r.json"])  # no weights written
    # The same number as scoring the average of the two models' weights.
    avg = make_llama(tok, 1)
    other = make_llama(tok, 2).state_dict()
    avg.load_state_dict({k: 0.5 * v + 0.5 * other[k] for k, v in avg.state_dict().items()})
    expect = Evaluator(EvalSpec.load(tmp_path / "eval.yml"), tok).evaluate(HFLogitModel(avg, tok))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["ppl/nll"] == pytest.approx(expect.metrics["ppl/nll"], rel=1e-5)


def test_hf_logit_model_drops_padding_rows_of_the_vocabulary(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok) + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    lm = HFLogitModel(LlamaForCausalLM(cfg).eval(), tok)
    assert lm.vocab_size == len(tok)
    assert lm.logits(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 3, len(tok))


def test_load_model_refuses_what_it_cannot_load_safely(tmp_path, tok, llama):
    from mergelab.eval import load_model

    with pytest.raises(MergelabError, match=r"does not exist"):
        load_model(tmp_path / "nope")
    d = tmp_path / "m"
    llama.save_pretrained(d)
    tok.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(MergelabError, match=r"no \*\.safetensors weights"):
        load_model(d)


def test_cli_eval_scores_a_logit_fusion_recipe(tmp_path, tok, llama):
    from click.testing import CliRunner

    from mergelab.cli import cli

    d = tmp_path / "m"
    llama.save_pretrained(d)
    tok.save_pretrained(d)
    recipe = tmp_path / "fuse.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "logit_fusion", "models": [str(d), str(d)],
                                      "parameters": {"weighting": "uniform"}}))
    (tmp_path / "t.txt").write_text("abc def\n\nghi jkl")
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": f"{i}=", "choices": ["ab", "c"], "answer": i % 2} for i in range(4)])
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({"scorers": [
        {"name": "ppl", "type": "perplexity", "data": "t.txt"},
        {"name": "mc", "type": "multiple_choice", "data": "mc.jsonl"}]}))
    res = CliRunner().invoke(cli, ["eval", str(recipe), "--eval", str(tmp_path / "eval.yml"),
                                   "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    # Fusing a model with itself is that model: same perplexity and accuracy.
    expect = Evaluator(EvalSpec.load(tmp_path / "eval.yml"), tok).evaluate(HFLogitModel(llama, tok))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["ppl/nll"] == pytest.approx(expect.metrics["ppl/nll"], rel=1e-5)
    assert saved["metrics"]["mc/accuracy"] == expect.metrics["mc/accuracy"]


# -- the bundled family ------------------------------------------------------------------------------
def test_family_fine_tunes_beat_the_base_on_their_own_skill():
    from mergelab.demo import DATA_DIR, FAMILY_DIR
    from mergelab.demo.train_family import greedy_exact_match
    from mergelab.eval import load_model

    models = {name: load_model(FAMILY_DIR / name) for name in ("base", "addition", "reverse")}
    tok = models["base"][1]
    spec = EvalSpec.load(DATA_DIR / "eval_test.yml").with_limit(40)
    spec = spec.model_copy(update={"scorers": [s for s in spec.scorers if s.name in ("addition", "reverse")]})
    ev = Evaluator(spec, tok, batch_size=40)
    scores = {name: ev.evaluate(HFLogitModel(m, t)).scores for name, (m, t) in models.items()}
    # (Sort gains least, 89.5 -> 95.5 on the full split, too little to show on 40 items;
    # tests/test_family.py checks all three skills on all 200 test items.)
    assert scores["addition"]["addition"] > scores["base"]["addition"]
    assert scores["reverse"]["reverse"] > scores["base"]["reverse"]
    # The scorer agrees item for item with the family's own independent greedy checker.
    items = [json.loads(l) for l in (DATA_DIR / "addition" / "test.jsonl").read_text().splitlines()]
    picked = [(items[i]["prompt"], items[i]["answer"]) for i in subset(len(items), 40, 0)]
    with torch.no_grad():
        assert greedy_exact_match(models["base"][0], tok, picked, 12) == scores["base"]["addition"]
