"""The candidate replies of hits@1: each example's own reply and distractors drawn from the other replies."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def choose_candidates(replies: Sequence[str], count: int, seed: int) -> np.ndarray:
    """[N, C] example indices: column 0 is the example itself, the other C - 1 = min(count, M) - 1 columns are
    distractors (M = the number of distinct reply texts), the first example of each of C - 1 distinct texts
    other than the example's own, drawn with `seed` (the same indices for the same replies and seed)."""
    first_of: dict[str, int] = {}
    for i, text in enumerate(replies):
        first_of.setdefault(text, i)
    texts = list(first_of)  # distinct texts, in order of first appearance
    position = {text: k for k, text in enumerate(texts)}
    pool = np.asarray([first_of[text] for text in texts], np.int64)
    others = min(count, len(texts)) - 1
    rng = np.random.default_rng(seed)
    chosen = np.empty((len(replies), max(others, 0) + 1), np.int64)
    for i, text in enumerate(replies):
        picks = rng.choice(len(texts) - 1, others, replace=False) if others > 0 else np.zeros(0, np.int64)
        own = position[text]
        chosen[i, 0] = i
        chosen[i, 1:] = pool[picks + (picks >= own)]  # skip the example's own text
    return chosen
