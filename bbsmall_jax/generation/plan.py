"""The decoding plan: every backend-specific choice of a generation program, made once per (backend, dtype, rows).

Two paths. `portable`, the default on GPU and TPU, is what XLA's accelerator backends are built for: a
position-major cache written in place by `dynamic_update_slice`, one-token attention over the whole buffer
with a mask, reading it lane-dense (`lane_dense`), beam reorders that move each row's origins, not the
cache, one matmul for the tied LM head, `lax.top_k` (per beam, then over the beams), `jnp.argmax`, token
bans by comparison with the vocabulary's iota, no custom calls. `cpu`, the default on the CPU backend,
applies `cpu_path`. `BBSMALL_DECODE_PATH` forces one, so both run (and are tested) anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation import cpu_kernel, cpu_path, lane_dense
from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.nn.layer_functions import KERNEL_LAYOUTS, LayerFunctions, plain_dense, same_index

logger = logging.getLogger(__name__)

PATHS = ("portable", "cpu")
PATH_VARIABLE = "BBSMALL_DECODE_PATH"

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecodingPlan:
    """The backend-specific choices of one generation program (static under jit)."""

    path: str  # "portable" or "cpu"
    # one-token attention over the cache: "lane_dense" (`lane_dense`), "einsum" (the model's) or "windowed"
    attention: str = "lane_dense"
    lm_head: str = "tied"  # "tied" (over the embedding), "transposed" ([D, V] copy) or "packed" (CPU kernel)
    top_k: str = "lax"  # beam search's top 2K: "lax" or "blockwise"
    # over all beams of a batch element: "per_beam" (each beam's best first: no [B, K * V] relayout) or "flat"
    beam_top_k: str = "per_beam"
    argmax: str = "argmax"  # greedy search's pick: "argmax" or "max_min" (a max and a min of indices)
    # how the repetition penalty and n-gram bans mark tokens: "compare" (with the vocabulary's iota) or "scatter"
    token_marks: str = "compare"
    ordered_writes: bool = False  # cache writes depend on the step's output (in place on XLA's CPU backend)
    time_major_cache: bool = False  # the cache's layout, position-major (see `KVCache`)
    track_origins: bool = False  # beam search reorders each row's origins, not the cache buffers
    cpu_kernel: bool = False  # decoder Dense layers through the packed-weights CPU kernel
    compiler_options: tuple[tuple[str, str], ...] = ()

    def select_top_k(self, scores: Array, count: int) -> tuple[Array, Array]:
        """The `count` best entries of scores [B, N] and their indices, ties to the lower index."""
        if self.top_k == "blockwise":
            return cpu_path.blockwise_top_k(scores, count)
        return jax.lax.top_k(scores, count)

    def select_argmax(self, scores: Array) -> Array:
        """The first maximum over the last axis."""
        if self.argmax == "max_min":
            return cpu_path.first_argmax(scores)
        return jnp.argmax(scores, axis=-1)

    def token_mask(self) -> Optional[lp.TokenMask]:
        """The logits processors' token marking (`logits_processors.process`); None: by scatter."""
        return lp.compared_token_mask if self.token_marks == "compare" else None

    def layer_functions(self) -> LayerFunctions:
        """What the model's layers compute with in this plan's programs (`nn/layer_functions.py`)."""
        attention = {"lane_dense": dict(cached_attention=lane_dense.attend_cached, cross_attention=lane_dense.attend),
                     "windowed": dict(cached_attention=cpu_path.attend_cached_one,
                                      cross_attention=cpu_path.attend_one)}.get(self.attention, {})
        return LayerFunctions(dense=cpu_path.dense if self.cpu_kernel else plain_dense,
                              write_index=cpu_path.write_after if self.ordered_writes else same_index, **attention)

    def decoding_module(self, module):
        """`module` computing with this plan's layer functions."""
        return module.clone(functions=self.layer_functions())

    def step_variables(self, params: dict, packed) -> dict:
        """The variables a decoding step applies the module to: the params, and the kernels packed for the
        CPU kernel (`decoding_weights`) where this plan uses it."""
        return {"params": params} if packed is None else {"params": params, KERNEL_LAYOUTS: packed}

    def decoding_weights(self, params: dict) -> tuple:
        """(LM-head table, packed Dense kernels) laid out for this plan; (None, None) to use the params."""
        if self.lm_head == "tied":
            return None, None
        return cpu_path.decoding_weights(params, packed=self.lm_head == "packed")

    def logits(self, hidden: Array, table, bias) -> Array:
        """The LM head over the table `decoding_weights` made: [N, D] -> [N, V] float32."""
        return cpu_path.lm_head(hidden, table, bias)

    def describe(self) -> str:
        """One line for `bbsmall info` and summaries."""
        fields = dataclasses.asdict(self)
        fields["compiler_options"] = dict(self.compiler_options) or "none"
        return ", ".join(f"{k}={v}" for k, v in fields.items())


PORTABLE = DecodingPlan("portable", track_origins=True, time_major_cache=True)


def checked_path(path: Optional[str], source: str = "decode_path") -> Optional[str]:
    """`path` lower-cased, or None for an empty or missing one; ValueError naming `source` for an unknown one."""
    name = (path or "").strip().lower()
    if name and name not in PATHS:
        raise UsageError(f"{source}={path!r}: expected one of {', '.join(PATHS)}")
    return name or None


def default_path(backend: str) -> str:
    """The path a backend gets unless another is asked for: `cpu` on the CPU backend, `portable` elsewhere."""
    return "cpu" if backend == "cpu" else "portable"


def choose_plan(backend: str, dtype, rows: int, devices: int = 1, path: Optional[str] = None) -> DecodingPlan:
    """The plan for decoding `rows` rows (batch times beams or samples) in compute `dtype` on `backend`,
    sharded over `devices` devices (the CPU kernel has no sharding rule, so it runs on one device only), on
    `path` (None: `default_path(backend)`)."""
    if (checked_path(path) or default_path(backend)) == "portable":
        return PORTABLE
    several = rows > 1
    kernel = (several and devices == 1 and jnp.dtype(dtype) == jnp.float32 and backend == "cpu"
              and _kernel_usable())
    return DecodingPlan(
        "cpu", attention="windowed", lm_head="packed" if kernel else ("transposed" if several else "tied"),
        top_k="blockwise", beam_top_k="flat", argmax="max_min", token_marks="scatter", ordered_writes=True,
        track_origins=True, cpu_kernel=kernel, compiler_options=cpu_path.COMPILER_OPTIONS if backend == "cpu" else ())


@functools.lru_cache(maxsize=None)
def _kernel_usable() -> bool:
    """Whether the CPU kernel runs here; logs once why not (most CPUs: an expected fallback, not a fault)."""
    reason = cpu_kernel.unavailable_reason()
    if reason is not None:
        logger.info("the CPU kernel is not used (%s); several-row decoding uses XLA's matmul (correct, slower "
                    "for beam search and batches)", reason)
    return reason is None


def default_plan(dtype=jnp.float32, rows: int = 1, devices: int = 1) -> DecodingPlan:
    """The plan the default backend gets on its default path."""
    return choose_plan(jax.default_backend(), dtype, rows, devices)
