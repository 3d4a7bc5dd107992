"""Layout hints for loops under a 1-D data mesh: rows sharded over it, loop-invariant weights whole.

Inside `lax.scan` bodies the SPMD partitioner cannot always tell how a carry or an operand should be laid
out, and may replicate rows that the rest of the step keeps sharded (every device then computes every
row). Code traced under `jax.sharding.use_abstract_mesh` with a 1-D mesh (the train and eval steps over the
data mesh) pins them with these; without such a mesh (one device, generation, the user's own jit) they do
nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec as P


def data_mesh_axis() -> Optional[str]:
    """The axis of the 1-D mesh the program is traced under (`jax.sharding.use_abstract_mesh`), or None (also
    inside `shard_map` over it, where each device already holds only its rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or len(mesh.axis_names) != 1 or mesh.axis_names[0] in getattr(mesh, "manual_axes", ()):
        return None
    return mesh.axis_names[0]


def replicated(tree):
    """`tree` whole on every device of the data mesh."""
    axis = data_mesh_axis()
    return tree if axis is None else jax.lax.with_sharding_constraint(tree, P())


def rows_sharded(tree):
    """`tree`'s leading (row) axis sharded over the data mesh."""
    axis = data_mesh_axis()
    return tree if axis is None else jax.lax.with_sharding_constraint(tree, P(axis))
