"""The computations a layer is given rather than choosing: its matmul and its one-token attention.

A backend plan (generation's `DecodingPlan`, training's `TrainingPlan`) picks them and hands them to the
model as a module field (`build_module(..., functions=...)` or `module.clone(functions=...)`); the layers
call what they hold and know no backend. `PLAIN`, the default, is what the layers compute on their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

Array = jax.Array

# The variable collection of kernels laid out for a `dense` function, under the same paths as the params
# (`{"decoder": {"layers_0": {"fc1": {"kernel": ...}}}}`); a layer without an entry there gets None.
KERNEL_LAYOUTS = "kernel_layouts"


def plain_dense(x: Array, kernel: Array, bias: Array, dtype: Any, laid_out: Any = None) -> Array:
    """x [..., I] @ kernel [I, O] + bias [O] in `dtype`, as flax's `nn.Dense` computes it (`laid_out` unused)."""
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def same_index(index: Array, output: Array) -> Array:
    """The cache position a decoding step writes at: the cache's own index."""
    return index


@dataclasses.dataclass(frozen=True)
class LayerFunctions:
    """What the layers call (static: part of the module, so of every program built from it)."""

    # every linear layer: (x [..., I], kernel [I, O], bias [O], compute dtype, the kernel's entry in
    # `KERNEL_LAYOUTS` or None) -> [..., O]
    dense: Callable[..., Array] = plain_dense
    # one new token's self-attention over a KV cache while decoding deterministically, called as
    # `Attention.attend_cached` is but without `deterministic`, with the attention module first (None: the
    # layer's own attention)
    cached_attention: Optional[Callable[..., tuple[Array, Array]]] = None
    # one new token's cross-attention while decoding deterministically, called as `Attention.attend` is but
    # without `deterministic`, with the attention module first (None: the layer's own)
    cross_attention: Optional[Callable[..., tuple[Array, Array]]] = None
    # (the cache's index, the decoder's output) -> where the step's new entries are written
    write_index: Callable[[Array, Array], Array] = same_index


PLAIN = LayerFunctions()
