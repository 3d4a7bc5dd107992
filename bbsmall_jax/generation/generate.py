"""`generate` for the encoder-decoder and decoder-only classes: settings, preparation, one jitted program."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from bbsmall_jax import meshes, startup_cache
from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.generation import plan as plan_lib
from bbsmall_jax.generation.config import UNSUPPORTED, GenerationConfig
from bbsmall_jax.generation.prepare import neutral, prepare
from bbsmall_jax.generation.program import GenerateOutput, finish, finish_traced
from bbsmall_jax.generation.sampler import Sampler
from bbsmall_jax.generation.sharding import data_mesh, device_count, input_shardings, place_inputs
from bbsmall_jax.nn import validation as check

Array = jax.Array

__all__ = ["GenerateOutput", "GenerationMixin"]


class GenerationMixin:
    """`generate` for a model class with `config`, `params`, `module`, `dtype` and `head`."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's generation defaults: its `generation_config.json`, else derived from `config.json`."""
        if getattr(self, "_generation_config", None) is None:
            self._generation_config = GenerationConfig.from_model_config(self.config)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self._generation_config = value

    # The decoding path, "portable" or "cpu" (`generation/plan.py`); None: the backend's own ("cpu" on the CPU
    # backend, "portable" elsewhere). A model's programs for either path are kept side by side.
    decode_path: Optional[str] = None

    @property
    def sampler(self) -> Sampler:
        """What generation keeps between calls (`generation/sampler.py`): made for the model's module, and made
        anew when the module is replaced."""
        sampler = getattr(self, "_sampler", None)
        if sampler is None or sampler.module is not self.module:
            sampler = self._sampler = Sampler(self.module, self.head != "decoder_only")
        return sampler

    def decoding_plan(self, rows: int, devices: int = 1, backend: Optional[str] = None) -> plan_lib.DecodingPlan:
        """The decoding plan for `rows` rows (batch bucket times beams or samples) over `devices` devices of
        `backend` (default: JAX's default backend), on `decode_path`."""
        return plan_lib.choose_plan(backend or jax.default_backend(), self.dtype, rows, devices, self.decode_path)

    def _program_identity(self) -> tuple:
        """What the generation programs are made from besides their static settings and argument shapes."""
        return type(self).__name__, self.config.identity(), str(jax.numpy.dtype(self.dtype))

    def _resolve_generation_config(self, generation_config: Optional[GenerationConfig],
                                   kwargs: dict) -> tuple[GenerationConfig, bool]:
        """Model defaults < `generation_config` < kwargs < (for what is still unset) global defaults."""
        names = set(GenerationConfig.field_names())
        for key, value in kwargs.items():
            if key in UNSUPPORTED:
                if not neutral(value, key):
                    raise UsageError(f"generation option {key}={value!r} is not supported by this implementation")
            elif key not in names:
                raise UsageTypeError(f"generate() got an unexpected keyword argument {key!r}")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise UsageTypeError(
                f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
        base = self.generation_config
        if generation_config is not None:
            base = base.update(generation_config)
        given = {k: v for k, v in kwargs.items() if k in names}  # an explicit None unsets, as in transformers
        cfg = base.replace(**given)
        default_max_length = cfg.max_length is None
        return cfg.with_defaults(), default_max_length

    def generate(self, input_ids=None, attention_mask=None, generation_config: Optional[GenerationConfig] = None, *,
                 prng_key: Optional[Array] = None, params=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, devices: Optional[Sequence[jax.Device]] = None, **kwargs):
        """Generate token ids as transformers' `generate` does (greedy, sampling or beam search), jit-compiled.

        Settings come from `generation_config` and keyword arguments (HF names), over the model's
        `generation_config`. Returns the sequences [rows, T] (starting with the decoder start token for
        the encoder-decoder, with the prompt for the decoder-only model; padded like transformers),
        or a `GenerateOutput` with `return_dict_in_generate=True`. Sampling draws from `prng_key`
        (default `PRNGKey(0)`), so a fixed key reproduces the output.

        The batch is sharded over `devices` (default: all of this process's devices), params replicated
        unless already laid out over them; the output equals a one-device run's.

        Inside the caller's own `jit`, `pmap` or `shard_map` (traced inputs, params or key), it becomes part of
        the caller's program, on the portable decoding path: the sequences are then [rows, max_length], the
        un-traced result right-padded with the pad token (their length cannot depend on the values there),
        and the value checks of `nn/validation.py` are the caller's.
        """
        if check.is_traced(input_ids, attention_mask, params, prng_key, encoder_hidden_states,
                           encoder_attention_mask):
            if devices is not None:
                raise UsageError("generate() inside a jit/pmap/shard_map runs where the caller's program runs; "
                                 "devices= is for calls outside one")
            return self._generate_traced(input_ids, attention_mask, generation_config, prng_key, params,
                                         encoder_hidden_states, encoder_attention_mask, kwargs)
        mesh = data_mesh(devices)
        prepared = self._prepare(input_ids, attention_mask, generation_config, prng_key, encoder_hidden_states,
                                 encoder_attention_mask, kwargs, device_count(mesh))
        if prepared.batch == 0:  # nothing to compile or run
            empty = jax.device_put(np.zeros((0, prepared.prompt_length), np.int32))
            return GenerateOutput(sequences=empty) if prepared.return_dict else empty
        program, args, static = self._call(prepared, params, mesh)
        return finish(startup_cache.run_program(program, args, static, self._program_identity()), prepared)

    def _generate_traced(self, input_ids, attention_mask, generation_config, prng_key, params,
                         encoder_hidden_states, encoder_attention_mask, kwargs: dict):
        """`generate` as part of the caller's traced program: the portable plan, the inputs laid out by jax,
        nothing on the host but the static settings."""
        cfg, default_max_length = self._resolve_generation_config(generation_config, kwargs)
        prepared = prepare(self.config, self.head != "decoder_only", cfg, default_max_length, input_ids,
                           attention_mask, encoder_hidden_states, encoder_attention_mask, prng_key, traced=True)
        if prepared.spec.output_scores:
            raise UsageError("output_scores inside a jit/pmap/shard_map: the number of steps depends on the values "
                             "there; call generate() outside the transformation for per-step scores")
        plan = plan_lib.PORTABLE
        params = self.params if params is None else params
        out = self.sampler.program(plan)(params, plan.decoding_weights(params), prepared.inputs, prepared.search,
                                  spec=dataclasses.replace(prepared.spec, plan=plan), layout=prepared.layout,
                                  mesh=None)
        return finish_traced(out, prepared)

    def lower_generate(self, input_ids=None, attention_mask=None, generation_config=None, *, prng_key=None,
                       params=None, encoder_hidden_states=None, encoder_attention_mask=None, devices=None,
                       **kwargs):
        """The `jax.stages.Lowered` program `generate` would run for these arguments (to inspect its HLO).

        `devices` may also be devices this process cannot run on (a TPU topology's, see `bbsmall_jax.aot`):
        the program is then lowered for their platform over abstract arguments laid out as `generate` lays
        them out, and `params` may be `jax.ShapeDtypeStruct`s.
        """
        devices = list(jax.local_devices() if devices is None else devices)
        elsewhere = devices[0].platform != jax.default_backend()
        mesh = _mesh(devices) if elsewhere else data_mesh(devices)
        prepared = self._prepare(input_ids, attention_mask, generation_config, prng_key, encoder_hidden_states,
                                 encoder_attention_mask, kwargs, device_count(mesh))
        backend = devices[0].platform if elsewhere else None
        program, args, static = self._call(prepared, params, mesh, backend, abstract_on=devices[0] if elsewhere
                                           else None)
        return program.lower(*args, **static)

    def _prepare(self, input_ids, attention_mask, generation_config, prng_key, encoder_hidden_states,
                 encoder_attention_mask, kwargs: dict, batch_multiple: int):
        cfg, default_max_length = self._resolve_generation_config(generation_config, kwargs)
        return prepare(self.config, self.head != "decoder_only", cfg, default_max_length, input_ids, attention_mask,
                       encoder_hidden_states, encoder_attention_mask, prng_key, batch_multiple)

    def _call(self, prepared, params, mesh, backend: Optional[str] = None,
              abstract_on: Optional[jax.Device] = None) -> tuple:
        """(jitted program, positional arguments, static arguments) of a prepared call on `backend`'s plan; with
        `abstract_on` (the first device, one the process cannot address) the arguments are ShapeDtypeStructs."""
        plan = self.decoding_plan(prepared.rows, device_count(mesh), backend)
        params = self.params if params is None else params
        if abstract_on is None:
            inputs, search_inputs = place_inputs(prepared, mesh)
            weights = self.sampler.placed_weights(params, plan, mesh)
        else:
            inputs, search_inputs = _abstract((prepared.inputs, prepared.search), mesh, abstract_on,
                                              None if mesh is None else input_shardings(prepared, mesh))
            weights = _abstract((params, plan.decoding_weights(params)), mesh, abstract_on)
        args = (*weights, inputs, search_inputs)
        return self.sampler.program(plan), args, dict(spec=dataclasses.replace(prepared.spec, plan=plan),
                                               layout=prepared.layout, mesh=mesh)


def _mesh(devices: Sequence[jax.Device]):
    """The data mesh `generate` would make of these devices (None for one), wherever they are."""
    return None if len(devices) == 1 else meshes.data_mesh(devices)


def _abstract(tree, mesh, device: jax.Device, shardings=None):
    """ShapeDtypeStructs of `tree`'s arrays, laid out by `shardings` (default: replicated over the mesh, or on
    `device` without one)."""
    if shardings is None:
        everywhere = SingleDeviceSharding(device) if mesh is None else NamedSharding(mesh, P())
        shardings = jax.tree_util.tree_map(lambda _: everywhere, tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                  tree, shardings)
