"""A run's jitted programs (train step, eval step, finiteness check), built once for a config, model and mesh.

`train.py` runs them; `bbsmall compile train` compiles the same ones for a TPU topology (`bbsmall_jax.aot`),
so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_stacks import stack_layers, unstack_layers
from bbsmall_jax.nn.model import build_module
from bbsmall_jax.runtime.precision import compute_dtype
from bbsmall_jax.train.config import ConfigError, TrainConfig
from bbsmall_jax.train.packing import PACKED_KEYS
from bbsmall_jax.train.plan import TrainingPlan, choose_plan
from bbsmall_jax.train.sharding import DATA_AXIS
from bbsmall_jax.train.steps import abstract_state, learning_rate_schedule, make_eval_step, make_optimizer, make_train_step


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What a run computes with, for one backend and mesh."""

    module: Any  # the Flax module (compute dtype, float32 params, the plan's layer options)
    plan: TrainingPlan
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict  # the train state as ShapeDtypeStructs with their shardings
    fsdp: bool
    checkpoint_abstract: dict  # the train state as checkpoints hold it: each layer apart, under its own name
    train_step: Callable  # jitted (state, batch [A, micro, L]) -> (state, metrics); donates the state
    eval_step: Callable  # jitted (params, batch [micro, L]) -> (NLL sum, tokens, NLL sum under the next context)
    all_finite: Callable  # jitted params -> bool []

    @property
    def stacked(self) -> bool:
        """Whether the state keeps each stack's layers stacked (`nn/layer_stacks.py`); checkpoints never do."""
        return self.plan.stacks_layers(self.module.config)

    def to_checkpoint(self, state: dict) -> dict:
        """The train state in the checkpoints' layout (a new state when the run's differs)."""
        return self._relayout(state, unstack_layers, self.checkpoint_abstract) if self.stacked else state

    def from_checkpoint(self, state: dict) -> dict:
        """A restored train state (the checkpoints' layout) in the run's."""
        return self._relayout(state, lambda s: stack_layers(s, jnp), self.abstract) if self.stacked else state

    @staticmethod
    def _relayout(state: dict, change: Callable, abstract: dict) -> dict:
        shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
        return jax.jit(change, out_shardings=shardings)(state)

    @property
    def mesh(self) -> Mesh:
        return jax.tree_util.tree_leaves(self.abstract)[0].sharding.mesh

    def batch_shapes(self, cfg: TrainConfig, bucket: Optional[tuple[int, int]] = None) -> dict:
        """A train batch of `bucket` (default: the largest) as ShapeDtypeStructs [A, micro, L], sharded as fed
        (with packing, the packed batch's keys too)."""
        source, target = bucket or cfg.bucket_shapes[-1]
        shape = lambda length: (cfg.grad_accum_steps, cfg.batch_size // cfg.grad_accum_steps, length)
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        spec = lambda length: jax.ShapeDtypeStruct(shape(length), jnp.int32, sharding=sharding)
        batch = {"input_ids": spec(source), "attention_mask": spec(source), "labels": spec(target)}
        if cfg.packing:  # packed rows' segment ids and positions (train/packing.py)
            batch.update({name: spec(source if name.startswith("encoder") else target) for name in PACKED_KEYS})
        return batch


def check_batch(cfg: TrainConfig, devices: int) -> int:
    """The micro-batch size, which the devices must divide (ConfigError naming the sizes otherwise)."""
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro % devices:
        raise ConfigError(f"batch_size / grad_accum_steps = {micro} examples per micro-batch must be divisible "
                          f"by the {devices} devices")
    return micro


def build_program(cfg: TrainConfig, model_config: BlenderbotSmallConfig, mesh: Mesh, backend: str) -> TrainProgram:
    """The programs of a run of `cfg` on `mesh`, whose devices are `backend`'s ("cpu", "gpu", "tpu")."""
    check_batch(cfg, mesh.size)
    dtype = jnp.dtype(compute_dtype(cfg.dtype, backend))
    plan = choose_plan(backend, dtype)
    module = build_module(model_config, "seq2seq_lm", dtype, jnp.float32, **plan.module_options())
    optimizer, schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
    fsdp = cfg.uses_fsdp(backend, mesh.size)
    stacked = plan.stacks_layers(model_config)
    abstract = abstract_state(module, optimizer, mesh, fsdp, stacked)
    state_shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    replicated = NamedSharding(mesh, P())
    jit = functools.partial(jax.jit, compiler_options=dict(plan.compiler_options) or None)
    train_step = jit(make_train_step(module, optimizer, schedule, cfg.label_smoothing, cfg.remat, plan, mesh, fsdp),
                     in_shardings=(state_shardings, NamedSharding(mesh, P(None, DATA_AXIS))),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jit(make_eval_step(module, plan, mesh),
                    in_shardings=(state_shardings["params"], NamedSharding(mesh, P(DATA_AXIS))),
                    out_shardings=replicated)
    all_finite = jit(_all_finite, in_shardings=(state_shardings["params"],), out_shardings=replicated)
    checkpoint_abstract = abstract_state(module, optimizer, mesh, fsdp) if stacked else abstract
    return TrainProgram(module, plan, optimizer, schedule, abstract, fsdp, checkpoint_abstract, train_step, eval_step,
                        all_finite)
