"""The programs `train.py` and `bbsmall generate` run, lowered for a topology's devices from configs alone.

Nothing is allocated and no weights, tokenizer or data are read: params, state and batches are
`jax.ShapeDtypeStruct`s with the shardings the real run gives them, and the programs come from the same
builders the real run uses (`train/program.py`, `GenerationMixin.lower_generate`, the decode engine's
`engine_programs.py`), with the TPU's plans.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax.aot.topology import Topology
from bbsmall_jax.errors import UsageError

FIRST_ORDINARY_TOKEN = 4  # ids below are special tokens; the inputs' values do not change the program


@dataclasses.dataclass(frozen=True)
class LoweredProgram:
    """A program lowered for some devices, and what it is."""

    name: str  # "train", "generate" or "engine-step"
    lowered: jax.stages.Lowered
    topology: Topology
    devices: int
    hosts: int
    description: str  # the shapes and settings, one line
    plan: str  # the backend plan it was built with, one line
    lower_seconds: float
    model_flops: Optional[float] = None  # train: model FLOPs of one step over all devices (what MFU counts)


def lower_train(cfg, topology: Topology, devices: Optional[int] = None) -> LoweredProgram:
    """The train step of `cfg`'s largest bucket, as `train.py` would run it on the topology's first devices."""
    from bbsmall_jax.train.flops import train_flops
    from bbsmall_jax.train.preparation import model_config_of
    from bbsmall_jax.train.program import build_program
    from bbsmall_jax.train.sharding import make_mesh

    mesh = make_mesh(topology.first(devices))
    model_config = model_config_of(cfg)
    start = time.perf_counter()
    program = build_program(cfg, model_config, mesh, topology.devices[0].platform)
    lowered = program.train_step.lower(program.abstract, program.batch_shapes(cfg))
    source, target = cfg.bucket_shapes[-1]
    rows = cfg.batch_size // cfg.grad_accum_steps
    description = (f"train step: batch {cfg.batch_size} ({rows // mesh.size} rows per device"
                   f"{f', {cfg.grad_accum_steps} accumulation steps' if cfg.grad_accum_steps > 1 else ''}), "
                   f"source {source}, target {target}, {jnp.dtype(program.module.dtype).name} compute, "
                   f"{'FSDP' if program.fsdp else 'data-parallel'}, remat {cfg.remat}")
    return LoweredProgram("train", lowered, topology, mesh.size, _hosts(mesh.devices.flat), description,
                          program.plan.describe(), time.perf_counter() - start,
                          train_flops(model_config, cfg.batch_size, source, target))


def model_files(name: Optional[str]) -> str:
    """The directory holding a `--model`'s config.json (and generation_config.json when it has one): the demo
    model, a local directory, or a hub id's configs alone (from the cache, or fetched without weights)."""
    from bbsmall_jax.hub import resolve_directory
    from bbsmall_jax.runtime.models import DEMO_NAME, model_directory

    if name is None or name == DEMO_NAME or os.path.isdir(name):
        return model_directory(name)
    return resolve_directory(name, allow_patterns=["config.json", "generation_config.json"])


def abstract_model(directory: str, dtype: str, backend: str):
    """The generation class over its config alone: float32 params as ShapeDtypeStructs, the model's
    generation defaults."""
    from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration, GenerationConfig
    from bbsmall_jax.runtime.precision import compute_dtype
    from bbsmall_jax.nn.model import build_module, init_params

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} has no config.json")
    config = BlenderbotSmallConfig.from_json_file(config_path)
    module = build_module(config, BlenderbotSmallForConditionalGeneration.head)
    params = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    model = BlenderbotSmallForConditionalGeneration(config, params, dtype=jnp.dtype(compute_dtype(dtype, backend)))
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def lower_generate(model_name: Optional[str], topology: Topology, devices: Optional[int], batch_size: int,
                   source_length: int, dtype: str = "auto", **generation_kwargs) -> LoweredProgram:
    """The program `generate` runs for a batch of `batch_size` contexts of `source_length` tokens on the
    topology's first devices (default: one host's, as each `bbsmall generate` process runs its own)."""
    for name, value in (("batch size", batch_size), ("source length", source_length)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    chosen = topology.first(devices) if devices is not None else _one_host(topology)
    model = abstract_model(model_files(model_name), dtype, chosen[0].platform)
    ids = np.full((batch_size, source_length), FIRST_ORDINARY_TOKEN, np.int32)
    start = time.perf_counter()
    lowered = model.lower_generate(ids, devices=list(chosen), **generation_kwargs)
    settings = model.generation_config.replace(**generation_kwargs)
    strategy = (f"beam {settings.num_beams}" if settings.num_beams > 1 else
                "sampling" if settings.do_sample else "greedy")
    new_tokens = (f"{settings.max_new_tokens} new tokens" if settings.max_new_tokens is not None
                  else f"max_length {settings.max_length}")
    description = (f"generate: {strategy}, batch {batch_size}, source {source_length}, {new_tokens}, "
                   f"{jnp.dtype(model.dtype).name} compute")
    plan = model.decoding_plan(batch_size * max(settings.num_beams, 1), len(chosen), chosen[0].platform)
    return LoweredProgram("generate", lowered, topology, len(chosen), _hosts(chosen), description, plan.describe(),
                          time.perf_counter() - start)


def lower_engine_step(model_name: Optional[str], topology: Topology, devices: Optional[int], slots: int,
                      source_length: int, steps: int = 8, dtype: str = "auto",
                      **generation_kwargs) -> LoweredProgram:
    """The decode engine's `step` program (`steps` decoding steps for `slots` slots, contexts of up to
    `source_length` tokens) as `bbsmall serve` would run it on the topology's first devices (default: one
    host's), over an abstract state laid out as the engine lays it out."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from bbsmall_jax import meshes
    from bbsmall_jax.generation import engine_programs
    from bbsmall_jax.generation.engine import engine_spec

    chosen = topology.first(devices) if devices is not None else _one_host(topology)
    model = abstract_model(model_files(model_name), dtype, chosen[0].platform)
    spec = engine_spec(model, generation_kwargs, slots=slots, group_width=None, steps=steps, max_length=None,
                       max_context=source_length, devices=len(chosen), backend=chosen[0].platform)
    mesh = None if len(chosen) == 1 else meshes.data_mesh(chosen)
    start = time.perf_counter()
    state = jax.eval_shape(lambda: engine_programs.empty_state(spec, model.module))
    layout = (jax.tree_util.tree_map(lambda _: SingleDeviceSharding(chosen[0]), state) if mesh is None
              else engine_programs.state_shardings(state, mesh))
    everywhere = SingleDeviceSharding(chosen[0]) if mesh is None else NamedSharding(mesh, PartitionSpec())
    place = lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)  # noqa: E731
    params = jax.tree_util.tree_map(lambda x: place(x, everywhere), model.params)
    weights = jax.tree_util.tree_map(lambda x: place(x, everywhere), spec.plan.decoding_weights(model.params))
    step = engine_programs.compile_programs(model.module, spec)["step"]
    lowered = step.lower(params, weights, jax.tree_util.tree_map(place, state, layout), spec=spec, mesh=mesh)
    description = (f"engine step: {spec.slots} slots (lanes of {spec.group_width}), {steps} decoding steps, "
                   f"{spec.buffer_length} positions, source {spec.source_length}, "
                   f"{jnp.dtype(model.dtype).name} compute")
    return LoweredProgram("engine-step", lowered, topology, len(chosen), _hosts(chosen), description,
                          spec.plan.describe(), time.perf_counter() - start)


def _hosts(devices) -> int:
    return len({d.process_index for d in devices})


def _one_host(topology: Topology) -> Sequence[jax.Device]:
    """The default devices' share of the first host."""
    return [d for d in topology.first(None) if d.process_index == topology.devices[0].process_index]
