"""The optional CPU kernels (the `_cpu_kernels` extension, built from `csrc/`) as JAX operations.

One kernel so far: a float32 matmul of a few rows by a large weight matrix packed in column panels,
which reads the weights once however many rows there are. XLA's CPU matmul reads them at about half
its one-row speed for 2-16 rows, which makes the LM head most of a beam-search step.

Nothing depends on the kernel: `available()` is False without the extension (no compiler at install
time), on CPUs without AVX-512, off the CPU backend, or with `BBSMALL_CPU_KERNELS=0`, and callers then
use XLA's matmul.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from bbsmall_jax.errors import UsageError

Array = jax.Array

PANEL = 32  # columns per panel, as the kernel's
_TARGET = "bbsmall_small_rows_matmul"


@functools.lru_cache(maxsize=None)
def _registration_problem() -> Optional[str]:
    """Load the extension and register its handler with XLA, once; why it cannot run, or None."""
    if os.environ.get("BBSMALL_CPU_KERNELS", "1") == "0":
        return "BBSMALL_CPU_KERNELS=0"
    try:
        from bbsmall_jax.generation import _cpu_kernels
    except ImportError:
        return "not built: the install found no C++ compiler or no jaxlib headers"
    if not _cpu_kernels.cpu_supported:
        return "this CPU has no AVX-512"
    if not hasattr(jax, "ffi"):
        return "this jax has no jax.ffi"
    try:
        jax.ffi.register_ffi_target(_TARGET, _cpu_kernels.small_rows_matmul, platform="cpu")
        _self_check()
    except Exception as error:  # e.g. a jaxlib whose FFI is older than the headers it was built with
        return f"it fails its self-check ({error})"
    return None


def _self_check() -> None:
    """Run the kernel once on the CPU against numpy (a few rows, a partial panel); raise if it fails."""
    cpu = jax.devices("cpu")[0]
    x = np.arange(24, dtype=np.float32).reshape(3, 8) / 7
    w = np.cos(np.arange(8 * 40, dtype=np.float32)).reshape(8, 40)
    packed = jax.device_put(pack_columns(w), cpu)
    got = np.asarray(small_rows_matmul(jax.device_put(x, cpu), packed))
    if not np.allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5):
        raise RuntimeError("its result differs from numpy's")


def unavailable_reason() -> Optional[str]:
    """Why the kernel cannot run in programs compiled for the default backend, or None when it can."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not the CPU"
    return _registration_problem()


def available() -> bool:
    """Whether the kernel can run in programs compiled for the default backend."""
    return unavailable_reason() is None


@struct.dataclass
class PackedColumns:
    """A [K, N] float32 weight matrix in the kernel's layout: panel p holds columns 32p .. 32p + 31."""

    panels: Array  # [ceil(N / 32), K, 32] float32, zero beyond column N
    columns: int = struct.field(pytree_node=False)  # N


@functools.partial(jax.jit, static_argnames="transposed")
def _pack_columns(weights: Array, transposed: bool = False) -> Array:
    """[K, N] (or its transpose [N, K], as an embedding table is) -> panels [ceil(N / 32), K, 32]."""
    weights = weights.T if transposed else weights
    depth, columns = weights.shape
    padded = jnp.pad(weights.astype(jnp.float32), ((0, 0), (0, -columns % PANEL)))
    return padded.reshape(depth, -1, PANEL).transpose(1, 0, 2)  # [K, P, 32] -> [P, K, 32]


def pack_dense_kernels(params: dict) -> dict:
    """Every Dense kernel [K, N] in a params tree, packed, in a tree of the same paths (nothing else)."""
    packed = {}
    for name, value in params.items():
        if isinstance(value, dict):
            inner = pack_dense_kernels(value)
            if inner:
                packed[name] = inner
        elif name == "kernel" and value.ndim == 2:
            packed[name] = pack_columns(value)
    return packed


def pack_columns(weights: Array) -> PackedColumns:
    """The kernel's layout of a weight matrix [K, N]."""
    return PackedColumns(panels=_pack_columns(weights), columns=weights.shape[1])


def pack_transposed(table: Array) -> PackedColumns:
    """The kernel's layout of `table.T` for a table [N, K]: the tied embedding gives the LM head [D, V]."""
    return PackedColumns(panels=_pack_columns(table, transposed=True), columns=table.shape[0])


def small_rows_matmul(x: Array, weights: PackedColumns, bias: Optional[Array] = None) -> Array:
    """x [..., K] @ weights [K, N] + bias [N] -> [..., N] float32, by the kernel (check `available()` first)."""
    if x.shape[-1] != weights.panels.shape[1]:
        raise UsageError(f"x has {x.shape[-1]} features but the packed weights expect {weights.panels.shape[1]}")
    bias = jnp.zeros((weights.columns,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    result = jax.ShapeDtypeStruct(x.shape[:-1] + (weights.columns,), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, result)(x.astype(jnp.float32), weights.panels, bias)
