"""The CPU decoding path: what makes decoding fast on XLA's CPU backend, applied around the plain model.

Nothing here changes results (tokens equal the portable path's, scores to float32 rounding); the
decoding plan (`plan.py`) decides when it runs. The model's layers know nothing of it: the plan hands them
`layer_functions()` (`nn/layer_functions.py`), and the packed kernels through the `KERNEL_LAYOUTS` collection.

- One-token attention by multiply-and-reduce (XLA's CPU batched dot transposes the cache every step),
  over the cache read only up to the smallest of `CACHE_WINDOWS` growing windows holding every entry.
- The LM head over the embedding transposed to [D, V] (several times faster there for a few rows), or
  packed for the CPU kernel (`cpu_kernel.py`), which also runs every decoder Dense layer for several rows.
- The step's cache write placed after every read of the old buffers (`write_after`).
- Greedy picks by a max and a min of indices; beam search takes its top 2K blockwise.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from bbsmall_jax.generation import cpu_kernel
from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.nn.layer_functions import plain_dense
from bbsmall_jax.nn.layers import Attention

Array = jax.Array

CACHE_WINDOWS = 4  # one-token cached attention reads the first 1/4, 2/4, 3/4 or all of the buffer

# XLA's CPU backend hands matmuls to YNNPACK by default; its Eigen path is faster for the few-row products
# of decoding once the LM head runs over the transposed table (1.2x-1.6x per step on the 90M shape, greedy
# and beam, measured on a 2-core AVX-512 machine)
COMPILER_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


def one_token_attention(query: Array, keys: list, values: list, biases: list, scale: float) -> tuple[Array, Array]:
    """One query token over one or more key/value parts under one softmax, by multiply-and-reduce.

    query [B, 1, H, Dh]; keys/values [G, S_i, H, Dh], where G is B or divides it: then each group of
    B / G consecutive rows (the beams of one batch element) shares one entry, read once for all of them;
    biases broadcastable to [G, H, 1, S_i] (or None). Returns the float32 output [B, 1, H, Dh] and the
    weights [B, sum S_i, H].
    """
    rows, heads = query.shape[0], query.shape[2]
    query = query.astype(jnp.float32)

    def by_group(x: Array, groups: int) -> Array:  # [B, ...] -> [G, B / G, ...]
        return x.reshape((groups, rows // groups) + x.shape[1:])

    parts = []
    for key, bias in zip(keys, biases):
        # [G, B / G, 1, H, Dh] * [G, 1, S, H, Dh] summed over Dh -> [G, B / G, S, H]
        scores = jnp.sum(by_group(query, key.shape[0]) * key.astype(jnp.float32)[:, None], axis=-1) * scale
        if bias is not None:  # [G or 1, 1, 1, S] -> [G or 1, 1, S, 1]
            scores = scores + jnp.swapaxes(bias[:, :, 0, :], 1, 2)[:, None]
        parts.append(scores.reshape((rows,) + scores.shape[2:]))  # [B, S, H]
    weights = jax.nn.softmax(jnp.concatenate(parts, axis=1), axis=1)  # [B, S, H]
    out, offset = 0.0, 0
    for value in values:
        # [G, B / G, S, H, 1] weights times [G, 1, S, H, Dh] values, summed over S -> [G, B / G, H, Dh]
        part = jax.lax.slice_in_dim(weights, offset, offset + value.shape[1], axis=1)[..., None]
        summed = jnp.sum(by_group(part, value.shape[0]) * value.astype(jnp.float32)[:, None], axis=2)
        out = out + summed.reshape(rows, 1, heads, -1)  # [B, 1, H, Dh]
        offset += value.shape[1]
    return out, weights


def _finish(attention: Attention, out: Array, weights: Array) -> tuple[Array, Array]:
    """`one_token_attention`'s results -> the projected output [B, 1, D] and weights [B, H, 1, S]."""
    return attention.project_out(out.astype(attention.dtype)), jnp.swapaxes(weights, 1, 2)[:, :, None, :]


def attend_one(attention: Attention, query: Array, key: Array, value: Array,
               bias: Optional[Array]) -> tuple[Array, Array]:
    """`Attention.attend` for one query token (cross-attention while decoding)."""
    out, weights = one_token_attention(query, [key], [value], [bias], attention.head_dim ** -0.5)
    return _finish(attention, out, weights)


def attend_cached_one(attention: Attention, query: Array, key: Array, value: Array, cache: KVCache,
                      cache_bias: Array, bias: Array, layer: int) -> tuple[Array, Array]:
    """`Attention.attend_cached` for one token: the cache read only up to the smallest of `CACHE_WINDOWS`
    growing windows that holds every cached entry, so early steps read a fraction of the buffer.

    The positions left out are masked (weight exactly 0), so the result is the same as over the whole
    buffer. The stacked buffer goes into the branches whole and is read there (sliced, or gathered
    through the cache's `origins`): slicing it outside would make XLA copy this layer's part.
    """
    size = cache.max_length
    step = -(-size // CACHE_WINDOWS)
    widths = sorted({min(size, step * i) for i in range(1, CACHE_WINDOWS + 1)})

    def branch(width: int):
        def run(entries, origins, cache_bias):
            history = cache.replace(entries=entries, origins=origins).history(layer, width)
            # [B, width, H * Dh] -> [B, width, H, Dh]
            cache_key, cache_value = (x.reshape(x.shape[:2] + query.shape[2:]) for x in history)
            out, weights = one_token_attention(
                query, [cache_key, key], [cache_value, value], [cache_bias[..., :width], bias],
                attention.head_dim ** -0.5)
            # weights [B, width + 1, H] -> [B, size + 1, H]: the cached positions left out have weight 0
            left_out = jnp.zeros((weights.shape[0], size - width, weights.shape[2]), weights.dtype)
            return out, jnp.concatenate([weights[:, :width], left_out, weights[:, width:]], axis=1)
        return run

    which = jnp.minimum(jnp.sum(jnp.max(cache.index) > jnp.asarray(widths)), len(widths) - 1)  # the furthest row's
    out, weights = _finish(attention, *jax.lax.switch(which, [branch(w) for w in widths], cache.entries,
                                                     cache.origins, cache_bias))
    return out, Attention.place_new_weights(weights, size, cache.index)


def dense(x: Array, kernel: Array, bias: Array, dtype: Any, laid_out: Any = None) -> Array:
    """A linear layer through the CPU kernel where its kernel was packed for it (`laid_out`), else plain."""
    if laid_out is None:
        return plain_dense(x, kernel, bias, dtype)
    return cpu_kernel.small_rows_matmul(x, laid_out, bias)


def write_after(index: Array, output: Array) -> Array:
    """The cache's `index`, made to depend on the step's `output`: XLA's CPU backend then sees that every
    read of the old buffers comes before the write, and updates them in place instead of copying both on
    every step. min(isnan(.), 0) is always 0, but XLA cannot fold it away."""
    return index + jnp.minimum(jnp.isnan(jnp.sum(output)).astype(jnp.int32), 0)


def lm_head(hidden: Array, table, bias: Optional[Array]) -> Array:
    """[N, D] -> [N, V] float32 logits over the decoding copy of the tied embedding (see `decoding_weights`)."""
    if isinstance(table, cpu_kernel.PackedColumns):
        return cpu_kernel.small_rows_matmul(hidden, table, bias)
    logits = jnp.einsum("nd,dv->nv", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)


_transposed = jax.jit(jnp.transpose)


def decoding_weights(params: dict, packed: bool) -> tuple:
    """(the LM head's table, packed decoder Dense kernels or None) for decoding several rows.

    The embedding transposed to [D, V], or with `packed` the transpose and every decoder Dense kernel packed
    for the CPU kernel. They take about 0.2 s and 230 MB for the 90M shape; the caller keeps them.
    """
    embedding = params["shared"]["embedding"]
    if packed:
        return (cpu_kernel.pack_transposed(embedding),
                cpu_kernel.pack_dense_kernels({"decoder": params["decoder"]}))
    return _transposed(embedding), None


def first_argmax(scores: Array) -> Array:
    """`jnp.argmax` over the last axis (the first maximum; a NaN counts as the maximum) as two plain
    reductions, a max and a min of indices: XLA's CPU (value, index) reduction is several times slower."""
    best = jnp.max(scores, axis=-1, keepdims=True)
    hit = (scores == best) | jnp.isnan(scores)
    positions = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    return jnp.min(jnp.where(hit, positions, scores.shape[-1]), axis=-1)


def blockwise_top_k(scores: Array, count: int, block: int = 32) -> tuple[Array, Array]:
    """`jax.lax.top_k` over the last axis of a long [B, N] array, ties to the lower index as it does.

    XLA's CPU top-k over the 10 x 54,944 scores of a beam step takes several times longer than two small
    passes: the `count` best entries lie in the `count` blocks of `block` entries with the best maxima
    (each block ranked before a best entry's holds a distinct entry ranked before it), so only those
    blocks, taken in index order, are searched.
    """
    batch, size = scores.shape
    blocks = -(-size // block)
    if blocks < count:
        return jax.lax.top_k(scores, count)
    padded = jnp.pad(scores, ((0, 0), (0, blocks * block - size)), constant_values=-jnp.inf)
    tiles = padded.reshape(batch, blocks, block)  # [B, N / block, block]
    _, best = jax.lax.top_k(jnp.max(tiles, axis=-1), count)  # [B, count]
    best = jnp.sort(best, axis=-1)  # index order, so equal candidates keep top_k's tie-break
    candidates = jnp.take_along_axis(tiles, best[:, :, None], axis=1).reshape(batch, count * block)
    values, picked = jax.lax.top_k(candidates, count)
    ids = (best[:, :, None] * block + jnp.arange(block)).reshape(batch, count * block)
    return values, jnp.take_along_axis(ids, picked, axis=1)
