"""The LM head and cross-entropy fused and chunked: logits only at label positions, never all at once.

`lm_head_loss(hidden, table, bias, labels)` equals `cross_entropy_loss(hidden @ table.T + bias, labels)`
times the number of labels, and so do its gradients. It moves the rows that have a label to the front and
walks over them in chunks of `chunk_rows`, for as many chunks as there are labels (a `while_loop` with a
run-time trip count, so padding rows cost nothing). A chunk's logits [C, V] are made, reduced and dropped.

Under differentiation the forward pass also computes the gradients, as Liger's fused linear cross-entropy
does: the loss is the last thing computed, so its cotangent is a scalar that only scales them. That is
three matmuls per chunk ([C, D] x [D, V] for the logits, then the hidden and table gradients), the same
as autodiff of the plain loss, without [N, V] float32 logits, their softmax and their gradient held in
memory, and without the recomputation that a checkpointed chunk loop would need. Without differentiation
(evaluation) only the loss is computed.

With `vocab_tile` (accelerators), a chunk's logits are not made whole either: the vocabulary is walked in
tiles of about that many columns (a `lax.scan` over the stacked tiles), twice. The first pass keeps a running
log-sum-exp per row, the second recomputes each tile's logits and turns them into that tile's gradients.
[C, V] logits never reach HBM whole; the price is one more [C, D] x [D, V] matmul per chunk (four instead
of three). With `chunk_rows` 0 every row is one chunk, labelled or not, so nothing is sized at run time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from bbsmall_jax.nn.layout import rows_sharded

Array = jax.Array


def _target_terms(logits: Array, labels: Array, label_smoothing: float) -> tuple[Array, Array]:
    """Per-row loss [C] and d loss / d logits [C, V] of float32 logits [C, V] and in-range labels [C]."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    # (1 - s) * nll + s * mean over the vocabulary of -log p, as torch's CrossEntropyLoss(label_smoothing=s)
    loss = lse - (1.0 - label_smoothing) * picked
    if label_smoothing:
        loss = loss - label_smoothing * logits.mean(axis=-1)
    probs = jnp.exp(logits - lse[:, None])
    onehot = jnp.arange(logits.shape[-1])[None, :] == labels[:, None]
    grad = probs - jnp.where(onehot, 1.0 - label_smoothing, 0.0)
    if label_smoothing:
        grad = grad - label_smoothing / logits.shape[-1]
    return loss, grad


def _prepare(hidden: Array, labels: Array, chunk_rows: int):
    """Rows with a label first (stable), padded to whole chunks: (hidden [M, D], labels [M], order [N],
    count [], chunks to run [])."""
    n = labels.shape[0]
    valid = labels != -100
    order = jnp.argsort(jnp.logical_not(valid), stable=True)  # [N] labelled rows first, in their order
    padded = -(-n // chunk_rows) * chunk_rows
    sorted_hidden = jnp.pad(hidden[order], ((0, padded - n), (0, 0)))
    sorted_labels = jnp.pad(jnp.where(valid, labels, 0)[order], (0, padded - n))
    count = valid.sum(dtype=jnp.int32)
    return sorted_hidden, sorted_labels, order, count, (count + chunk_rows - 1) // chunk_rows


def _chunk_rows(sorted_hidden, sorted_labels, count, i, chunk_rows):
    """Chunk i: hidden [C, D], labels [C], which rows are labels [C]."""
    start = i * chunk_rows
    h = jax.lax.dynamic_slice_in_dim(sorted_hidden, start, chunk_rows)
    y = jax.lax.dynamic_slice_in_dim(sorted_labels, start, chunk_rows)
    return h, y, start + jnp.arange(chunk_rows) < count


def _chunk(sorted_hidden, sorted_labels, count, i, chunk_rows, table, bias):
    """Chunk i: hidden [C, D], labels [C], float32 logits [C, V], which rows are labels [C]."""
    h, y, live = _chunk_rows(sorted_hidden, sorted_labels, count, i, chunk_rows)
    logits = jnp.einsum("cd,vd->cv", h.astype(table.dtype), table, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return h, y, logits, live


def tile_count(vocab: int, tile: int) -> int:
    """How many tiles the vocabulary is walked in: about vocab / tile, preferring a count that divides it into
    widths that are multiples of 16 (a bfloat16 TPU tile's rows, so that [V, D] <-> [tiles, W, D] moves no
    data), then any count that divides it."""
    least = -(-vocab // tile)
    counts = range(least, 2 * least + 1)
    return next((n for n in counts if vocab % n == 0 and (vocab // n) % 16 == 0),
                next((n for n in counts if vocab % n == 0), least))


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """The table and bias cut into `count` tiles of `width` columns, stacked for `lax.scan`; rows past the
    vocabulary (when the count does not divide it) are zeros and are masked out of every sum."""

    table: Array  # [T, W, D], compute dtype
    bias: Array  # [T, W] float32
    width: int
    vocab: int

    @property
    def padded(self) -> bool:
        return self.table.shape[0] * self.width != self.vocab

    def columns(self, j: Array) -> Array:
        """Tile j's vocabulary ids [W]."""
        return j * self.width + jnp.arange(self.width)

    def in_vocab(self, j: Array) -> Array:
        """Which of tile j's columns are vocabulary ids [W]."""
        return self.columns(j) < self.vocab

    @property
    def xs(self) -> tuple[Array, Array, Array]:
        """What a scan over the tiles walks: (tile index [T], table [T, W, D], bias [T, W])."""
        return jnp.arange(self.table.shape[0]), self.table, self.bias


def _tiles(table: Array, bias: Optional[Array], count: int) -> _Tiles:
    vocab, d = table.shape
    width = -(-vocab // count)
    bias = jnp.zeros((vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    extra = count * width - vocab
    table = jnp.pad(table, ((0, extra), (0, 0))).reshape(count, width, d)  # [T, W, D]
    return _Tiles(table, jnp.pad(bias, (0, extra)).reshape(count, width), width, vocab)


def _tile_logits(h: Array, tiles: _Tiles, table_tile: Array, bias_tile: Array, j: Array) -> Array:
    """Float32 logits [C, W] of tile j; -inf past the vocabulary."""
    logits = jnp.einsum("cd,wd->cw", h, table_tile, preferred_element_type=jnp.float32) + bias_tile
    return jnp.where(tiles.in_vocab(j)[None, :], logits, -jnp.inf) if tiles.padded else logits


def _own_tile(xs):
    """A scan step's tile as arrays of its own: the slice of the stacked table is cut once, and the matmuls
    that use it read that tile, not the stack (which XLA would otherwise fuse in as their operand)."""
    return jax.lax.optimization_barrier(xs)


def _tiled_log_sum_exp(h, y, tiles: _Tiles) -> tuple[Array, Array, Array]:
    """First pass over the tiles: (log-sum-exp [C], the label's logit [C], the sum of all logits [C])."""
    def step(carry, xs):
        top, total, picked, summed = carry  # [C] each: running max, sum of exp(logit - top), label logit, sum
        j, table_tile, bias_tile = _own_tile(xs)
        logits = _tile_logits(h, tiles, table_tile, bias_tile, j)  # [C, W]
        new_top = jnp.maximum(top, logits.max(axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[:, None]).sum(axis=-1)
        picked = picked + jnp.where(tiles.columns(j)[None, :] == y[:, None], logits, 0.0).sum(axis=-1)
        finite = jnp.where(tiles.in_vocab(j)[None, :], logits, 0.0) if tiles.padded else logits
        return rows_sharded((new_top, total, picked, summed + finite.sum(axis=-1))), None

    zeros = jnp.zeros(y.shape, jnp.float32)
    (top, total, picked, summed), _ = jax.lax.scan(
        step, rows_sharded((jnp.full(y.shape, -jnp.inf), zeros, zeros, zeros)), tiles.xs)
    return top + jnp.log(total), picked, summed


def _tiled_loss(h, y, live, tiles: _Tiles, label_smoothing) -> tuple[Array, Array]:
    """(chunk's summed loss [], log-sum-exp [C]) from the first pass."""
    lse, picked, summed = _tiled_log_sum_exp(h, y, tiles)
    loss = lse - (1.0 - label_smoothing) * picked
    if label_smoothing:
        loss = loss - label_smoothing * summed / tiles.vocab
    return jnp.where(live, loss, 0.0).sum(), lse


def _tiled_terms(h, y, live, table, bias, label_smoothing, count, compute_dtype):
    """A chunk's summed loss and its gradients (hidden [C, D], table [V, D], bias [V], float32), its logits
    made one vocabulary tile at a time, twice: the log-sum-exp, then the gradients.

    Each pass is a `lax.scan` over the stacked tiles: one tile's work is traced and compiled once, however
    many tiles there are (an unrolled walk cost the 90M train step's TPU compile 40 s)."""
    tiles = _tiles(table, bias, count)
    h, y, live = rows_sharded((h.astype(compute_dtype), y, live))  # each device walks the tiles over its rows
    loss, lse = _tiled_loss(h, y, live, tiles, label_smoothing)

    def step(d_h, xs):  # d_h [C, D] float32, summed over the tiles
        j, table_tile, bias_tile = _own_tile(xs)
        probs = jnp.exp(_tile_logits(h, tiles, table_tile, bias_tile, j) - lse[:, None])  # [C, W]; 0 past V
        grad = probs - jnp.where(tiles.columns(j)[None, :] == y[:, None], 1.0 - label_smoothing, 0.0)
        if label_smoothing:
            grad = grad - jnp.where(tiles.in_vocab(j), label_smoothing / tiles.vocab, 0.0)[None, :]
        grad = jnp.where(live[:, None], grad, 0.0).astype(compute_dtype)
        d_h = rows_sharded(d_h + jnp.einsum("cw,wd->cd", grad, table_tile, preferred_element_type=jnp.float32))
        d_table = jnp.einsum("cw,cd->wd", grad, h, preferred_element_type=jnp.float32)  # [W, D]
        return d_h, (d_table, grad.astype(jnp.float32).sum(axis=0))

    d_h, (d_table, d_bias) = jax.lax.scan(step, rows_sharded(jnp.zeros(h.shape, jnp.float32)), tiles.xs)
    vocab, d = table.shape
    d_table = d_table.reshape(-1, d)[:vocab]  # [T, W, D] -> [V, D]
    return loss, d_h, d_table, None if bias is None else d_bias.reshape(-1)[:vocab]


def _every_row(hidden: Array, labels: Array) -> tuple[Array, Array, Array, Array]:
    """One chunk of every row, in place (no sort, nothing sized at run time): hidden [N, D], in-range labels
    [N], which rows are labels [N], their count []."""
    valid = labels != -100
    return hidden, jnp.where(valid, labels, 0), valid, valid.sum(dtype=jnp.int32)


def _tiled_chunk_loss(h, y, live, table, bias, label_smoothing, tiles, compute_dtype) -> Array:
    """A chunk's summed loss [], its logits made one vocabulary tile at a time (table in the compute dtype)."""
    h, y, live = rows_sharded((h.astype(compute_dtype), y, live))
    return _tiled_loss(h, y, live, _tiles(table, bias, tiles), label_smoothing)[0]


def _loss_only(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype):
    table = table.astype(compute_dtype)
    if not chunk_rows:
        h, y, live, count = _every_row(hidden, labels)
        return _tiled_chunk_loss(h, y, live, table, bias, label_smoothing, tiles, compute_dtype), count
    sorted_hidden, sorted_labels, _, count, chunks = _prepare(hidden, labels, chunk_rows)

    def chunk_loss(i):
        if tiles:
            h, y, live = _chunk_rows(sorted_hidden, sorted_labels, count, i, chunk_rows)
            return _tiled_chunk_loss(h, y, live, table, bias, label_smoothing, tiles, compute_dtype)
        _, y, logits, live = _chunk(sorted_hidden, sorted_labels, count, i, chunk_rows, table, bias)
        loss, _ = _target_terms(logits, y, label_smoothing)
        return jnp.where(live, loss, 0.0).sum()

    total = jax.lax.fori_loop(1, chunks, lambda i, total: total + chunk_loss(i), chunk_loss(0))
    return total, count


def _loss_and_grads(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype):
    n, d = hidden.shape
    if not chunk_rows:
        h, y, live, count = _every_row(hidden, labels)
        total, d_h, d_table, d_bias = _tiled_terms(h, y, live, table.astype(compute_dtype), bias, label_smoothing,
                                                   tiles, compute_dtype)
        return (total, count), (d_h.astype(hidden.dtype), d_table.astype(table.dtype),
                                None if bias is None else d_bias.astype(bias.dtype))
    sorted_hidden, sorted_labels, order, count, chunks = _prepare(hidden, labels, chunk_rows)
    low_table = table.astype(compute_dtype)

    def chunk_terms(i):
        """Chunk i's summed loss and its gradients: hidden [C, D], table [V, D], bias [V] (all float32)."""
        if tiles:
            h, y, live = _chunk_rows(sorted_hidden, sorted_labels, count, i, chunk_rows)
            return _tiled_terms(h, y, live, low_table, bias, label_smoothing, tiles, compute_dtype)
        h, y, logits, live = _chunk(sorted_hidden, sorted_labels, count, i, chunk_rows, low_table, bias)
        loss, grad = _target_terms(logits, y, label_smoothing)
        grad = jnp.where(live[:, None], grad, 0.0).astype(compute_dtype)  # [C, V]
        d_h = jnp.einsum("cv,vd->cd", grad, low_table, preferred_element_type=jnp.float32)
        d_t = jnp.einsum("cv,cd->vd", grad, h.astype(compute_dtype), preferred_element_type=jnp.float32)
        d_b = None if bias is None else grad.astype(jnp.float32).sum(axis=0)
        return jnp.where(live, loss, 0.0).sum(), d_h, d_t, d_b

    # Chunk 0 runs even without labels (then its gradients are zeros): it starts the table's gradient
    # without a zero-filled [V, D] array and a first addition to it.
    total, d_h, d_table, d_bias = chunk_terms(0)
    d_sorted = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(sorted_hidden.shape, jnp.float32), d_h, 0, axis=0)

    def body(i, carry):
        total, d_sorted, d_table, d_bias = carry
        loss, d_h, d_t, d_b = chunk_terms(i)
        d_sorted = jax.lax.dynamic_update_slice_in_dim(d_sorted, d_h, i * chunk_rows, axis=0)
        return total + loss, d_sorted, d_table + d_t, None if d_bias is None else d_bias + d_b

    total, d_sorted, d_table, d_bias = jax.lax.fori_loop(1, chunks, body, (total, d_sorted, d_table, d_bias))
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    d_hidden = d_sorted[inverse]  # back to the rows' own order; rows without a label get zeros
    return (total, count), (d_hidden.astype(hidden.dtype), d_table.astype(table.dtype),
                            None if bias is None else d_bias.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype):
    return _loss_only(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype)


def _fused_fwd(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype):
    out, grads = _loss_and_grads(hidden, table, bias, labels, label_smoothing, chunk_rows, tiles, compute_dtype)
    return out, grads


def _fused_bwd(label_smoothing, chunk_rows, tiles, compute_dtype, residuals, cotangents):
    d_hidden, d_table, d_bias = residuals
    g = cotangents[0]  # the count's cotangent is ignored: it is an integer
    scale = lambda x: None if x is None else (x * g.astype(x.dtype))
    return scale(d_hidden), scale(d_table), scale(d_bias), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def lm_head_loss(hidden: Array, table: Array, bias: Optional[Array], labels: Array, label_smoothing: float = 0.0,
                 chunk_rows: int = 128, compute_dtype=jnp.float32, vocab_tile: int = 0) -> tuple[Array, Array]:
    """(sum of token losses float32 [], number of labels int32 []) of the tied LM head over `hidden`.

    hidden [..., D] (any compute dtype), table [V, D] (the shared embedding), bias [V] or None, labels
    [...] with -100 where there is no target. The logits are `hidden @ table.T + bias` in
    `compute_dtype` with float32 accumulation; the loss is torch's `CrossEntropyLoss(label_smoothing=...)`
    summed over the labels. `vocab_tile` > 0 walks the vocabulary in tiles of about that many columns
    (`tile_count`) instead of making a chunk's logits whole. `chunk_rows` 0 takes every row as one chunk,
    labelled or not, with nothing sized at run time: a program the SPMD partitioner can lay out over devices.
    """
    d = hidden.shape[-1]
    tiles = tile_count(table.shape[0], vocab_tile or table.shape[0]) if vocab_tile or not chunk_rows else 0
    return _fused(hidden.reshape(-1, d), table, bias, labels.reshape(-1), float(label_smoothing), int(chunk_rows),
                  tiles, jnp.dtype(compute_dtype))
