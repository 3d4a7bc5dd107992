"""Building blocks: multi-head attention (self, cached self, cross), encoder and decoder layers."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from .config import BlenderbotSmallConfig

Array = jax.Array
Dtype = Any

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default; Flax's is 1e-6
SINGLE_STEP_MIN_ROWS = 4  # one-token attention with at least this many rows uses multiply-and-reduce

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


def dense(features: int, config: BlenderbotSmallConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    """A biased linear layer initialised like transformers (normal(init_std), zero bias)."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(config.init_std), name=name)


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

        query [B, T, H, Dh], key/value [B, S, H, Dh], bias broadcastable to [B, H, T, S].
        Returns the output [B, T, D] and the float32 weights [B, H, T, S].
        """
        # One decoding step of a batch (beams): multiply-and-reduce over the cache in its own layout. XLA's
        # CPU batched dot transposes the whole cache for this and is slower from a few rows on; at batch 1
        # the dot is faster.
        single = query.shape[1] == 1 and query.shape[0] >= SINGLE_STEP_MIN_ROWS and deterministic
        if single:
            scores = jnp.sum(query.astype(jnp.float32) * key.astype(jnp.float32), axis=-1)  # [B, S, H]
            scores = jnp.swapaxes(scores, 1, 2)[:, :, None, :]  # [B, H, 1, S]
        else:
            scores = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if bias is not None:
            scores = scores + bias
        weights = jax.nn.softmax(scores, axis=-1)
        if single:
            # [B, H, 1, S] -> [B, S, H, 1] weights times values [B, S, H, Dh], summed over S -> [B, 1, H, Dh]
            per_key = jnp.swapaxes(weights[:, :, 0, :], 1, 2)[..., None]
            out = jnp.sum(per_key * value.astype(jnp.float32), axis=1, keepdims=True).astype(self.dtype)
        else:
            dropped = self.attn_dropout(weights, deterministic=deterministic)
            out = jnp.einsum("bhts,bshd->bthd", dropped.astype(self.dtype), value.astype(self.dtype))
        # [B, T, H, Dh] -> [B, T, D]
        out = out.reshape(out.shape[:2] + (self.config.d_model,))
        return self.out_proj(out), weights

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

    With a cache, the new keys/values are written into the preallocated `[L, B, max_len, H, Dh]`
    buffers at `cache_index` and the query attends over the whole buffer under `self_bias`.
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
                 cross_bias: Optional[Array], deterministic: bool,
                 cache_key_value: Optional[tuple[Array, Array]] = None,
                 cache_index: Optional[Array] = None):
        """Returns (hidden, self-attention weights, cross-attention weights, updated cache buffers)."""
        query = self.self_attn.project_query(hidden)
        key, value = self.self_attn.project_key_value(hidden)
        if cache_key_value is not None:
            cache_k, cache_v = cache_key_value
            start = (self.layer_index, 0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, key[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, value[None].astype(cache_v.dtype), start)
            key, value = cache_k[self.layer_index], cache_v[self.layer_index]
            cache_key_value = (cache_k, cache_v)
        attended, self_weights = self.self_attn.attend(query, key, value, self_bias, deterministic)
        hidden = self.self_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        cross_weights = None
        if cross_key_value is not None:
            cross_query = self.encoder_attn.project_query(hidden)
            attended, cross_weights = self.encoder_attn.attend(
                cross_query, *cross_key_value, cross_bias, deterministic)
            hidden = self.encoder_attn_layer_norm(hidden + self.dropout(attended, deterministic=deterministic))

        ffn = self.ffn(hidden, deterministic)
        hidden = self.final_layer_norm(hidden + self.dropout(ffn, deterministic=deterministic))
        return hidden, self_weights, cross_weights, cache_key_value
