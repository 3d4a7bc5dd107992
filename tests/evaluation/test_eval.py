"""`bbsmall eval`: perplexity and hits@1 against the same figures computed from transformers' logits."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from bbsmall_jax.cli import main as cli
from bbsmall_jax.cli.evaluate import format_report
from bbsmall_jax.evaluation.candidates import choose_candidates
from bbsmall_jax.evaluation.run import EvalSettings, evaluate
from bbsmall_jax.runtime.examples import Example, tokenize_examples
from bbsmall_jax.runtime.responder import load_chat_model
from bbsmall_jax.runtime.scoring import score_replies
from bbsmall_jax.testing.reference_models import scale_reference_decoder_embeddings

SOURCE, TARGET = 48, 32  # context and reply limits
WORDS = ("hello how are you today i am fine thanks what do like to eat pizza dogs cats music movies play games "
         "read books travel weekend work school friends family summer beach").split()


def make_examples(count: int = 25) -> list:
    """Distinct replies to varied contexts, all longer than half the limits (one length bucket: few
    compilations); some contexts are truncated and one reply is cut to the reply limit."""
    rng = np.random.default_rng(0)
    sentence = lambda low, high: " ".join(rng.choice(WORDS, rng.integers(low, high)))
    examples = [Example(tuple(sentence(17, 20) for _ in range(2)), f"{i} {sentence(12, 20)}")
                for i in range(count)]
    examples[3] = Example(tuple(sentence(20, 30) for _ in range(4)), examples[3].response)
    examples[5] = Example(examples[5].context, " ".join(WORDS) + " and more")
    return examples


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return load_chat_model(model_dir)


def reference_log_probs(hf, tokenizer, turns, replies) -> list:
    """transformers' log-probability of each token of each reply (token ids) to the context `turns`."""
    context = tokenizer.encode_conversation(list(turns), max_length=SOURCE, turn_separator="\n")
    width = max(map(len, replies))
    labels = torch.tensor([list(r) + [-100] * (width - len(r)) for r in replies])
    decoder_input = torch.cat([torch.full((len(replies), 1), hf.config.decoder_start_token_id), labels[:, :-1]], 1)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([context] * len(replies)),
                    decoder_input_ids=decoder_input.clamp(min=0)).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return [row[:len(r)].numpy() for row, r in zip(log_probs, replies)]


def test_perplexity_and_hits_match_transformers(model_dir, chat_model):
    model, tokenizer = chat_model
    hf = transformers.BlenderbotSmallForConditionalGeneration.from_pretrained(model_dir).eval()
    scale_reference_decoder_embeddings(hf)  # as the checkpoint (and we) embed decoder tokens
    examples = make_examples()
    replies = [(tokenizer(ex.response)["input_ids"] + [tokenizer.eos_token_id])[:TARGET] for ex in examples]
    assert max(len(r) for r in replies) == TARGET  # one reply is cut, as training cuts labels

    candidates = choose_candidates([ex.response for ex in examples], 20, seed=0)
    scored = [reference_log_probs(hf, tokenizer, examples[i].context, [replies[j] for j in row])
              for i, row in enumerate(candidates)]
    reference = np.array([[lp.mean() for lp in row] for row in scored])  # [25, 20] mean token log-probs
    perplexity = math.exp(-np.concatenate([row[0] for row in scored]).mean())
    hits = np.mean(reference[:, 0] > reference[:, 1:].max(axis=1))

    settings = EvalSettings(SOURCE, TARGET, hits_examples=0, batch_size=4, max_generate=0)
    report = evaluate(model, tokenizer, examples, settings)
    assert report.examples == 25 and report.tokens == sum(map(len, replies))
    assert report.perplexity == pytest.approx(perplexity, rel=1e-4)
    assert report.hits_candidates == 20 and report.hits_examples == 25
    assert report.hits_at_1 == hits

    data = tokenize_examples(examples, tokenizer, SOURCE, TARGET)
    assert (data.source_lengths > SOURCE // 2).all() and (data.target_lengths > TARGET // 2).all()
    assert len(tokenizer.encode_conversation(list(examples[3].context), max_length=512)) > SOURCE  # truncated
    scores = score_replies(model, data, np.arange(25), candidates, SOURCE, TARGET, rows_per_batch=80)
    np.testing.assert_allclose(scores.mean_log_prob, reference, rtol=1e-4, atol=1e-5)


def test_candidates_are_distinct_and_seeded():
    replies = ["a", "b", "a", "c", "d", "b", "e"]
    chosen = choose_candidates(replies, 20, seed=3)
    assert chosen.shape == (7, 5) and (chosen[:, 0] == np.arange(7)).all()
    for i, row in enumerate(chosen):
        texts = [replies[j] for j in row]
        assert len(set(texts)) == 5 and replies[i] not in texts[1:]
    assert (choose_candidates(replies, 20, seed=3) == chosen).all()


def write_examples(path, examples):
    path.write_text("".join(json.dumps({"context": list(ex.context), "response": ex.response}) + "\n"
                            for ex in examples))


def test_eval_command_summary_json(model_dir, tmp_path, capsys):
    write_examples(tmp_path / "held_out.jsonl", make_examples())
    assert cli.main(["eval", "--model", model_dir, "--data", str(tmp_path / "held_out.jsonl"), "--summary-json",
                     "--quiet", "--max-generate", "2", "--batch-size", "4", "--max-source-length", str(SOURCE),
                     "--max-target-length", str(TARGET)]) == 0  # the shapes the test above compiled
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    for key in ("perplexity", "token_accuracy", "hits_at_1", "distinct_1", "distinct_2", "mean_words", "examples",
                "wall_s"):
        assert key in summary, key
    assert summary["examples"] == 25 and summary["generated"] == 2 and summary["hits_candidates"] == 20
    assert any(line.startswith("perplexity") for line in out) and summary["perplexity"] > 1


def test_report_says_when_fewer_replies_than_candidates():
    summary = dict(model="m", data="d.jsonl", examples=6, tokens=60, max_source_length=64, max_target_length=32,
                   separator="newline", add_end=False, perplexity=12.0, token_accuracy=0.1, hits_at_1=0.5,
                   hits_candidates=6, hits_examples=6, candidates=20, generated=0, score_s=1.0, generate_s=0.0,
                   wall_s=2.0)
    line = next(line for line in format_report(summary).splitlines() if line.startswith("hits@1/6 "))
    assert line.endswith("0.5000 over 6 examples (only 6 distinct replies to rank)")


def test_eval_bad_line_names_file_and_line(model_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"context": ["hi"], "response": "hello"}\n{"context": ["hi"]}\n')
    assert cli.main(["eval", "--model", model_dir, "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_reply_token_log_probs_match_transformers_in_any_chunking(model_dir, chat_model, monkeypatch):
    """Each reply token's log-probability and the MAX_TOP best at its position, against transformers; calls
    cut to one row by a small logits budget give the same numbers as one call."""
    from bbsmall_jax.runtime import scoring

    model, tokenizer = chat_model
    hf = transformers.BlenderbotSmallForConditionalGeneration.from_pretrained(model_dir).eval()
    scale_reference_decoder_embeddings(hf)
    examples = make_examples(8)[:6]  # the longest context (3) and a reply cut to the limit (5) among them
    contexts = [tokenizer.encode_conversation(list(ex.context), max_length=SOURCE, turn_separator="\n")
                for ex in examples]
    replies = [(tokenizer(ex.response)["input_ids"] + [tokenizer.eos_token_id])[:TARGET] for ex in examples]
    together = scoring.reply_token_log_probs(model, contexts, replies)
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 1)
    one_by_one = scoring.reply_token_log_probs(model, contexts, replies)
    for example, reply, a, b in zip(examples, replies, together, one_by_one):
        expected = reference_log_probs(hf, tokenizer, example.context, [reply])[0]
        assert np.abs(a.chosen - expected).max() <= 1e-5 and np.abs(b.chosen - expected).max() <= 1e-5
        assert a.top.shape == (len(reply), scoring.MAX_TOP) and (a.top_ids == b.top_ids).all()
        assert np.abs(a.top - b.top).max() <= 1e-5 and (np.diff(a.top, axis=1) <= 0).all()
        assert (a.top[:, 0] >= a.chosen - 1e-6).all()
