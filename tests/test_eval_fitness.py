"""exact_match mode: forced (one teacher-forced pass instead of a generation loop) and the
keep_last logits the log-likelihood scorers ask for."""
from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.eval.evaluator import Evaluator
from mergelab.eval.models import HFLogitModel
from mergelab.eval.scorers import continuation_logprobs, make_batch
from tests.test_eval import BigramModel, _logprob_rows, make_llama, make_tokenizer, spec_of, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return make_llama(tok, seed=3)


class GreedyBigram(BigramModel):
    """The bigram table, also decoding greedily from it (generate mode's view of the same model)."""

    def generate_greedy(self, input_ids, attention_mask, max_new_tokens, eos_token_id=None, stop=None):
        rows = []
        for ids in input_ids:
            last, new = int(ids[-1]), []
            while len(new) < max_new_tokens:
                last = int(self.table[last].argmax())
                new.append(last)
                if last == eos_token_id or (stop is not None and stop(new)):
                    break
            rows.append(new)
        return rows


def test_forced_accuracy_and_answer_probability_on_a_hand_written_model(tmp_path, tok):
    # After '=' the model writes ' ' (p 0.6), then '4' (p 0.7), then '2' (p 0.8), then '\n' (p 0.9):
    # greedy decoding writes " 42\n". "42" is right; "4" is not (the model does not stop after 4).
    table = _logprob_rows(tok, {"=": {" ": math.log(0.6)}, " ": {"4": math.log(0.7)},
                                "4": {"2": math.log(0.8)}, "2": {"\n": math.log(0.9)}})
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1+1=", "answer": "42"}, {"prompt": "2+2=", "answer": "4"},
                                        {"prompt": "3=", "answer": " 42 "}])
    base = {"type": "exact_match", "data": "em.jsonl", "stop": ["\n"], "max_new_tokens": 6}
    spec = spec_of(tmp_path, [
        {"name": "gen", **base},
        {"name": "forced", **base, "mode": "forced"},
        {"name": "prob", **base, "mode": "forced", "score": "answer_prob", "weight": 2.0},
    ])
    ev = Evaluator(spec, tok)
    r = ev.evaluate(GreedyBigram(table))
    assert r.metrics["gen/accuracy"] == r.metrics["forced/accuracy"] == pytest.approx(2 / 3)
    flags = [s.last_correct for s in ev.scorers]  # in the scorers' (seeded) item order
    assert flags[0] == flags[1] == flags[2] and sorted(flags[0]) == [False, True, True]
    # p(" 42\n") = 0.6 * 0.7 * 0.8 * 0.9; p(" 4\n"): '\n' after '4' gets the rest of that row's mass.
    rest = (1 - 0.8) / (len(tok) - 1)
    want = (2 * 0.6 * 0.7 * 0.8 * 0.9 + 0.6 * 0.7 * rest) / 3
    assert r.metrics["forced/answer_prob"] == pytest.approx(want)
    assert r.scores["forced"] == pytest.approx(2 / 3) and r.scores["prob"] == pytest.approx(want)
    assert r.combined == pytest.approx(2 / 3 + 2 / 3 + 2 * want)
    assert r.directions["prob/answer_prob"] == "higher"


def test_forced_agrees_with_generation_item_by_item_on_a_real_model(tmp_path, tok, llama):
    # A random tiny Llama: whatever it writes greedily, forced mode must call right exactly the
    # items generate mode calls right. Answers: its own greedy text up to a stop character (right),
    # and the same text with one character changed (wrong).
    # (Only items whose greedy tokens before the stop are visible characters: a random model also
    # writes special tokens, which decoding drops, and forced mode rightly does not expect them.)
    model = HFLogitModel(llama, tok)
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(5)]
    outs = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        outs.append(model.generate_greedy(ids, torch.ones_like(ids), 10, eos_token_id=tok.eos_token_id)[0])
    special = set(tok.all_special_ids)

    def stop_at(new, stop_id):
        j = new.index(stop_id, 1) if stop_id in new[1:] else -1
        return j if j > 0 and not special & set(new[:j]) else -1

    ids_seen = sorted({t for o in outs for t in o[1:]} - special)
    stop_id = max(ids_seen, key=lambda c: sum(stop_at(o, c) > 0 for o in outs))
    stop = tok.decode([stop_id])
    records = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        j = stop_at(o, stop_id)
        if j < 0:
            continue
        answer = tok.decode(o[:j])
        if len(records) % 3 == 2:
            answer = answer[:-1] + ("a" if answer[-1] != "a" else "b")
        records.append({"prompt": p, "answer": answer})
    assert len(records) >= 6
    write_jsonl(tmp_path / "em.jsonl", records)
    base = {"type": "exact_match", "data": "em.jsonl", "stop": [stop], "max_new_tokens": 10, "strip": False}
    spec = spec_of(tmp_path, [{"name": "gen", **base}, {"name": "forced", **base, "mode": "forced",
                                                        "target_delimiter": ""}], batch_size=5)
    ev = Evaluator(spec, tok)
    r = ev.evaluate(model)
    gen, forced = (s.last_correct for s in ev.scorers)
    assert gen == forced
    assert 0 < sum(gen) < len(gen)  # both kinds of item are present, so the check has teeth
    assert r.metrics["gen/accuracy"] == r.metrics["forced/accuracy"]


def test_forced_mode_without_stop_strings_ends_the_answer_with_end_of_text(tmp_path, tok):
    eos = tok.eos_token
    table = _logprob_rows(tok, {"=": {"7": math.log(0.9)}})
    table[tok.convert_tokens_to_ids("7"), tok.eos_token_id] = 10.0  # after 7: end of text
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "3+4=", "answer": "7"}, {"prompt": "1=", "answer": "1"}])
    spec = spec_of(tmp_path, [{"name": "f", "type": "exact_match", "data": "em.jsonl", "mode": "forced",
                               "target_delimiter": ""}])
    ev = Evaluator(spec, tok)
    batch = ev.scorers[0].batches[0][1]
    assert tok.decode(batch.ids[0, -int(batch.cont_lens[0]):]) == "7" + eos
    assert ev.evaluate(GreedyBigram(table)).metrics["f/accuracy"] == 0.5


def test_forced_spec_errors_say_what_to_change(tmp_path, tok):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1=", "answer": "1"}])
    base = {"name": "a", "type": "exact_match", "data": "em.jsonl"}
    with pytest.raises(MergelabError, match=r"extract_regex cannot apply; remove extract_regex or use mode: generate"):
        spec_of(tmp_path, [{**base, "mode": "forced", "extract_regex": r"(\d+)"}])
    with pytest.raises(MergelabError, match=r"score: answer_prob needs mode: forced"):
        spec_of(tmp_path, [{**base, "score": "answer_prob"}])
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    spec = spec_of(tmp_path, [{**base, "mode": "forced"}])
    with pytest.raises(MergelabError, match=r"this tokenizer has none. Give the scorer a stop string"):
        Evaluator(spec, no_eos)


def test_keep_last_logits_equal_the_tail_of_the_full_logits(tok, llama):
    model = HFLogitModel(llama, tok)
    seqs = [tok("12+3=15")["input_ids"], tok("4=4")["input_ids"], tok("99+1=100")["input_ids"]]
    batch = make_batch(seqs, [2, 1, 3], None, 0, "cpu")
    full = model.logits(batch.ids, batch.mask)
    tail = model.logits(batch.ids, batch.mask, keep_last=4)
    assert tail.shape == (3, 4, model.vocab_size)
    torch.testing.assert_close(tail, full[:, -4:], rtol=1e-5, atol=1e-5)

    class FullOnly:  # a LogitModel without keep_last: the scorer slices what it gets
        device, vocab_size = model.device, model.vocab_size

        def logits(self, input_ids, attention_mask, prompt_lengths=None):
            return model.logits(input_ids, attention_mask)

    a_sums, a_greedy = continuation_logprobs(model, batch, greedy=True)
    b_sums, b_greedy = continuation_logprobs(FullOnly(), batch, greedy=True)
    torch.testing.assert_close(a_sums, b_sums, rtol=1e-6, atol=1e-6)
    assert a_greedy.tolist() == b_greedy.tolist()
    lp = torch.log_softmax(full[:, :-1], -1)
    ids = batch.ids
    want = [float(sum(lp[b, t, ids[b, t + 1]] for t in range(ids.shape[1] - 1 - k, ids.shape[1] - 1)))
            for b, k in enumerate([2, 1, 3])]
    assert a_sums.tolist() == pytest.approx(want, abs=1e-5)


# -- combine: geometric ------------------------------------------------------------------------------
def test_geometric_combine_is_the_weighted_geometric_mean_and_zero_when_a_skill_is_lost(tmp_path, tok):
    from mergelab.eval.evaluator import combine

    assert combine({"a": 0.9, "b": 0.4}, {"a": 1.0, "b": 1.0}, "sum") == pytest.approx(1.3)
    assert combine({"a": 0.9, "b": 0.4}, {"a": 1.0, "b": 1.0}, "geometric") == pytest.approx(0.6)
    assert combine({"a": 0.9, "b": 0.4}, {"a": 3.0, "b": 1.0}, "geometric") == pytest.approx(0.9 ** 0.75 * 0.4 ** 0.25)
    assert combine({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 1.0}, "geometric") == 0.0
    with pytest.raises(MergelabError, match=r"needs every score in \[0, 1\], but got b = 1.5"):
        combine({"a": 0.5, "b": 1.5}, {"a": 1.0, "b": 1.0}, "geometric")

    # Through the evaluator: two exact-match skills, 2/3 and 1/3 right.
    table = _logprob_rows(tok, {"=": {" ": math.log(0.6)}, " ": {"4": math.log(0.7)},
                                "4": {"2": math.log(0.8)}, "2": {"\n": math.log(0.9)}})
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1=", "answer": "42"}, {"prompt": "2=", "answer": "42"},
                                       {"prompt": "3=", "answer": "4"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "1=", "answer": "42"}, {"prompt": "2=", "answer": "4"},
                                       {"prompt": "3=", "answer": "4"}])
    base = {"type": "exact_match", "stop": ["\n"], "max_new_tokens": 6}
    scorers = [{"name": "a", "data": "a.jsonl", **base}, {"name": "b", "data": "b.jsonl", **base}]
    r = Evaluator(spec_of(tmp_path, scorers, combine="geometric"), tok).evaluate(GreedyBigram(table))
    assert r.combined == pytest.approx(math.sqrt(2 / 3 * 1 / 3)) and r.combine == "geometric"
    r = Evaluator(spec_of(tmp_path, scorers), tok).evaluate(GreedyBigram(table))
    assert r.combined == pytest.approx(1.0) and r.combine == "sum"


def test_geometric_combine_refuses_what_it_cannot_combine(tmp_path):
    write_jsonl(tmp_path / "em.jsonl", [{"prompt": "1=", "answer": "1"}])
    (tmp_path / "t.txt").write_text("abc")
    em = {"name": "em", "type": "exact_match", "data": "em.jsonl"}
    with pytest.raises(MergelabError, match=r"scorer 'ppl' is a perplexity scorer \(its score is -NLL, below 0\); use combine: sum"):
        spec_of(tmp_path, [em, {"name": "ppl", "type": "perplexity", "data": "t.txt"}], combine="geometric")
    with pytest.raises(MergelabError, match=r"needs positive weights .* scorer 'em' has weight 0"):
        spec_of(tmp_path, [{**em, "weight": 0}], combine="geometric")
