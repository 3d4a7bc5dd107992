"""Building blocks: multi-head attention (self, cached self, cross), encoder and decoder layers."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from .cache import KVCache, read_layer
from .config import BlenderbotSmallConfig
from .cpu_kernels import PACKED, small_rows_matmul

Array = jax.Array
Dtype = Any

CACHE_WINDOWS = 4  # one-token cached attention reads the first 1/4, 2/4, 3/4 or all of the buffer
LAYER_NORM_EPSILON = 1e-5  # PyTorch's default; Flax's is 1e-6

ACTIVATION_FUNCTIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # the exact erf form, as torch's default
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def mask_to_bias(allowed: Array) -> Array:
    """Boolean "may attend" mask -> additive float32 bias (0 or the most negative float32)."""
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon and exact float32 statistics."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class Dense(nn.Module):
    """`nn.Dense` (same params, same arithmetic) that multiplies by its kernel packed for the CPU kernel
    instead when the `cpu_kernels.PACKED` collection holds it (decoding several rows on CPU)."""

    features: int
    kernel_init: Callable
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        if self.has_variable(PACKED, "kernel"):
            return small_rows_matmul(inputs, self.get_variable(PACKED, "kernel"), bias)
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        out = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
        return out + bias.reshape((1,) * (out.ndim - 1) + (-1,))


def dense(features: int, config: BlenderbotSmallConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> Dense:
    """A biased linear layer initialised like transformers (normal(init_std), zero bias)."""
    return Dense(features, nn.initializers.normal(config.init_std), dtype, param_dtype, name=name)


def one_token_attention(query: Array, keys: list, values: list, biases: list, scale: float,
                        dropout: Callable[[Array], Array] = lambda weights: weights) -> tuple[Array, Array]:
    """One query token over one or more key/value parts under one softmax, by multiply-and-reduce.

    query [B, 1, H, Dh]; keys/values [G, S_i, H, Dh], where G is B or divides it: then each group of
    B / G consecutive rows (the beams of one batch element) shares one entry, read once for all of them;
    biases broadcastable to [G, H, 1, S_i] (or None). XLA's CPU batched dot transposes keys/values to
    [B, H, S, Dh] for every step and runs B * H tiny products; multiply-and-reduce reads them in place.
    Returns the float32 output [B, 1, H, Dh] and weights [B, sum S_i, H] (before `dropout`).
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
    dropped = dropout(weights)
    out, offset = 0.0, 0
    for value in values:
        # [G, B / G, S, H, 1] weights times [G, 1, S, H, Dh] values, summed over S -> [G, B / G, H, Dh]
        part = jax.lax.slice_in_dim(dropped, offset, offset + value.shape[1], axis=1)[..., None]
        summed = jnp.sum(by_group(part, value.shape[0]) * value.astype(jnp.float32)[:, None], axis=2)
        out = out + summed.reshape(rows, 1, heads, -1)  # [B, 1, H, Dh]
        offset += value.shape[1]
    return out, weights


class Attention(nn.Module):
    """Multi-head attention; keys and values are projected separately so they can be cached."""

    config: BlenderbotSmallConfig
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d = self.config.d_model
        self.head_dim = d // self.num_heads
        self.q_proj = dense(d, self.config, self.dtype, self.param_dtype, "q_proj")
        self.k_proj = dense(d, self.config, self.dtype, self.param_dtype, "k_proj")
        self.v_proj = dense(d, self.config, self.dtype, self.param_dtype, "v_proj")
        self.out_proj = dense(d, self.config, self.dtype, self.param_dtype, "out_proj")
        self.attn_dropout = nn.Dropout(self.config.attention_dropout)

    def _split_heads(self, x: Array) -> Array:
        # [B, T, D] -> [B, T, H, Dh]
        return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    def project_query(self, hidden: Array) -> Array:
        """[B, T, D] -> queries [B, T, H, Dh]."""
        return self._split_heads(self.q_proj(hidden))

    def project_key_value(self, states: Array) -> tuple[Array, Array]:
        """[B, S, D] -> keys, values [B, S, H, Dh]."""
        return self._split_heads(self.k_proj(states)), self._split_heads(self.v_proj(states))

    def attend(self, query: Array, key: Array, value: Array, bias: Optional[Array],
               deterministic: bool) -> tuple[Array, Array]:
        """Scaled dot-product attention and output projection.

        query [B, T, H, Dh], key/value [B or G, S, H, Dh] (G: shared by groups of rows, as in
        `one_token_attention`), bias broadcastable to [B or G, H, T, S].
        Returns the output [B, T, D] and the float32 weights [B, H, T, S].
        """
        if query.shape[1] == 1:
            return self._attend_one(query, [key], [value], [bias], deterministic)
        if key.shape[0] != query.shape[0]:  # shared by groups of rows: one copy per row for the batched product
            repeats = query.shape[0] // key.shape[0]
            key, value = jnp.repeat(key, repeats, axis=0), jnp.repeat(value, repeats, axis=0)
            if bias is not None and bias.shape[0] > 1:
                bias = jnp.repeat(bias, repeats, axis=0)
        scores = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if bias is not None:
            scores = scores + bias
        weights = jax.nn.softmax(scores, axis=-1)
        dropped = self.attn_dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bhts,bshd->bthd", dropped.astype(self.dtype), value.astype(self.dtype))
        return self._project_out(out), weights

    def _attend_one(self, query: Array, keys: list, values: list, biases: list,
                    deterministic: bool) -> tuple[Array, Array]:
        """`one_token_attention` with dropout and the output projection: the output [B, 1, D] and the
        float32 weights [B, H, 1, sum S_i]."""
        out, weights = one_token_attention(query, keys, values, biases, self.head_dim ** -0.5,
                                           lambda w: self.attn_dropout(w, deterministic=deterministic))
        return self._finish_one(out, weights)

    def _finish_one(self, out: Array, weights: Array) -> tuple[Array, Array]:
        """`one_token_attention`'s results -> the projected output [B, 1, D] and weights [B, H, 1, S]."""
        return self._project_out(out.astype(self.dtype)), jnp.swapaxes(weights, 1, 2)[:, :, None, :]

    def _attend_one_windowed(self, query: Array, key: Array, value: Array, cache: KVCache, cache_bias: Array,
                             bias: Array, layer: int) -> tuple[Array, Array]:
        """One token over the cache read only up to the smallest of `CACHE_WINDOWS` growing windows that
        holds every cached entry, so early steps read a fraction of the buffer (no dropout).

        The positions left out are masked (weight exactly 0), so the result is the same as over the whole
        buffer. The stacked buffers go into the branches whole and are read there (sliced, or gathered
        through the cache's `origins`): slicing them outside would make XLA copy this layer's part.
        Shapes as `attend_cached` with T = 1.
        """
        size = cache.max_length
        step = -(-size // CACHE_WINDOWS)
        widths = sorted({min(size, step * i) for i in range(1, CACHE_WINDOWS + 1)})

        def branch(width: int):
            def run(cache_key, cache_value, origins, cache_bias):
                out, weights = one_token_attention(
                    query, [read_layer(cache_key, layer, width, origins), key],
                    [read_layer(cache_value, layer, width, origins), value],
                    [cache_bias[..., :width], bias], self.head_dim ** -0.5)
                # weights [B, width + 1, H] -> [B, size + 1, H]: the cached positions left out have weight 0
                left_out = jnp.zeros((weights.shape[0], size - width, weights.shape[2]), weights.dtype)
                return out, jnp.concatenate([weights[:, :width], left_out, weights[:, width:]], axis=1)
            return run

        which = jnp.minimum(jnp.sum(cache.index > jnp.asarray(widths)), len(widths) - 1)
        return self._finish_one(*jax.lax.switch(which, [branch(w) for w in widths], cache.self_key,
                                                cache.self_value, cache.origins, cache_bias))

    def attend_cached(self, query: Array, key: Array, value: Array, cache: KVCache, cache_bias: Array,
                      bias: Array, layer: int, deterministic: bool) -> tuple[Array, Array]:
        """Attention over the cache as it was before this step plus the new tokens' own keys/values.

        query/key/value [B, T, H, Dh] of the T new tokens; `cache` holds every layer's buffers
        [L, B, K, H, Dh], this layer's at `layer` (only read: writing the new entries first and reading the
        buffer back makes XLA copy the whole cache); cache_bias [B or 1, 1, 1, K] allows the cached keys
        before `cache.index`; bias [B or 1, 1, T, T] the new tokens among themselves. One softmax over both
        parts. Returns the output [B, T, D] and the float32 weights [B, H, T, K] laid out as if the new keys
        were written at `cache.index`.
        """
        size = cache.max_length
        if query.shape[1] == 1 and deterministic:
            out, weights = self._attend_one_windowed(query, key, value, cache, cache_bias, bias, layer)
            return out, self._place_new_weights(weights, size, cache.index)
        cache_key = read_layer(cache.self_key, layer, size, cache.origins)
        cache_value = read_layer(cache.self_value, layer, size, cache.origins)
        if query.shape[1] == 1:
            out, weights = self._attend_one(query, [cache_key, key], [cache_value, value], [cache_bias, bias],
                                            deterministic)
        else:
            scale = self.head_dim ** -0.5
            old = jnp.einsum("bthd,bkhd->bhtk", query, cache_key.astype(query.dtype),
                             preferred_element_type=jnp.float32) * scale + cache_bias
            new = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32) * scale + bias
            weights = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)  # [B, H, T, K + T]
            dropped = self.attn_dropout(weights, deterministic=deterministic)
            old_dropped, new_dropped = jnp.split(dropped, [size], axis=-1)
            out = self._project_out(
                jnp.einsum("bhtk,bkhd->bthd", old_dropped.astype(self.dtype), cache_value.astype(self.dtype))
                + jnp.einsum("bhts,bshd->bthd", new_dropped.astype(self.dtype), value.astype(self.dtype)))
        return out, self._place_new_weights(weights, size, cache.index)

    @staticmethod
    def _place_new_weights(weights: Array, size: int, cache_index: Array) -> Array:
        """[B, H, T, K + T] -> [B, H, T, K]: the masked cache positions from `cache_index` on have weight 0;
        the new tokens' weights go there."""
        old_weights, new_weights = jnp.split(weights, [size], axis=-1)
        return jax.lax.dynamic_update_slice(old_weights, new_weights, (0, 0, 0, cache_index))

    def _project_out(self, out: Array) -> Array:
        # [B, T, H, Dh] -> [B, T, D]
        return self.out_proj(out.reshape(out.shape[:2] + (self.config.d_model,)))

    def __call__(self, hidden: Array, key_value_states: Optional[Array] = None, bias: Optional[Array] = None,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """Self-attention over `hidden`, or cross-attention over `key_value_states`."""
        key, value = self.project_key_value(hidden if key_value_states is None else key_value_states)
        return self.attend(self.project_query(hidden), key, value, bias, deterministic)


class FeedForward(nn.Module):
    """fc1 -> activation -> activation dropout -> fc2."""

    config: BlenderbotSmallConfig
    ffn_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        act = ACTIVATION_FUNCTIONS[self.config.activation_function]
        hidden = act(dense(self.ffn_dim, self.config, self.dtype, self.param_dtype, "fc1")(hidden))
        hidden = nn.Dropout(self.config.activation_dropout)(hidden, deterministic=deterministic)
        return dense(self.config.d_model, self.config, self.dtype, self.param_dtype, "fc2")(hidden)


class EncoderLayer(nn.Module):
    """Post-LN block: self-attention, then feed-forward."""

    config: BlenderbotSmallConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        self.self_attn = Attention(c, c.encoder_attention_heads, dt, pdt, name="self_attn")
        self.self_attn_layer_norm = layer_norm(dt, pdt, "self_attn_layer_norm")
        self.ffn = FeedForward(c, c.encoder_ffn_dim, dt, pdt, name="ffn")
        self.final_layer_norm = layer_norm(dt, pdt, "final_layer_norm")
        self.dropout = nn.Dropout(c.dropout)

    def __call__(self, hidden: Array, bias: Array, deterministic: bool) -> tuple[Array, Array]:
        attended, weights = self.self_attn(hidden, bias=bias, deterministic=deterministic)
        hidden = self.self_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))
        ffn = self.ffn(hidden, deterministic)
        hidden = self.final_layer_norm(hidden + self.dropout(ffn, deterministic=deterministic))
        return hidden, weights


class DecoderLayer(nn.Module):
    """Post-LN block: causal self-attention, cross-attention (when there is an encoder), feed-forward.

    With a cache, the new tokens attend over the cached keys/values and their own; the decoder writes
    every layer's new keys/values into the `[L, B, max_len, H, Dh]` buffers once, after all layers.
    """

    config: BlenderbotSmallConfig
    layer_index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        self.self_attn = Attention(c, c.decoder_attention_heads, dt, pdt, name="self_attn")
        self.self_attn_layer_norm = layer_norm(dt, pdt, "self_attn_layer_norm")
        self.encoder_attn = Attention(c, c.decoder_attention_heads, dt, pdt, name="encoder_attn")
        self.encoder_attn_layer_norm = layer_norm(dt, pdt, "encoder_attn_layer_norm")
        self.ffn = FeedForward(c, c.decoder_ffn_dim, dt, pdt, name="ffn")
        self.final_layer_norm = layer_norm(dt, pdt, "final_layer_norm")
        self.dropout = nn.Dropout(c.dropout)

    def project_cross_key_value(self, encoder_hidden: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of the encoder output, [B, S, H, Dh] each."""
        return self.encoder_attn.project_key_value(encoder_hidden)

    def __call__(self, hidden: Array, self_bias: Array, cross_key_value: Optional[tuple[Array, Array]],
                 cross_bias: Optional[Array], deterministic: bool, cache: Optional[KVCache] = None,
                 cache_bias: Optional[Array] = None):
        """Returns (hidden, self-attention weights, cross-attention weights, the new keys/values).

        With a cache (every layer's buffers, read only), `cache_bias` masks it and `self_bias` masks the
        new tokens among themselves; the caller writes the returned new keys/values [B, T, H, Dh] at
        `cache.index`.
        """
        query = self.self_attn.project_query(hidden)
        key, value = self.self_attn.project_key_value(hidden)
        if cache is None:
            attended, self_weights = self.self_attn.attend(query, key, value, self_bias, deterministic)
        else:
            attended, self_weights = self.self_attn.attend_cached(
                query, key, value, cache, cache_bias, self_bias, self.layer_index, deterministic)
        hidden = self.self_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        cross_weights = None
        if cross_key_value is not None:
            cross_query = self.encoder_attn.project_query(hidden)
            attended, cross_weights = self.encoder_attn.attend(
                cross_query, *cross_key_value, cross_bias, deterministic)
            hidden = self.encoder_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        ffn = self.ffn(hidden, deterministic)
        hidden = self.final_layer_norm(hidden + self.dropout(ffn, deterministic=deterministic))
        return hidden, self_weights, cross_weights, (key, value)
