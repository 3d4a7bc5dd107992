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


def _chunk(sorted_hidden, sorted_labels, count, i, chunk_rows, table, bias):
    """Chunk i: hidden [C, D], labels [C], float32 logits [C, V], which rows are labels [C]."""
    start = i * chunk_rows
    h = jax.lax.dynamic_slice_in_dim(sorted_hidden, start, chunk_rows)
    y = jax.lax.dynamic_slice_in_dim(sorted_labels, start, chunk_rows)
    logits = jnp.einsum("cd,vd->cv", h.astype(table.dtype), table, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    live = start + jnp.arange(chunk_rows) < count
    return h, y, logits, live


def _loss_only(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype):
    sorted_hidden, sorted_labels, _, count, chunks = _prepare(hidden, labels, chunk_rows)
    table = table.astype(compute_dtype)

    def chunk_loss(i):
        _, y, logits, live = _chunk(sorted_hidden, sorted_labels, count, i, chunk_rows, table, bias)
        loss, _ = _target_terms(logits, y, label_smoothing)
        return jnp.where(live, loss, 0.0).sum()

    total = jax.lax.fori_loop(1, chunks, lambda i, total: total + chunk_loss(i), chunk_loss(0))
    return total, count


def _loss_and_grads(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype):
    n, d = hidden.shape
    sorted_hidden, sorted_labels, order, count, chunks = _prepare(hidden, labels, chunk_rows)
    low_table = table.astype(compute_dtype)

    def chunk_terms(i):
        """Chunk i's summed loss and its gradients: hidden [C, D], table [V, D], bias [V] (all float32)."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype):
    return _loss_only(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype)


def _fused_fwd(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype):
    out, grads = _loss_and_grads(hidden, table, bias, labels, label_smoothing, chunk_rows, compute_dtype)
    return out, grads


def _fused_bwd(label_smoothing, chunk_rows, compute_dtype, residuals, cotangents):
    d_hidden, d_table, d_bias = residuals
    g = cotangents[0]  # the count's cotangent is ignored: it is an integer
    scale = lambda x: None if x is None else (x * g.astype(x.dtype))
    return scale(d_hidden), scale(d_table), scale(d_bias), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def lm_head_loss(hidden: Array, table: Array, bias: Optional[Array], labels: Array, label_smoothing: float = 0.0,
                 chunk_rows: int = 128, compute_dtype=jnp.float32) -> tuple[Array, Array]:
    """(sum of token losses float32 [], number of labels int32 []) of the tied LM head over `hidden`.

    hidden [..., D] (any compute dtype), table [V, D] (the shared embedding), bias [V] or None, labels
    [...] with -100 where there is no target. The logits are `hidden @ table.T + bias` in
    `compute_dtype` with float32 accumulation; the loss is torch's `CrossEntropyLoss(label_smoothing=...)`
    summed over the labels.
    """
    d = hidden.shape[-1]
    return _fused(hidden.reshape(-1, d), table, bias, labels.reshape(-1), float(label_smoothing), int(chunk_rows),
                  jnp.dtype(compute_dtype))
