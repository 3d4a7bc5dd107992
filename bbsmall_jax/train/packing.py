"""Sequence packing (`packing: true`): several examples share one batch row, as t5x/seqio pack them.

Each row of a bucket shape (source_len, target_len) holds examples one after another in both its source and
its target. Segment ids (1, 2, ... per example, 0 on padding) and positions that restart at each example go
with the tokens; the train step turns them into attention masks by segment (encoder self-attention, causal
decoder self-attention, cross-attention), so no example sees another, and restarts the decoder input at each
example's first token. The loss is the same sum over target tokens, so packed and unpacked batches of the
same examples give the same loss and gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.model import shift_tokens_right
from bbsmall_jax.runtime.examples import TokenizedExamples
from bbsmall_jax.train.data import BucketBatcher

WINDOW = 64  # open rows an example may join: first fit among the newest, so packing stays linear in examples
PACKED_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")


def pack(source_lengths: np.ndarray, target_lengths: np.ndarray, order: np.ndarray, source_len: int,
         target_len: int) -> list[list[int]]:
    """Rows of example indices: the examples of `order`, in that order, each put in the first of the WINDOW
    newest rows with room for both its source and its target (a new row when none has)."""
    rows: list[list[int]] = []
    room = np.zeros((0, 2), np.int64)  # [open rows, 2] source and target tokens left, newest last
    first_open = 0  # index in `rows` of room[0]
    for example in order:
        need = np.array([source_lengths[example], target_lengths[example]])
        fits = np.flatnonzero((room >= need).all(axis=1))
        if len(fits):
            rows[first_open + fits[0]].append(int(example))
            room[fits[0]] -= need
            continue
        rows.append([int(example)])
        room = np.concatenate([room, [[source_len, target_len] - need]])
        if len(room) > WINDOW:
            room, first_open = room[1:], first_open + 1
    return rows


def row_matrix(rows: list[list[int]]) -> np.ndarray:
    """Packed rows as a [rows, segments] matrix of example indices, -1 past each row's last."""
    matrix = np.full((len(rows), max(map(len, rows))), -1, np.int64)
    for r, examples in enumerate(rows):
        matrix[r, :len(examples)] = examples
    return matrix


class PackedBatcher(BucketBatcher):
    """`BucketBatcher` whose batches are rows of packed examples: each bucket's examples of an epoch (in its shuffled
    order) packed into rows of that bucket's shape, `batch_size` rows a batch, the batches shuffled.

    A scheduled batch's `rows` is [batch_size, segments] example indices (-1 past a row's last). Deterministic:
    epoch e's batches depend only on (seed, e), so a resumed run continues with the same batches."""

    ROWS = " packed rows"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.drop_remainder:
            raise UsageError("packed batches are for training: evaluation keeps one example per row")

    def bucket_batches(self, bucket: int, examples: np.ndarray) -> list[np.ndarray]:
        """One bucket's `examples` packed, in order, into rows of its shape; full batches of them only."""
        rows = pack(self.data.source_lengths, self.data.target_lengths, examples, *self.buckets[bucket])
        return [row_matrix(rows[k * self.batch_size:(k + 1) * self.batch_size])
                for k in range(len(rows) // self.batch_size)]

    def materialize(self, bucket: tuple[int, int], rows: np.ndarray) -> dict[str, np.ndarray]:
        return packed_rows(self.data, bucket, rows, self.pad_token_id)


def packed_rows(data: TokenizedExamples, bucket: tuple[int, int], rows: np.ndarray,
                pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-padded int32 arrays of packed rows [R, segments] of example indices into `data` (-1 past a row's
    last): input_ids, attention_mask and the encoder's segment ids and positions [R, S]; labels (-100 on
    padding) and the decoder's segment ids and positions [R, T]."""
    source_len, target_len = bucket
    n = len(rows)
    out = {name: np.zeros((n, length), np.int32) for name, length in (
        ("input_ids", source_len), ("encoder_segment_ids", source_len), ("encoder_positions", source_len),
        ("labels", target_len), ("decoder_segment_ids", target_len), ("decoder_positions", target_len))}
    out["input_ids"][:] = pad_token_id
    out["labels"][:] = -100
    for r, examples in enumerate(rows):
        at = [0, 0]  # next free source and target column
        for segment, example in enumerate(examples[examples >= 0], start=1):
            for side, (ids, name) in enumerate(((data.source_ids(example), "input_ids"),
                                                (data.target_ids(example), "labels"))):
                span = slice(at[side], at[side] + len(ids))
                prefix = ("encoder", "decoder")[side]
                out[name][r, span] = ids
                out[f"{prefix}_segment_ids"][r, span] = segment
                out[f"{prefix}_positions"][r, span] = np.arange(len(ids))
                at[side] += len(ids)
    out["attention_mask"] = (out["encoder_segment_ids"] > 0).astype(np.int32)
    return out


def is_packed(batch: dict) -> bool:
    """Whether a batch's rows are packed (it carries segment ids)."""
    return "decoder_segment_ids" in batch


def packed_model_inputs(batch: dict, pad_token_id: int, decoder_start_token_id: int) -> dict:
    """The model's inputs for a packed batch: decoder inputs restarting at each example (its first position gets
    the decoder start token), positions, and the masks by segment ([B, S, S] encoder, [B, T, T] decoder, to
    which the decoder adds its causal mask, [B, T, S] cross-attention)."""
    source, target = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    real_keys = source[:, None, :] > 0
    shifted = shift_tokens_right(batch["labels"], pad_token_id, decoder_start_token_id)
    return dict(
        decoder_input_ids=jnp.where(batch["decoder_positions"] == 0, decoder_start_token_id, shifted),
        encoder_mask=(source[:, :, None] == source[:, None, :]) & real_keys,
        decoder_mask=target[:, :, None] == target[:, None, :],
        cross_mask=(target[:, :, None] == source[:, None, :]) & real_keys,
        encoder_positions=batch["encoder_positions"], decoder_positions=batch["decoder_positions"])
