"""Checksums of a train state's arrays, computed where the arrays live, and their check after a restore.

Each array's checksum is two 32-bit lanes, each a sum over its elements (as 32-bit words) times odd weights
that depend on the element's position, modulo 2**32. A change to any one word changes both lanes (an odd
weight times a non-zero difference is non-zero modulo 2**32); other changes go unnoticed with a chance of
about 2**-64 (CRC32C's is 2**-32). The sums run on the devices over the sharded global arrays, so every
process gets the same values without gathering anything, and they do not depend on how the arrays are laid
out: a checkpoint restored onto another number of devices verifies too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax.errors import UsageError

GOLDEN = 0x9E3779B9  # odd: the second lane's weights are i * GOLDEN | 1


class ChecksumError(UsageError):
    """A restored array differs from the one saved (or a restored param is not finite)."""


def _words(x: jax.Array) -> jax.Array:
    """x's bits as a flat uint32 vector, one element per word (16- and 8-bit values widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)  # 8 bytes: [..., 2] words


def _lanes(x: jax.Array) -> jax.Array:
    words = _words(x)
    i = jnp.arange(words.shape[0], dtype=jnp.uint32)
    first = jnp.sum(words * (2 * i + 1), dtype=jnp.uint32)
    second = jnp.sum((words ^ jnp.uint32(GOLDEN)) * ((i * jnp.uint32(GOLDEN)) | 1), dtype=jnp.uint32)
    return jnp.stack([first, second])


@jax.jit
def _all_lanes(leaves: list) -> list:
    return [_lanes(x) for x in leaves]


def _paths(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def state_checksums(state) -> dict[str, str]:
    """Path -> checksum (16 hex digits) of every array in `state` (a collective: every process calls it)."""
    leaves = jax.tree_util.tree_leaves(state)
    lanes = jax.device_get(_all_lanes(leaves))
    return {path: "".join(f"{int(v):08x}" for v in np.asarray(value)) for path, value in zip(_paths(state), lanes)}


def verify(state, saved: dict[str, str]) -> None:
    """Raise ChecksumError naming the first array whose checksum differs from `saved`'s, or that is missing."""
    have = state_checksums(state)
    for path, checksum in have.items():
        if saved.get(path) != checksum:
            raise ChecksumError(f"array {path} does not match the checksum saved with it"
                                if path in saved else f"array {path} has no saved checksum")


def check_finite_params(state) -> None:
    """Raise ChecksumError naming the first param holding NaN or infinite values."""
    params = state.get("params") if isinstance(state, dict) else None
    if not params:
        return
    finite = jax.device_get(jax.jit(lambda leaves: [jnp.isfinite(x).all() for x in leaves])(
        jax.tree_util.tree_leaves(params)))
    bad = [path for path, ok in zip(_paths(params), finite) if not ok]
    if bad:
        raise ChecksumError(f"param {bad[0]} holds NaN or infinite values")
