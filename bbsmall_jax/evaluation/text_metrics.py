"""Figures of generated replies as text: distinct-n, mean length in words, how often replies repeat."""

from __future__ import annotations

import collections
from typing import Sequence


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Distinct n-grams of words over all n-grams of all replies (n-grams do not cross replies); 0 if none."""
    grams = [tuple(words[i:i + n]) for words in (reply.split() for reply in replies)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_words(replies: Sequence[str]) -> float:
    """Mean length of the replies in whitespace-separated words."""
    return sum(len(reply.split()) for reply in replies) / len(replies) if replies else 0.0


def repetition(replies: Sequence[str]) -> tuple[float, float]:
    """(distinct replies / replies, the share of the most frequent reply)."""
    if not replies:
        return 0.0, 0.0
    counts = collections.Counter(replies)
    return len(counts) / len(replies), max(counts.values()) / len(replies)
