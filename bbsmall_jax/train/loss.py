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
tiles of about that many columns (static slices, unrolled), twice. The first pass keeps a running
log-sum-exp per row, the second recomputes each tile's logits and turns them into that tile's gradients.
[C, V] logits never reach HBM whole; the price is one more [C, D] x [D, V] matmul per chunk (four instead
of three). With `chunk_rows` 0 every row is one chunk, labelled or not, so nothing is sized at run time.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

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
    """How many tiles the vocabulary is walked in: about vocab / tile, preferring a count that divides it."""
    least = -(-vocab // tile)
    return next((n for n in range(least, 2 * least + 1) if vocab % n == 0), least)


def _tiles(table: Array, bias: Optional[Array], tiles: int) -> tuple[list, list, int]:
    """The table [V, D] and bias [V] (float32) as `tiles` static slices of W rows, and W. A count that does not
    divide V leaves the last tile short."""
    vocab = table.shape[0]
    width = -(-vocab // tiles)
    bias = jnp.zeros((vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    bounds = [(j * width, min((j + 1) * width, vocab)) for j in range(tiles)]
    # Each tile its own array, cut once for both passes: a matmul then reads its tile, not the whole table.
    table_tiles = jax.lax.optimization_barrier([table[a:b] for a, b in bounds])
    return table_tiles, [bias[a:b] for a, b in bounds], width


def _tile_logits(h: Array, table_tile: Array, bias_tile: Array) -> Array:
    """Float32 logits [C, W] of one tile."""
    return jnp.einsum("cd,wd->cw", h, table_tile, preferred_element_type=jnp.float32) + bias_tile


def _tiled_log_sum_exp(h, y, table_tiles, bias_tiles, width) -> tuple[Array, Array, Array]:
    """First pass over the tiles: (log-sum-exp [C], the label's logit [C], the sum of all logits [C])."""
    top = total = picked = summed = None
    for j, (table_tile, bias_tile) in enumerate(zip(table_tiles, bias_tiles)):
        logits = _tile_logits(h, table_tile, bias_tile)  # [C, W]
        tile_top = logits.max(axis=-1)
        new_top = tile_top if top is None else jnp.maximum(top, tile_top)
        tile_total = jnp.exp(logits - new_top[:, None]).sum(axis=-1)
        total = tile_total if total is None else total * jnp.exp(top - new_top) + tile_total
        local = y - j * width  # the label's column in this tile, if it is there
        here = (local >= 0) & (local < logits.shape[1])
        label_logit = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[1] - 1)[:, None], axis=-1)[:, 0]
        tile_picked, tile_summed = jnp.where(here, label_logit, 0.0), logits.sum(axis=-1)
        picked = tile_picked if picked is None else picked + tile_picked
        summed = tile_summed if summed is None else summed + tile_summed
        top = new_top
    return top + jnp.log(total), picked, summed


def _tiled_loss(h, y, live, table_tiles, bias_tiles, width, vocab, label_smoothing) -> tuple[Array, Array]:
    """(chunk's summed loss [], log-sum-exp [C]) from the first pass."""
    lse, picked, summed = _tiled_log_sum_exp(h, y, table_tiles, bias_tiles, width)
    loss = lse - (1.0 - label_smoothing) * picked
    if label_smoothing:
        loss = loss - label_smoothing * summed / vocab
    return jnp.where(live, loss, 0.0).sum(), lse


def _tiled_terms(h, y, live, table, bias, label_smoothing, tiles, compute_dtype):
    """A chunk's summed loss and its gradients (hidden [C, D], table [V, D], bias [V], float32), its logits
    made one vocabulary tile at a time, twice: the log-sum-exp, then the gradients.

    The tiles are a Python loop over static slices, not a loop in the program: nothing is sliced or updated
    at a run-time offset, and each tile's gradients are whole arrays, concatenated once."""
    vocab = table.shape[0]
    table_tiles, bias_tiles, width = _tiles(table, bias, tiles)
    h = h.astype(compute_dtype)
    loss, lse = _tiled_loss(h, y, live, table_tiles, bias_tiles, width, vocab, label_smoothing)
    d_h, d_table, d_bias = None, [], []
    for j, (table_tile, bias_tile) in enumerate(zip(table_tiles, bias_tiles)):
        probs = jnp.exp(_tile_logits(h, table_tile, bias_tile) - lse[:, None])  # [C, W]
        onehot = (j * width + jnp.arange(probs.shape[1]))[None, :] == y[:, None]
        grad = probs - jnp.where(onehot, 1.0 - label_smoothing, 0.0)
        if label_smoothing:
            grad = grad - label_smoothing / vocab
        grad = jnp.where(live[:, None], grad, 0.0).astype(compute_dtype)
        tile_d_h = jnp.einsum("cw,wd->cd", grad, table_tile, preferred_element_type=jnp.float32)
        d_h = tile_d_h if d_h is None else d_h + tile_d_h
        d_table.append(jnp.einsum("cw,cd->wd", grad, h, preferred_element_type=jnp.float32))  # [W, D]
        d_bias.append(grad.astype(jnp.float32).sum(axis=0))
    return loss, d_h, jnp.concatenate(d_table), None if bias is None else jnp.concatenate(d_bias)


def _every_row(hidden: Array, labels: Array) -> tuple[Array, Array, Array, Array]:
    """One chunk of every row, in place (no sort, nothing sized at run time): hidden [N, D], in-range labels
    [N], which rows are labels [N], their count []."""
    valid = labels != -100
    return hidden, jnp.where(valid, labels, 0), valid, valid.sum(dtype=jnp.int32)


def _tiled_chunk_loss(h, y, live, table, bias, label_smoothing, tiles, compute_dtype) -> Array:
    """A chunk's summed loss [], its logits made one vocabulary tile at a time (table in the compute dtype)."""
    table_tiles, bias_tiles, width = _tiles(table, bias, tiles)
    return _tiled_loss(h.astype(compute_dtype), y, live, table_tiles, bias_tiles, width, table.shape[0],
                       label_smoothing)[0]


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
