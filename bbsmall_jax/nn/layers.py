"""Building blocks in plain Flax: multi-head attention (self, cached self, cross), encoder and decoder layers."""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_functions import KERNEL_LAYOUTS, PLAIN, LayerFunctions

Array = jax.Array
Dtype = Any

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


def key_mask(mask: Array) -> Array:
    """Which keys each query may see, broadcastable to [B, 1, T, S]: a key-padding mask [B, S] as [B, 1, 1, S],
    or a full mask [B, T, S] (packed sequences: each query sees its own segment's keys) as [B, 1, T, S]."""
    mask = mask.astype(bool)
    return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_as(scores: Array, dtype: Dtype) -> Array:
    """softmax(scores) over the last axis of float32 scores, returned in `dtype`.

    Its backward pass keeps only that `dtype` result (autodiff of a float32 softmax followed by a cast
    would keep the float32 probabilities for the backward pass: twice the bytes in bfloat16 training).
    """
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _softmax_as_fwd(scores, dtype):
    probs = softmax_as(scores, dtype)
    return probs, probs


def _softmax_as_bwd(dtype, probs, grad):
    probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
    return (probs * (grad - (grad * probs).sum(axis=-1, keepdims=True)),)


softmax_as.defvjp(_softmax_as_fwd, _softmax_as_bwd)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon and exact float32 statistics."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class Linear(nn.Module):
    """A biased linear layer with flax `nn.Dense`'s params (`kernel` [I, O], `bias` [O]), initialised like
    transformers (normal(init_std), zero bias), computed by the `dense` function it is given."""

    features: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    functions: LayerFunctions = PLAIN

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        laid_out = self.get_variable(KERNEL_LAYOUTS, "kernel")  # None unless the caller passes that collection
        return self.functions.dense(x, kernel, bias, self.dtype, laid_out)


def dense(features: int, module: nn.Module, name: str) -> Linear:
    """A `Linear` layer of `module` (config, dtypes and functions taken from it)."""
    return Linear(features, module.config.init_std, module.dtype, module.param_dtype, module.functions, name=name)


def _by_group(x: Array, groups: int) -> Array:
    """[B, ...] -> [G, B / G, ...]: consecutive rows that share one key/value entry."""
    return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


class Attention(nn.Module):
    """Multi-head attention; keys and values are projected separately so they can be cached."""

    config: BlenderbotSmallConfig
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    functions: LayerFunctions = PLAIN

    def setup(self):
        d = self.config.d_model
        self.head_dim = d // self.num_heads
        self.q_proj = dense(d, self, "q_proj")
        self.k_proj = dense(d, self, "k_proj")
        self.v_proj = dense(d, self, "v_proj")
        self.out_proj = dense(d, self, "out_proj")
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

    def project_out(self, out: Array) -> Array:
        """[B, T, H, Dh] -> the output projection [B, T, D]."""
        return self.out_proj(out.reshape(out.shape[:2] + (self.config.d_model,)))

    def _scores(self, spec: str, query: Array, key: Array) -> Array:
        """Scaled dot products in the compute dtype, accumulated in float32."""
        return jnp.einsum(spec, query.astype(self.dtype), key.astype(self.dtype),
                          preferred_element_type=jnp.float32) * (self.head_dim ** -0.5)

    def attend(self, query: Array, key: Array, value: Array, bias: Optional[Array],
               deterministic: bool) -> tuple[Array, Array]:
        """Scaled dot-product attention and output projection.

        query [B, T, H, Dh]; key/value [G, S, H, Dh] with G = B or dividing it, when each group of B / G
        consecutive rows (the beams of one batch element) shares one entry; bias broadcastable to
        [B or G, H, T, S]. Returns the output [B, T, D] and the float32 weights [B, H, T, S].
        """
        rows, groups = query.shape[0], key.shape[0]
        grouped = _by_group(query, groups)  # [G, B / G, T, H, Dh]
        scores = self._scores("grthd,gshd->grhts", grouped, key)  # [G, B / G, H, T, S]
        if bias is not None:
            bias = _by_group(bias, groups) if bias.shape[0] == rows else bias[:, None]
            scores = scores + bias
        weights = jax.nn.softmax(scores, axis=-1)  # float32: what output_attentions returns
        dropped = self.attn_dropout(softmax_as(scores, self.dtype), deterministic=deterministic)
        out = jnp.einsum("grhts,gshd->grthd", dropped, value.astype(self.dtype))
        unflat = lambda x: x.reshape((rows,) + x.shape[2:])  # [G, B / G, ...] -> [B, ...]
        return self.project_out(unflat(out)), unflat(weights)

    def attend_cached(self, query: Array, key: Array, value: Array, cache: KVCache, cache_bias: Array,
                      bias: Array, layer: int, deterministic: bool) -> tuple[Array, Array]:
        """Attention over the cache as it was before this step plus the new tokens' own keys/values.

        query/key/value [B, T, H, Dh] of the T new tokens; `cache` holds every layer's entries, this layer's
        at `layer` (only read: the decoder writes the new entries after all layers); cache_bias
        [B or 1, 1, 1, K] allows the cached keys before `cache.index`; bias [B or 1, 1, T, T] the new tokens
        among themselves. One softmax over both parts. Returns the output [B, T, D] and the float32 weights
        [B, H, T, K] laid out as if the new keys were written at `cache.index`.
        """
        size = cache.max_length
        cache_key, cache_value = (self._split_heads(x) for x in cache.history(layer, size))  # [B, K, H, Dh]
        old = self._scores("bthd,bkhd->bhtk", query, cache_key) + cache_bias
        new = self._scores("bthd,bshd->bhts", query, key) + bias
        weights = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)  # [B, H, T, K + T]
        dropped = self.attn_dropout(weights, deterministic=deterministic).astype(self.dtype)
        old_dropped, new_dropped = jnp.split(dropped, [size], axis=-1)
        out = (jnp.einsum("bhtk,bkhd->bthd", old_dropped, cache_value.astype(self.dtype))
               + jnp.einsum("bhts,bshd->bthd", new_dropped, value.astype(self.dtype)))
        return self.project_out(out), self.place_new_weights(weights, size, cache.index)

    @staticmethod
    def place_new_weights(weights: Array, size: int, cache_index: Array) -> Array:
        """[B, H, T, K + T] -> [B, H, T, K]: the masked cache positions from `cache_index` ([] or per row [B])
        on have weight 0; the new tokens' weights go there."""
        old_weights, new_weights = jnp.split(weights, [size], axis=-1)
        place = lambda old, new, at: jax.lax.dynamic_update_slice(old, new, (0,) * (old.ndim - 1) + (at,))
        if jnp.ndim(cache_index) == 1:
            return jax.vmap(place)(old_weights, new_weights, cache_index)
        return place(old_weights, new_weights, cache_index)

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
    functions: LayerFunctions = PLAIN

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        act = ACTIVATION_FUNCTIONS[self.config.activation_function]
        hidden = act(dense(self.ffn_dim, self, "fc1")(hidden))
        hidden = nn.Dropout(self.config.activation_dropout)(hidden, deterministic=deterministic)
        return dense(self.config.d_model, self, "fc2")(hidden)


class EncoderLayer(nn.Module):
    """Post-LN block: self-attention, then feed-forward."""

    config: BlenderbotSmallConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    functions: LayerFunctions = PLAIN

    def setup(self):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        self.self_attn = Attention(c, c.encoder_attention_heads, dt, pdt, self.functions, name="self_attn")
        self.self_attn_layer_norm = layer_norm(dt, pdt, "self_attn_layer_norm")
        self.ffn = FeedForward(c, c.encoder_ffn_dim, dt, pdt, self.functions, name="ffn")
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
    every layer's new keys/values into the cache once, after all layers.
    """

    config: BlenderbotSmallConfig
    layer_index: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    functions: LayerFunctions = PLAIN

    def setup(self):
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        self.self_attn = Attention(c, c.decoder_attention_heads, dt, pdt, self.functions, name="self_attn")
        self.self_attn_layer_norm = layer_norm(dt, pdt, "self_attn_layer_norm")
        self.encoder_attn = Attention(c, c.decoder_attention_heads, dt, pdt, self.functions, name="encoder_attn")
        self.encoder_attn_layer_norm = layer_norm(dt, pdt, "encoder_attn_layer_norm")
        self.ffn = FeedForward(c, c.decoder_ffn_dim, dt, pdt, self.functions, name="ffn")
        self.final_layer_norm = layer_norm(dt, pdt, "final_layer_norm")
        self.dropout = nn.Dropout(c.dropout)

    def project_cross_key_value(self, encoder_hidden: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of the encoder output, [B, S, H, Dh] each."""
        return self.encoder_attn.project_key_value(encoder_hidden)

    def over_sequence(self, hidden: Array, self_bias: Array, encoder_hidden: Optional[Array],
                      cross_bias: Optional[Array], deterministic: bool) -> Array:
        """A whole sequence without a cache, cross-attention keys/values projected here: the new hidden state."""
        cross = None if encoder_hidden is None else self.project_cross_key_value(encoder_hidden)
        return self(hidden, self_bias, cross, cross_bias, deterministic)[0]

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
        given = self.functions
        one_token = cache is not None and hidden.shape[1] == 1 and deterministic  # a decoding step
        if cache is None:
            attended, self_weights = self.self_attn.attend(query, key, value, self_bias, deterministic)
        elif one_token and given.cached_attention is not None:
            attended, self_weights = given.cached_attention(
                self.self_attn, query, key, value, cache, cache_bias, self_bias, self.layer_index)
        else:
            attended, self_weights = self.self_attn.attend_cached(
                query, key, value, cache, cache_bias, self_bias, self.layer_index, deterministic)
        hidden = self.self_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        cross_weights = None
        if cross_key_value is not None:
            cross_query = self.encoder_attn.project_query(hidden)
            if one_token and given.cross_attention is not None:
                attended, cross_weights = given.cross_attention(self.encoder_attn, cross_query, *cross_key_value,
                                                                cross_bias)
            else:
                attended, cross_weights = self.encoder_attn.attend(
                    cross_query, *cross_key_value, cross_bias, deterministic)
            hidden = self.encoder_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        ffn = self.ffn(hidden, deterministic)
        hidden = self.final_layer_norm(hidden + self.dropout(ffn, deterministic=deterministic))
        return hidden, self_weights, cross_weights, (key, value)
