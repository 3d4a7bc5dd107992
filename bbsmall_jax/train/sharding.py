"""The data mesh over every device of every process: shardings (replicated or FSDP), batch feeding, coordination."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbsmall_jax.meshes import DATA_AXIS, data_mesh
from bbsmall_jax.train import data as data_lib


def make_mesh(devices=None) -> Mesh:
    """The data mesh over `devices` (default: every device of every process)."""
    return data_mesh(jax.devices() if devices is None else devices)


MIN_SHARDED_ELEMENTS = 4096  # FSDP keeps smaller leaves (biases, LayerNorm scales) replicated


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> P:
    """Replicated, or (FSDP) sharded over the data axis along the largest dimension it divides.

    Under FSDP a leaf of fewer than MIN_SHARDED_ELEMENTS stays replicated: gathering it would cost a
    collective's latency for a few kilobytes, and its optimizer update is as small.
    """
    n = mesh.shape[DATA_AXIS]
    dims = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not fsdp or n == 1 or not dims or math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return P()
    axis = max(dims, key=lambda i: shape[i])
    return P(*[DATA_AXIS if i == axis else None for i in range(len(shape))])


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (a pure function of each shape)."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), mesh, fsdp)),
                                  abstract_tree)


def local_rows(mesh: Mesh, rows: int) -> np.ndarray:
    """Indices of the batch rows (axis sharded over `data`) that this process's devices hold, in order."""
    index_map = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((rows,))
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else rows) for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def gather_params(params, mesh: Mesh) -> dict:
    """The params as host numpy arrays (collective: every process must call it)."""
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), replicated)


class Feeder:
    """Planned batches -> global arrays sharded over the data axis, each process materialising only its rows."""

    def __init__(self, mesh: Mesh, micro: int, accum: int):
        self.mesh, self.micro, self.accum = mesh, micro, accum
        self.mine = local_rows(mesh, micro)

    def train_batch(self, batcher: data_lib.BucketBatcher, scheduled: data_lib.ScheduledBatch):
        # [A, local rows] example indices ([A, local rows, segments] of packed rows)
        rows = scheduled.rows.reshape((self.accum, self.micro) + scheduled.rows.shape[1:])[:, self.mine]
        return scheduled, self.place(batcher.materialize(scheduled.bucket, rows.reshape((-1,) + rows.shape[2:])))

    @property
    def local_rows(self) -> int:
        """The rows of a train batch this process supplies (over all accumulation steps)."""
        return self.accum * len(self.mine)

    def place(self, local: dict[str, np.ndarray]):
        """This process's rows of a train batch, [A * local rows, L] arrays, as global [A, micro, L] arrays."""
        local = {k: v.reshape((self.accum, len(self.mine)) + v.shape[1:]) for k, v in local.items()}
        shapes = {k: (self.accum, self.micro, v.shape[-1]) for k, v in local.items()}
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        return jax.make_array_from_process_local_data(sharding, local, shapes)

    def eval_batch(self, batcher: data_lib.BucketBatcher, scheduled: data_lib.ScheduledBatch):
        local = batcher.materialize(scheduled.bucket, scheduled.rows[self.mine])  # [local rows, L]
        shapes = {k: (self.micro, v.shape[-1]) for k, v in local.items()}
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(DATA_AXIS)), local, shapes)
