"""Param trees with each stack's layers kept as one array per leaf, `layers` [L, ...], instead of `layers_0`,
`layers_1`, ... (the checkpoints' names).

Training on accelerators keeps its state so: the layers run under `lax.scan` over exactly that stack, so no
stack is built and taken apart again in every step, and the optimizer updates ~20 leaves instead of one set
per layer (the 90M train step then compiles for TPU in a fraction of the time). The functions work on any
tree holding such dicts (params, AdamW's moments) and on numpy or JAX arrays; checkpoints and exports keep
the per-layer names.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from bbsmall_jax.errors import UsageError

STACKED = "layers"  # the key of a stack's layers, stacked ([L, ...] leaves)
_LAYER = re.compile(r"layers_(\d+)$")


def _is_per_layer(node) -> bool:
    return isinstance(node, dict) and "layers_0" in node


def _is_stacked(node) -> bool:
    return isinstance(node, dict) and isinstance(node.get(STACKED), dict)


def _stack(node: dict, xp) -> dict:
    count = sum(1 for key in node if _LAYER.match(key))
    missing = [f"layers_{i}" for i in range(count) if f"layers_{i}" not in node]
    if missing:
        raise UsageError(f"cannot stack layers: {', '.join(missing)} missing beside {sorted(node)}")
    layers = [node[f"layers_{i}"] for i in range(count)]
    rest = {key: value for key, value in node.items() if not _LAYER.match(key)}
    return dict(rest, **{STACKED: jax.tree_util.tree_map(lambda *leaves: xp.stack(leaves), *layers)})


def _unstack(node: dict) -> dict:
    stacked = node[STACKED]
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves:
        raise UsageError("cannot unstack layers: the stack holds no arrays")
    rest = {key: value for key, value in node.items() if key != STACKED}
    layers = {f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(leaves[0].shape[0])}
    return dict(rest, **layers)


def stack_layers(tree, xp=np):
    """`tree` with every dict of `layers_0` ... `layers_{L-1}` holding one `layers` subtree of [L, ...] leaves
    (`xp.stack`: numpy on the host, `jax.numpy` under jit)."""
    return jax.tree_util.tree_map(lambda node: _stack(node, xp) if _is_per_layer(node) else node, tree,
                                  is_leaf=_is_per_layer)


def unstack_layers(tree):
    """The inverse of `stack_layers`: each `layers` subtree [L, ...] back into `layers_0` ... `layers_{L-1}`."""
    return jax.tree_util.tree_map(lambda node: _unstack(node) if _is_stacked(node) else node, tree,
                                  is_leaf=_is_stacked)
