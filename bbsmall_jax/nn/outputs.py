"""Output dataclasses of the model heads (pytrees, so they can leave a jitted function)."""

from __future__ import annotations

from typing import Optional

import jax
from flax import struct

from bbsmall_jax.nn.cache import KVCache

Array = jax.Array
Arrays = Optional[tuple]


@struct.dataclass
class EncoderOutput:
    last_hidden_state: Array  # [B, S, D]
    hidden_states: Arrays = None  # (embeddings, layer 1, ..., layer L), each [B, S, D]
    attentions: Arrays = None  # per layer [B, H, S, S]


@struct.dataclass
class DecoderOutput:
    last_hidden_state: Array  # [B, T, D]
    hidden_states: Arrays = None
    attentions: Arrays = None  # per layer [B, H, T, T] (or [B, H, T, max_len] with a cache)
    cross_attentions: Arrays = None  # per layer [B, H, T, S]
    cache: Optional[KVCache] = None


@struct.dataclass
class Seq2SeqModelOutput:
    last_hidden_state: Array
    encoder_last_hidden_state: Array
    decoder_hidden_states: Arrays = None
    decoder_attentions: Arrays = None
    cross_attentions: Arrays = None
    encoder_hidden_states: Arrays = None
    encoder_attentions: Arrays = None


@struct.dataclass
class Seq2SeqLMOutput:
    logits: Array  # [B, T, V] float32
    encoder_last_hidden_state: Array
    loss: Optional[Array] = None
    decoder_hidden_states: Arrays = None
    decoder_attentions: Arrays = None
    cross_attentions: Arrays = None
    encoder_hidden_states: Arrays = None
    encoder_attentions: Arrays = None


@struct.dataclass
class CausalLMOutput:
    logits: Array  # [B, T, V] float32 (the last `logits_to_keep` positions when given)
    loss: Optional[Array] = None
    hidden_states: Arrays = None
    attentions: Arrays = None
    cross_attentions: Arrays = None
