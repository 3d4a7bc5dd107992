"""Dialogue examples and their tokenization: (context turns, reply) pairs as ragged token ids, built as
`BlenderbotSmallTokenizer.encode_conversation` builds contexts. Training, evaluation and reply scoring all
take their examples from here."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np

from bbsmall_jax.errors import UsageError
from bbsmall_jax.records import SEPARATORS


class DataError(UsageError):
    """Data that cannot be read or used; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: the conversation so far and the reply to learn."""

    context: tuple[str, ...]
    response: str


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
    """Ragged token ids of N examples: example i's source is `source[source_offsets[i]:source_offsets[i+1]]`."""

    source: np.ndarray  # [total source tokens] int32
    source_offsets: np.ndarray  # [N + 1] int64
    target: np.ndarray  # [total target tokens] int32
    target_offsets: np.ndarray  # [N + 1] int64
    example_index: Optional[np.ndarray] = None  # [N] position of each in the examples it was made from

    def __len__(self) -> int:
        return len(self.source_offsets) - 1

    @property
    def source_lengths(self) -> np.ndarray:
        return np.diff(self.source_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        return np.diff(self.target_offsets)

    def source_ids(self, i: int) -> np.ndarray:
        return self.source[self.source_offsets[i]:self.source_offsets[i + 1]]

    def target_ids(self, i: int) -> np.ndarray:
        return self.target[self.target_offsets[i]:self.target_offsets[i + 1]]


def ragged(rows: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids and offsets of rows, each row a list of id lists (flattened in C, not in Python)."""
    lengths = [sum(len(part) for part in row) for row in rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(rows))
    return np.fromiter(flat, np.int32, count=int(offsets[-1])), offsets


def _left_truncated(context: Sequence[str], ids: dict, sep: str, budget: int) -> list[list[int]]:
    """`encode_conversation`'s rule: drop whole turns from the left to fit; a last turn too long keeps its end."""
    kept, total = [], 0
    for k in range(len(context) - 1, -1, -1):  # newest turn first; stops at the first that does not fit
        turn = ids[context[k]] if k == len(context) - 1 else ids[context[k] + sep]
        if total + len(turn) > budget:
            if not kept:
                kept = [turn[-budget:]]
            break
        kept.append(turn)
        total += len(turn)
    return kept[::-1]


def tokenize_examples(examples: Sequence[Example], tokenizer, max_source_length: int, max_target_length: int,
                      separator: str = "newline", add_end: bool = False) -> TokenizedExamples:
    """Token ids of contexts and responses.

    A context is what `tokenizer.encode_conversation(turns, max_source_length, separator, add_end)`
    returns: turns joined by the separator, oldest whole turns dropped to fit. The same ids are built
    here from one batched encoding of each distinct `turn + separator` (tests check the equality), which
    is what makes the pipeline fast. A response gets `__end__` appended and is then cut to
    `max_target_length`, as ParlAI truncates labels. Examples whose context has no tokens are dropped.
    """
    sep = SEPARATORS[separator]
    turns = set().union(*(ex.context for ex in examples))  # distinct context turns (a C-level union: fast)
    texts = sorted({t + sep for t in turns} | turns | {ex.response for ex in examples})
    ids = dict(zip(texts, tokenizer(texts)["input_ids"])) if texts else {}
    budget = max_source_length - (1 if add_end else 0)
    eos = tokenizer.eos_token_id
    sources, targets, kept = [], [], []
    for i, ex in enumerate(examples):
        source = _left_truncated(ex.context, ids, sep, budget)
        if not any(source):
            continue
        kept.append(i)
        sources.append(source + [[eos]] if add_end else source)
        targets.append([(ids[ex.response] + [eos])[:max_target_length]])
    if not sources:
        raise DataError("no example has a non-empty context")
    return TokenizedExamples(*ragged(sources), *ragged(targets), np.asarray(kept, np.int64))
