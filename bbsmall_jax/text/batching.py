"""Padding and truncation as transformers' tokenizers apply them, to lists or numpy arrays."""

from __future__ import annotations

from itertools import chain

import numpy as np

from bbsmall_jax.errors import UsageError


class BatchEncoding(dict):
    """`input_ids` / `attention_mask` dict that also allows attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve(padding, truncation, max_length, model_max_length, pad_token_id):
    """(padding mode, whether to truncate, max_length) with transformers' defaults and checks."""
    if max_length is not None and padding is False and truncation is None:
        truncation = True  # transformers: max_length alone means truncation
    pad_modes = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
    cut_modes = {None: False, False: False, "do_not_truncate": False, "only_second": False,
                 True: True, "longest_first": True, "only_first": True}
    if padding not in pad_modes or truncation not in cut_modes:
        raise UsageError(f"unsupported padding={padding!r} or truncation={truncation!r}")
    padding, truncate = pad_modes[padding], cut_modes[truncation]
    if max_length is None:
        max_length = model_max_length
        padding = None if padding == "max_length" and max_length is None else padding
        truncate = truncate and max_length is not None
    if max_length is not None and max_length < 1 and (truncate or padding == "max_length"):
        raise UsageError(f"max_length={max_length} is too short: truncation cannot make a sequence shorter than 1")
    if padding and pad_token_id is None:
        raise UsageError("padding needs a pad_token")
    return padding, truncate, max_length

def to_lists(ids: list[list[int]], target: int | None, left: bool, pad_token_id) -> BatchEncoding:
    """Lists of ids and masks, padded to `target` when given."""
    masks = [[1] * len(row) for row in ids]
    if target is not None:
        for rows, fill in ((ids, pad_token_id), (masks, 0)):
            for i, row in enumerate(rows):
                pad = [fill] * (target - len(row))
                rows[i] = pad + row if left else row + pad
    return BatchEncoding(input_ids=ids, attention_mask=masks)

def to_numpy(ids: list[list[int]], target: int | None, left: bool, pad_token_id) -> BatchEncoding:
    """[batch, length] int64 arrays padded to `target`, filled from the flat ids without per-row copies."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    longest = int(lengths.max(initial=0))
    if target is None and (lengths != longest).any() or target is not None and longest > target:
        raise UsageError("sequences have different lengths; pass padding=True (and truncation) for numpy output")
    width = longest if target is None else target
    positions = np.arange(width)
    mask = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    input_ids = np.full((len(ids), width), pad_token_id if target is not None else 0, dtype=np.int64)
    input_ids[mask] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return BatchEncoding(input_ids=input_ids, attention_mask=mask.astype(np.int64))
