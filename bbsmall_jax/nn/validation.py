"""Checks at the API boundary: JAX clamps out-of-range gathers silently, so bad input is caught here.

Inside the caller's own `jit`, `pmap`, `grad` or `shard_map` the inputs are tracers: their shapes and dtypes
are still checked here, but their values are not known until the program runs, so the value checks (ids in
the vocabulary, 0/1 masks, finite embeddings) become the caller's duty there. Out-of-range ids and positions
then give NaN embeddings (the lookup fills, it does not clamp), never a plausible wrong answer.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax.errors import UsageError, UsageTypeError


def is_traced(*values) -> bool:
    """Whether any of `values` (arrays or pytrees of them) is a tracer of a transformation being traced."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def _array(values):
    """`values` as an array: tracers stay as they are (their values are not known yet), the rest go to numpy."""
    return values if is_traced(values) else np.asarray(values)


def as_token_array(ids, name: str, vocab_size: int, allow_ignore_index: bool = False) -> np.ndarray:
    """A [B, T] int32 array of ids in [0, vocab_size) (or -100 for labels); raises naming `name`."""
    array = _array(ids)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise UsageError(f"{name} must have shape [batch, length], got shape {tuple(array.shape)}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise UsageTypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    if is_traced(array):
        return array.astype(jnp.int32)
    valid = (array >= 0) & (array < vocab_size)
    if allow_ignore_index:
        valid |= array == -100
    if not valid.all():
        bad = array[~valid]
        where = tuple(int(i) for i in np.argwhere(~valid)[0])
        raise UsageError(f"{name} holds id {int(bad[0])} at position {where}, outside the vocabulary "
                         f"[0, {vocab_size}){' (or -100)' if allow_ignore_index else ''}")
    return array.astype(np.int32)


def check_length(length: int, max_positions: int, name: str) -> None:
    """Learned positions stop at `max_position_embeddings`."""
    if length > max_positions:
        raise UsageError(f"{name} has length {length}, more than max_position_embeddings={max_positions}; "
                         "truncate it (the tokenizer's conversation helper keeps the most recent turns)")


def as_mask(mask, shape: tuple[int, ...], name: str) -> Optional[np.ndarray]:
    """A 0/1 mask of exactly `shape` (or None)."""
    if mask is None:
        return None
    array = _array(mask)
    if array.ndim == 1 and len(shape) == 2 and shape[0] == 1:
        array = array[None]
    if tuple(array.shape) != tuple(shape):
        raise UsageError(f"{name} has shape {tuple(array.shape)}, but its ids/embeddings have shape {tuple(shape)}")
    if is_traced(array):
        return array.astype(jnp.int32)
    if array.size and not np.isin(array, (0, 1)).all():
        raise UsageError(f"{name} must hold only 0 and 1")
    return array.astype(np.int32)


def as_embeddings(embeds, d_model: int, name: str) -> np.ndarray:
    """A finite [B, T, d_model] float array."""
    array = _array(embeds)
    if array.ndim != 3 or array.shape[-1] != d_model:
        raise UsageError(f"{name} must have shape [batch, length, {d_model}], got {tuple(array.shape)}")
    if not is_traced(array) and not np.isfinite(array).all():
        raise UsageError(f"{name} holds NaN or infinite values")
    return array


def exactly_one(ids, embeds, ids_name: str, embeds_name: str, required: bool = True) -> None:
    """`ids` xor `embeds`."""
    if ids is not None and embeds is not None:
        raise UsageError(f"pass either {ids_name} or {embeds_name}, not both")
    if required and ids is None and embeds is None:
        raise UsageError(f"pass {ids_name} or {embeds_name}")


def encoder_states(states, mask, batch: int, d_model: int):
    """Validated (encoder_hidden_states, encoder_attention_mask) for a decoder-only call; both may be None."""
    if states is None:
        if mask is not None:
            raise UsageError("encoder_attention_mask was given without encoder_hidden_states")
        return None, None
    states = as_embeddings(states, d_model, "encoder_hidden_states")
    if states.shape[0] != batch:
        raise UsageError(f"encoder_hidden_states have batch size {states.shape[0]}, input_ids {batch}")
    return states, as_mask(mask, states.shape[:2], "encoder_attention_mask")
