"""Output dataclasses of the model heads (pytrees, so they can leave a jitted function).

Each also reads as transformers' `ModelOutput` does: `out["logits"]`, `out[0]`, `out.to_tuple()`, `keys()`,
over the fields that are set (not None), in field order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import jax
from flax import struct

from bbsmall_jax.nn.cache import KVCache

Array = jax.Array
Arrays = Optional[tuple]


class ModelOutput:
    """Mapping and tuple access over the set fields of an output dataclass, as transformers' `ModelOutput`."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def to_tuple(self) -> tuple:
        """The set fields' values, in field order (None fields left out, as transformers does)."""
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no {key!r} (set fields: {', '.join(self.keys())})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@struct.dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: Array  # [B, S, D]
    hidden_states: Arrays = None  # (embeddings, layer 1, ..., layer L), each [B, S, D]
    attentions: Arrays = None  # per layer [B, H, S, S]


@struct.dataclass
class DecoderOutput(ModelOutput):
    last_hidden_state: Array  # [B, T, D]
    hidden_states: Arrays = None
    attentions: Arrays = None  # per layer [B, H, T, T] (or [B, H, T, max_len] with a cache)
    cross_attentions: Arrays = None  # per layer [B, H, T, S]
    cache: Optional[KVCache] = None


@struct.dataclass
class DecoderOutputWithPast(ModelOutput):
    """The bare decoder's output of a step against a cache (transformers' field order)."""

    last_hidden_state: Array  # [B, T, D]
    past_key_values: Optional[KVCache] = None
    hidden_states: Arrays = None
    attentions: Arrays = None
    cross_attentions: Arrays = None


# Field order as transformers' outputs, so that `to_tuple()` and integer indexing line up with theirs.
@struct.dataclass
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: Array
    past_key_values: Optional[KVCache] = None
    decoder_hidden_states: Arrays = None
    decoder_attentions: Arrays = None
    cross_attentions: Arrays = None
    encoder_last_hidden_state: Optional[Array] = None
    encoder_hidden_states: Arrays = None
    encoder_attentions: Arrays = None


@struct.dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: Optional[Array] = None  # [] float32, with labels
    logits: Optional[Array] = None  # [B, T, V] float32 (always set)
    past_key_values: Optional[KVCache] = None
    decoder_hidden_states: Arrays = None
    decoder_attentions: Arrays = None
    cross_attentions: Arrays = None
    encoder_last_hidden_state: Optional[Array] = None
    encoder_hidden_states: Arrays = None
    encoder_attentions: Arrays = None


@struct.dataclass
class CausalLMOutput(ModelOutput):
    loss: Optional[Array] = None
    logits: Optional[Array] = None  # [B, T, V] float32 (the last `logits_to_keep` positions when given)
    past_key_values: Optional[KVCache] = None
    hidden_states: Arrays = None
    attentions: Arrays = None
    cross_attentions: Arrays = None
