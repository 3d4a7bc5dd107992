"""Data-parallel generation: a 1-D `data` mesh over local devices, the batch sharded, params replicated.

Rows are split in contiguous blocks, so the beams or samples of one batch element stay on one device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbsmall_jax import meshes
from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation.prepare import Prepared
from bbsmall_jax.meshes import DATA_AXIS


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Optional[Mesh]:
    """A 1-D mesh over `devices` (default: this process's devices); None for a single device."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise UsageError("devices is empty: generate needs at least one device")
    if len(devices) == 1:
        return None
    if len({d.process_index for d in devices}) > 1 or devices[0].process_index != jax.process_index():
        raise UsageError("generate shards over this process's own devices; give each process its share of the "
                         "inputs instead (as `bbsmall generate --num-processes` does)")
    return meshes.data_mesh(devices)


def device_count(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.size


def rows(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Sharded along `axis` (the rows), replicated elsewhere."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def constrain_rows(x: jax.Array, mesh: Optional[Mesh], axis: int = 0) -> jax.Array:
    """Inside the program: `x` sharded along its row axis (no-op on one device)."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, rows(mesh, axis))


def replicated(tree, mesh: Optional[Mesh]):
    """Every array of `tree` on every device of the mesh (arrays already laid out over it are kept)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
            return x  # already replicated or sharded over these devices by the caller
        return jax.device_put(x, sharding)
    return jax.tree_util.tree_map(place, tree)


def input_shardings(prepared: Prepared, mesh: Mesh) -> tuple[dict, object]:
    """Where `generate` puts the prepared inputs and search inputs on the mesh: batch arrays by rows, the rest
    replicated (pytrees of shardings shaped like `prepared.inputs` and `prepared.search`)."""
    by_rows, everywhere = rows(mesh), NamedSharding(mesh, P())
    inputs = jax.tree_util.tree_map(lambda _: by_rows, prepared.inputs)
    search = jax.tree_util.tree_map(lambda _: everywhere, prepared.search)
    search = search.replace(valid=by_rows, processors=search.processors.replace(prompt_ignore=by_rows,
                                                                                encoder_ids=by_rows))
    return inputs, search


def place_inputs(prepared: Prepared, mesh: Optional[Mesh]) -> tuple[dict, object]:
    """The prepared inputs and search inputs on the mesh (`input_shardings`)."""
    if mesh is None:
        return prepared.inputs, prepared.search
    return jax.device_put((prepared.inputs, prepared.search), input_shardings(prepared, mesh))
