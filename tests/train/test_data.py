"""Data pipeline: JSONL and chitchat sources, the conversation formatting, bucketed deterministic resumable batches."""

import itertools
import json

import numpy as np
import pytest

from bbsmall_jax.records import SEPARATORS
from bbsmall_jax.runtime.examples import DataError, Example, tokenize_examples
from bbsmall_jax.testing.training import synthetic_examples
from bbsmall_jax.text.vocab_training import train_tokenizer
from bbsmall_jax.train import data as data_lib


@pytest.fixture(scope="module")
def chitchat():
    conversations = data_lib.chitchat_conversations()
    train, valid = data_lib.split_conversations(conversations, 0.05, seed=0)
    return conversations, train, valid


@pytest.fixture(scope="module")
def tokenizer(chitchat):
    _, train, _ = chitchat
    return train_tokenizer([turn for conversation in train[:500] for turn in conversation], 800)


def test_jsonl_both_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"context": ["hi", "hello there"], "response": "how are you?"}) + "\n\n"
                    + json.dumps({"text": "a\nb", "labels": ["c", "d"]}) + "\n")
    assert data_lib.read_jsonl(path) == [Example(("hi", "hello there"), "how are you?"),
                                         Example(("a", "b"), "c")]


@pytest.mark.parametrize("content, message", [
    ('{"context": ["a"], "response": "b"}\n{"context": ["a"]\n', r"d\.jsonl:2: not valid JSON"),
    ('{"context": ["a\n', r"d\.jsonl:1: not valid JSON \(Unterminated string starting at column 14\)"),
    ('{"context": ["a"]}\n', r'd\.jsonl:1: needs a "response" \(or "labels"\) string to train on'),
    ('{"prompt": "a"}\n', r'd\.jsonl:1: needs "context" \(a list of turns\) or "text"'),
    ('{"context": [1], "response": "b"}\n', r'd\.jsonl:1: "context" must be a string or a non-empty list of strings'),
    ('{"context": ["a"], "response": 3}\n', r'd\.jsonl:1: "response" must be a string or a list of strings, got 3'),
    ('{"text": "a", "context": ["a"], "response": "b"}\n', r'd\.jsonl:1: has both "context" and "text"'),
    ('{"context": [" "], "response": "b"}\n', r"d\.jsonl:1: the context is empty"),
    ("\n", r"d\.jsonl: holds no examples"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        data_lib.read_jsonl(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="cannot read data file .*missing.jsonl"):
        data_lib.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"context": ["a"], "response": "b"}\n\xff\xfe\x00\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not valid UTF-8 \(byte 0xff at byte 1 of the line\)"):
        data_lib.read_jsonl(tmp_path / "bin.jsonl")


def test_chitchat_split_by_conversation(chitchat):
    conversations, train, valid = chitchat
    assert len(conversations) == 7168 and len(train) + len(valid) == 7168
    assert 300 < len(valid) < 420
    assert not {id(c) for c in train} & {id(c) for c in valid}  # each conversation on one side only
    again_train, again_valid = data_lib.split_conversations(conversations, 0.05, seed=0)
    assert again_valid == valid and again_train == train  # fixed seed, fixed split
    assert data_lib.split_conversations(conversations, 0.05, seed=1)[1] != valid
    some = [c for c in valid if len(c) >= 3][:3]
    examples = data_lib.conversation_examples(some)
    assert examples[:2] == [Example((some[0][0],), some[0][1]),
                            Example((some[0][0], some[0][1]), some[0][2])]
    assert len(examples) == sum(len(c) - 1 for c in some)


def test_contexts_equal_the_tokenizers_conversation_helper(chitchat, tokenizer):
    _, train, _ = chitchat
    longest = max(train, key=len)  # hundreds of turns: contexts are left-truncated
    examples = data_lib.conversation_examples(train[:200] + [longest])
    for separator, add_end in (("newline", False), ("end_start", True)):
        data = tokenize_examples(examples, tokenizer, 48, 16, separator, add_end)
        for i in np.random.default_rng(0).choice(len(data), 300, replace=False):
            example = examples[data.example_index[i]]
            expected = tokenizer.encode_conversation(list(example.context), 48, SEPARATORS[separator],
                                                     add_end)
            assert data.source_ids(i).tolist() == expected
            response = tokenizer(example.response)["input_ids"] + [tokenizer.eos_token_id]
            assert data.target_ids(i).tolist() == response[:16]
        assert data.source_lengths.max() == 48 and data.target_lengths.max() == 16


def test_empty_contexts_are_dropped(tokenizer):
    examples = [Example(("   ",), "x"), Example(("hello",), "hi"), Example((), "y")]
    data = tokenize_examples(examples, tokenizer, 16, 8)
    assert len(data) == 1 and data.example_index.tolist() == [1]


def _batcher(data, **kwargs):
    return data_lib.BucketBatcher(data, 8, [(6, 4), (12, 8)], seed=3, pad_token_id=0, **kwargs)


def test_batches_are_static_bucketed_and_right_padded():
    data = synthetic_examples(300, 50, seed=0, max_source=12, max_target=8)
    batcher = _batcher(data)
    shapes = set()
    for scheduled in itertools.islice(batcher.schedule(), 60):
        batch = batcher.materialize(scheduled.bucket, scheduled.rows)
        source_len, target_len = scheduled.bucket
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, source_len)
        assert batch["labels"].shape == (8, target_len)
        for r, row in enumerate(scheduled.rows):
            src, tgt = data.source_ids(row), data.target_ids(row)
            assert batch["input_ids"][r, :len(src)].tolist() == src.tolist()
            assert (batch["input_ids"][r, len(src):] == 0).all()
            assert batch["attention_mask"][r].tolist() == [1] * len(src) + [0] * (source_len - len(src))
            assert (batch["labels"][r, len(tgt):] == -100).all()
        smaller = [b for b in batcher.buckets if b < scheduled.bucket]
        if smaller:  # the smallest bucket that fits
            lengths = data.source_lengths[scheduled.rows], data.target_lengths[scheduled.rows]
            assert all(((lengths[0] > s) | (lengths[1] > t)).all() for s, t in smaller)
        shapes.add(scheduled.bucket)
    assert shapes == {(6, 4), (12, 8)}


def test_batches_are_deterministic_and_resumable():
    data = synthetic_examples(300, 50, seed=0, max_source=12, max_target=8)
    rows = lambda scheduled: [p.rows.tolist() for p in scheduled]
    first = list(itertools.islice(_batcher(data).schedule(), 100))  # > 2 epochs
    assert rows(first) == rows(itertools.islice(_batcher(data).schedule(), 100))
    epoch_length = len(_batcher(data))
    assert rows(first[:epoch_length]) != rows(first[epoch_length:2 * epoch_length])  # reshuffled each epoch
    other_seed = data_lib.BucketBatcher(data, 8, [(6, 4), (12, 8)], seed=4, pad_token_id=0)
    assert rows(first[:10]) != rows(itertools.islice(other_seed.schedule(), 10))
    for k in (7, epoch_length, epoch_length + 5):  # resume mid-epoch and at an epoch boundary
        resumed = itertools.islice(_batcher(data).schedule(first[k].position), 100 - k)
        assert rows(resumed) == rows(first[k:])
    # Training drops each bucket's remainder; an epoch uses every example at most once.
    epoch_rows = np.concatenate([p.rows for p in first[:epoch_length]])
    assert len(set(epoch_rows.tolist())) == len(epoch_rows) > 300 - 2 * 8


def test_evaluation_batches_cover_everything_once():
    data = synthetic_examples(45, 50, seed=0, max_source=12, max_target=8)
    batcher = _batcher(data, drop_remainder=False)
    scheduled = list(itertools.islice(batcher.schedule(), len(batcher)))
    rows = np.concatenate([p.rows for p in scheduled])
    assert sorted(rows[rows >= 0].tolist()) == list(range(45))
    filler = batcher.materialize(scheduled[-1].bucket, np.full(8, -1))
    assert (filler["labels"] == -100).all() and (filler["attention_mask"] == 0).all()


def test_prefetcher_surfaces_errors():
    def broken():
        yield 1
        raise ValueError("bad record")

    batches = data_lib.Prefetcher(broken(), 2)
    assert next(batches) == 1
    with pytest.raises(ValueError, match="bad record"):
        next(batches)
