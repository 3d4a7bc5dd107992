"""The training plan: every backend-specific choice of the train step, made once per (backend, dtype).

The model's layers know nothing of the backend; what differs between XLA's CPU and accelerator backends
sits here, as generation's sits in `generation/plan.py`: how the LM head and the loss are computed, which
dense function the layers are given (`layer_functions`), whether layers run under `lax.scan`, which RNG
dropout draws from, and how the tied embedding is laid out. `BBSMALL_TRAIN_LOSS=fused|plain` forces the
loss path (both are tested on CPU).

Measured on the 90M shape on a 2-core AVX2 CPU and left out: dropout keys stay threefry (`rbg` and
`unsafe_rbg` keys made a step 3-5% slower); XLA's CPU options stay at their defaults (Eigen matmuls
instead of YNNPACK, which generation's CPU path prefers, made a step 25% slower; oneDNN matmuls, XNNPACK
graph fusion and the FAST_RUNTIME preset were within 3%).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.layer_functions import PLAIN, LayerFunctions

# rbg's bits partitioned like the arrays they mask: each device draws its own rows' bits (otherwise every
# device draws the whole batch's and keeps its slice). MaxText sets the same for its rbg keys.
TPU_RNG_OPTIONS = (("xla_tpu_spmd_rng_bit_generator_unsafe", "true"),)
LOSSES = ("fused", "plain")
DROPOUT_RNGS = ("threefry", "rbg")
LOSS_VARIABLE = "BBSMALL_TRAIN_LOSS"


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """The backend-specific choices of one train step (static under jit)."""

    loss: str = "fused"  # "fused": train/loss.py, chunked, logits only at labels; "plain": the model's [B, T, V]
    loss_chunk_rows: int = 128  # label rows per chunk of the fused loss; 0: every row in one chunk, unsorted
    loss_vocab_tile: int = 0  # > 0: the fused loss walks the vocabulary in tiles of about this many columns
    scan_layers: bool = False  # the encoder's and the decoder's layers run under `lax.scan` (compile time)
    dropout_rng: str = "threefry"  # the dropout keys' implementation: "threefry" or "rbg" (TPU's RNG)
    gather_embedding: bool = False  # over several devices, the tied embedding is cast and gathered once per step
    compiler_options: tuple[tuple[str, str], ...] = ()  # XLA options the train and eval steps compile with
    # Dense layers over [B, T, D] as one [B * T, D] matmul whose kernel gradient is a plain 2-D matmul over
    # one operand transposed (`_matmul`): XLA's CPU backend otherwise contracts over two axes in place,
    # through transposing copies fused into other loops or a slow path.
    flat_dense: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UsageError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise UsageError(f"dropout_rng must be one of {', '.join(DROPOUT_RNGS)}, got {self.dropout_rng!r}")

    def module_options(self) -> dict:
        """What `build_module` is given besides the config and dtypes."""
        return {"scan_layers": self.scan_layers}

    def stacks_layers(self, config) -> bool:
        """Whether the train state keeps each stack's layers stacked (`nn/layer_stacks.py`): when every
        training pass runs them under `lax.scan`, which LayerDrop's per-layer choice rules out."""
        return self.scan_layers and config.encoder_layerdrop == 0.0 and config.decoder_layerdrop == 0.0

    def dropout_key(self, key: jax.Array) -> jax.Array:
        """The step's dropout key (threefry raw key data [2]) in this plan's implementation."""
        if self.dropout_rng == "threefry":
            return key
        return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=self.dropout_rng)

    def layer_functions(self) -> LayerFunctions:
        """What the model's layers compute with in the train and eval steps (`nn/layer_functions.py`)."""
        return LayerFunctions(dense=_flat_dense) if self.flat_dense else PLAIN

    def training_module(self, module):
        """`module` computing with this plan's layer functions."""
        return module.clone(functions=self.layer_functions())

    def describe(self) -> str:
        """One line for logs and benchmark reports."""
        fields = dataclasses.asdict(self)
        fields["compiler_options"] = dict(self.compiler_options) or "none"
        return ", ".join(f"{k}={v}" for k, v in fields.items())


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """[N, I] x [I, O]; its kernel gradient is a plain matmul over the narrower of x and dy transposed."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    # Contracting the rows of both x and dy in place is, on XLA's CPU backend, a slow path or a transposing
    # copy; the copy is a strided loop into which XLA fuses their producers (a GELU, LayerNorm's backward),
    # so it costs in proportion to the size transposed: the narrower of x [N, I] and dy [N, O] is.
    if x.shape[1] <= dy.shape[1]:
        d_w = jax.lax.optimization_barrier(x.T) @ dy  # [I, N] x [N, O]
    else:
        d_w = (jax.lax.optimization_barrier(dy.T) @ x).T  # ([O, N] x [N, I]).T
    return dy @ w.T, d_w


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _flat_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype, laid_out=None) -> jax.Array:
    """A linear layer over rows [N, features] whatever its input's rank, as `_matmul` (what flax's `nn.Dense`
    computes otherwise: default precision, bias added)."""
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = _matmul(x.reshape(-1, x.shape[-1]), kernel) + bias
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def requested_loss() -> str:
    """`BBSMALL_TRAIN_LOSS` if set, else "fused"."""
    loss = os.environ.get(LOSS_VARIABLE, "").strip().lower() or "fused"
    if loss not in LOSSES:
        raise UsageError(f"{LOSS_VARIABLE}={os.environ[LOSS_VARIABLE]!r}: expected one of {', '.join(LOSSES)}")
    return loss


def choose_plan(backend: str, dtype=jnp.float32) -> TrainingPlan:
    """The plan for training in compute `dtype` on `backend` ("cpu", "gpu", "tpu").

    On the CPU, chunks of 128 label rows were measured fastest (the LM head and loss of the 90M shape,
    forward and backward, 1.3-1.5x faster than the plain loss; 64 or 256 rows 1.2x). GPU and TPU get what
    the TPU compiler's estimates chose (`bbsmall compile train`, README "Before you get a TPU"; not measured
    on a chip): every row in one chunk, walked in vocabulary tiles of about 4,096 columns under `lax.scan`
    (logits never whole; a chunk with nothing sized at run time, which the SPMD partitioner lays out over
    the devices), the tied embedding gathered once per step, layers under `lax.scan` over a train state
    that keeps them stacked (`stacks_layers`), and on TPU the hardware RNG for dropout (threefry's bits are
    integer vector work there). At the 90M shape on v5e:2x2 these took the yardstick HBM estimate of a step
    of 16 rows per chip from 8.6 GB (data-parallel; 5.1 GB FSDP) to 2.05 GB, and its TPU compile on a
    2-core CPU from 277-505 s to about 77 s.
    """
    cpu = backend == "cpu"
    return TrainingPlan(loss=requested_loss(), loss_chunk_rows=128 if cpu else 0,
                        loss_vocab_tile=0 if cpu else 4096, scan_layers=not cpu,
                        dropout_rng="rbg" if backend == "tpu" else "threefry", gather_embedding=not cpu,
                        flat_dense=cpu, compiler_options=TPU_RNG_OPTIONS if backend == "tpu" else ())


def default_plan(dtype=jnp.float32) -> TrainingPlan:
    """The plan the default backend gets."""
    return choose_plan(jax.default_backend(), dtype)
