"""The portable plan's one-token attention while decoding, with heads merged: lane-dense on TPU.

Split into [.., H, Dh], head_dim 32 fills a quarter of each 128-wide TPU tile, and XLA either copies the
cache into such a layout every step or multiplies in float32 on the vector units (converting the entries
first). Here keys and values are read as [.., H * Dh] and both products are matmuls on them as they lie,
in the compute dtype with float32 accumulation like the model's einsums: the query is spread over
block-diagonal rows (row h holds head h's Dh entries, zeros elsewhere), so scores [H, S] = rows . keys;
the output is the diagonal blocks of weights . values (head h's columns of row h). The zeros add exactly
nothing.

Self-attention reads the cache's history position by position (`KVCache.history_by_position`: through
its origins in beam search, a gather XLA fuses into the read); cross-attention reads the entries each batch
element's rows share.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.nn.layers import Attention

Array = jax.Array


def head_blocks(heads: int, head_dim: int) -> Array:
    """[H, H * Dh] bool: True where the column belongs to the row's head."""
    columns = jnp.arange(heads * head_dim) // head_dim
    return columns[None, :] == jnp.arange(heads)[:, None]


def spread_query(query: Array, blocks: Array, dtype) -> Array:
    """One query token [B, 1, H, Dh] -> block-diagonal rows [B, H, H * Dh] in `dtype`."""
    merged = query.reshape(query.shape[0], 1, -1).astype(dtype)  # [B, 1, D]
    return jnp.where(blocks, merged, 0).astype(dtype)


def by_head(full: Array, blocks: Array) -> Array:
    """Rows per head [B, H, H * Dh] -> [B, H * Dh]: head h's columns of row h."""
    return jnp.sum(jnp.where(blocks, full, 0.0), axis=1)


def attend(attention: Attention, query: Array, key: Array, value: Array,
           bias: Optional[Array]) -> tuple[Array, Array]:
    """`Attention.attend` for one query token, deterministic (cross-attention while decoding).

    query [B, 1, H, Dh]; key/value [G, S, H, Dh], each shared by B / G consecutive rows; bias broadcastable
    to [B or G, H, 1, S]. Returns the output [B, 1, D] and the float32 weights [B, H, 1, S].
    """
    rows, _, heads, head_dim = query.shape
    groups, length = key.shape[:2]
    dtype, blocks = attention.dtype, head_blocks(heads, head_dim)
    merge = lambda x: x.reshape(groups, length, -1).astype(dtype)  # [G, S, H, Dh] -> [G, S, D]
    spread = spread_query(query, blocks, dtype).reshape(groups, rows // groups * heads, -1)  # [G, B / G * H, D]
    scores = jnp.einsum("gqd,gsd->gqs", spread, merge(key), preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores = scores.reshape(groups, rows // groups, heads, length)  # [G, B / G, H, S]
    if bias is not None:  # [B or G, H or 1, 1, S] -> [G, B / G or 1, H or 1, S]
        bias = bias[:, :, 0]
        scores = scores + (bias.reshape((groups, -1) + bias.shape[1:]) if bias.shape[0] == rows else bias[:, None])
    weights = jax.nn.softmax(scores, axis=-1)
    grouped = weights.astype(dtype).reshape(groups, rows // groups * heads, length)
    full = jnp.einsum("gqs,gsd->gqd", grouped, merge(value), preferred_element_type=jnp.float32)
    out = by_head(full.reshape(rows, heads, -1), blocks).astype(dtype)  # [B, D]
    return attention.project_out(out.reshape(query.shape)), weights.reshape(rows, heads, 1, length)


def spread_heads(weights: Array, blocks: Array) -> Array:
    """[..., H] -> [..., H * Dh], each head's weight over its columns (exact: one term per column)."""
    return jnp.einsum("...h,hd->...d", weights, blocks.astype(weights.dtype))


def attend_cached(attention: Attention, query: Array, key: Array, value: Array, cache: KVCache,
                  cache_bias: Array, bias: Array, layer: int) -> tuple[Array, Array]:
    """`Attention.attend_cached` for one new token, deterministic.

    Elementwise over the history as `KVCache.history_by_position` gathers it, [K, B, D]: a batched matmul
    per row would want it row-major, and XLA then takes minutes to compile beam search's step.
    """
    rows, _, heads, head_dim = query.shape
    dtype, blocks = attention.dtype, head_blocks(heads, head_dim)
    keys, values = cache.history_by_position(layer)  # [K, B, D]
    spread = spread_query(query, blocks, dtype)  # [B, H, D]
    old = jnp.einsum("kbd,bhd->kbh", keys.astype(dtype), spread, preferred_element_type=jnp.float32) * head_dim ** -0.5
    old = old + jnp.transpose(cache_bias[:, 0], (2, 0, 1))  # [B or 1, 1, K] -> [K, B or 1, 1]
    new = attention._scores("bthd,bshd->bhts", query, key)[:, :, 0, 0] + bias[:, 0, 0]  # [B, H]
    weights = jax.nn.softmax(jnp.concatenate([old, new[None]], axis=0), axis=0)  # [K + 1, B, H]
    cast = weights.astype(dtype)
    mixed = jnp.einsum("kbd,kbd->bd", spread_heads(cast[:-1], blocks), values.astype(dtype),
                       preferred_element_type=jnp.float32)  # [B, D]
    out = mixed.astype(dtype).reshape(query.shape) + jnp.einsum("bh,bshd->bshd", cast[-1], value.astype(dtype))
    placed = jnp.transpose(weights, (1, 2, 0))[:, :, None]  # [B, H, 1, K + 1]
    return attention.project_out(out), Attention.place_new_weights(placed, cache.max_length, cache.index)
