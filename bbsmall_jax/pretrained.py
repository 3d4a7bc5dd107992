"""The user-facing classes: HF-like `from_pretrained` / `save_pretrained` / `__call__` over the Flax modules.

They also carry transformers' Flax surface (`encode`, `decode`, `init_cache`, `params=` on every call,
`_do_init=False`, `to_bf16`...), and every call can run inside the caller's own `jit`, `pmap`, `grad` or
`shard_map`: see `nn/validation.py` for which checks then move to the caller.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bbsmall_jax import startup_cache
from bbsmall_jax.checkpoint.files import find_weights_file, load_state_dict, save_safetensors
from bbsmall_jax.checkpoint.names import flax_to_hf, hf_to_flax
from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.generation.config import GenerationConfig
from bbsmall_jax.generation.generate import GenerationMixin
from bbsmall_jax.hub import resolve_directory
from bbsmall_jax.nn import validation as check
from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.model import (BlenderbotSmallDecoderOnly, BlenderbotSmallSeq2Seq, Head, build_module, init_params,
                                  param_shapes)
from bbsmall_jax.nn.outputs import CausalLMOutput, DecoderOutputWithPast, EncoderOutput, ModelOutput

STATIC_ARGUMENTS = ("method", "deterministic", "output_hidden_states", "output_attentions", "logits_to_keep")

class _PretrainedModel:
    """Config + params + Flax module; `module.apply({"params": params}, ...)` is the pure core."""

    head: Head
    hf_architecture: str
    main_input_name = "input_ids"

    def __init__(self, config: BlenderbotSmallConfig, params: Optional[dict] = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0, input_shape: tuple[int, int] = (1, 1),
                 _do_init: bool = True):
        """`params` default to a random init from `seed`; with `_do_init=False` (transformers' flag) none are
        made, and each call takes `params=` (see `params_shape_tree` and `init_weights`). `input_shape` is
        accepted for transformers' signature: our init does not depend on it."""
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype  # None: each leaf keeps its dtype
        self.module = build_module(config, self.head, dtype, jnp.float32 if param_dtype is None else param_dtype)
        self.key, self.input_shape = jax.random.PRNGKey(seed), tuple(input_shape)
        self._do_init, self._params = _do_init, None
        if params is not None:
            self._store(params, checked=True)
        elif _do_init:
            self._store(init_params(self.module, self.key), checked=False)
        self._apply_jitted = jax.jit(self._apply, static_argnames=STATIC_ARGUMENTS)

    @property
    def params(self) -> dict:
        if not self._do_init:
            raise UsageError(f"this {type(self).__name__} was built with _do_init=False and holds no params: pass "
                             "params= to each call (model.init_weights(key) makes a random set)")
        return self._params

    @params.setter
    def params(self, params: dict) -> None:
        if not self._do_init:
            raise UsageError(f"this {type(self).__name__} was built with _do_init=False and holds no params: pass "
                             "params= to each call instead")
        self._store(params, checked=True)

    def _store(self, params: dict, checked: bool) -> None:
        """Keep `params`, cast to `param_dtype` (None keeps each leaf's dtype: a bf16 checkpoint stays bf16);
        `checked`: first make sure no leaf the model needs is missing."""
        missing = self.required_params - set(traverse_util.flatten_dict(params)) if checked else ()
        if missing:
            raise UsageError(f"params lack {len(missing)} of the model's leaves, among them "
                             f"{'/'.join(sorted(missing)[0])}")
        # ShapeDtypeStructs make an abstract model: its programs can be lowered and compiled, not run.
        self._params = jax.tree_util.tree_map(
            lambda p: p if isinstance(p, jax.ShapeDtypeStruct) else jnp.asarray(p, self.param_dtype), params)

    @property
    def params_shape_tree(self) -> dict:
        """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s), without making them."""
        return jax.eval_shape(lambda: init_params(self.module, jax.random.PRNGKey(0)))

    @property
    def required_params(self) -> set[tuple[str, ...]]:
        """The path of every param leaf the model needs."""
        return set(_param_shapes(self.config, self.head))

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, int] = (1, 1), params: Optional[dict] = None) -> dict:
        """Random params from `rng`; with `params`, theirs where they have a leaf and random ones elsewhere."""
        fresh = init_params(self.module, rng)
        if params is None:
            return fresh
        given = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({path: given.get(path, leaf)
                                             for path, leaf in traverse_util.flatten_dict(fresh).items()})

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them (transformers' Flax
        method): gradients of the user's own `jax.grad` then hold one layer's activations at a time."""
        self.module = build_module(self.config, self.head, self.dtype, self.module.param_dtype, remat_layers=True)
        self._apply_jitted = jax.jit(self._apply, static_argnames=STATIC_ARGUMENTS)  # traced anew with it

    @classmethod
    def can_generate(cls) -> bool:
        return hasattr(cls, "generate")

    def to_bf16(self, params: dict, mask: Optional[dict] = None) -> dict:
        """`params` with their floating leaves (where `mask` is True) cast to bfloat16; a new tree."""
        return _cast_floating(params, jnp.bfloat16, mask)

    def to_fp16(self, params: dict, mask: Optional[dict] = None) -> dict:
        return _cast_floating(params, jnp.float16, mask)

    def to_fp32(self, params: dict, mask: Optional[dict] = None) -> dict:
        return _cast_floating(params, jnp.float32, mask)

    def _apply(self, params, inputs: dict, rngs, method=None, **static):
        return self.module.apply({"params": params}, **inputs, rngs=rngs, method=method, **static)

    def _run(self, params, inputs: dict, train: bool, dropout_rng, return_dict: Optional[bool], method=None,
             output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None, **static):
        """One jitted application of the module (or one of its methods); settings left None take the config's."""
        outputs = self._apply_jitted(
            self.params if params is None else params, inputs, self._rngs(train, dropout_rng), method=method,
            deterministic=not train,
            output_hidden_states=bool(self.config.output_hidden_states if output_hidden_states is None
                                      else output_hidden_states),
            output_attentions=bool(self.config.output_attentions if output_attentions is None
                                   else output_attentions), **static)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return outputs if return_dict else outputs.to_tuple()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype=jnp.float32, param_dtype=None,
                        config: Optional[BlenderbotSmallConfig] = None, _do_init: bool = True):
        """Load an HF directory (ours or transformers'), a weights file's directory, or a hub id.

        `dtype` is the compute dtype (bf16 works); params are stored in `param_dtype`, by default in the
        checkpoint's own dtype (float32 for the released ones, as transformers keeps it). With `_do_init=False`
        (transformers' flag) it returns `(model, params)`, the model holding none.
        """
        directory = resolve_directory(path_or_hub_id)
        if config is None:
            config_path = os.path.join(directory, "config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"{directory} has no config.json")
            config = BlenderbotSmallConfig.from_json_file(config_path)
        expected = _param_shapes(config, cls.head)
        weights = find_weights_file(directory)
        state = load_state_dict(weights)
        try:
            params = hf_to_flax(state, config, cls.head, expected, dtype=param_dtype)
        except ValueError as err:
            raise UsageError(f"{weights}: {err}") from None
        model = cls(config, params if _do_init else None, dtype=dtype, param_dtype=param_dtype, _do_init=_do_init)
        model._loaded_from = directory
        if os.path.isfile(os.path.join(directory, "generation_config.json")):
            model._generation_config = GenerationConfig.from_pretrained(directory)
        return model if _do_init else (model, params)

    def save_pretrained(self, directory: str | os.PathLike, params: Optional[dict] = None) -> None:
        """Write `config.json`, `model.safetensors` (and `generation_config.json`) that transformers loads;
        the weights are `params` when given, else the model's."""
        directory = os.fspath(directory)
        self._config_to_save().save_pretrained(directory)
        generation_config = getattr(self, "generation_config", None)  # the classes that generate
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        params = self.params if params is None else params
        save_safetensors(flax_to_hf(jax.device_get(params), self.config, self.head), directory)

    def _config_to_save(self) -> BlenderbotSmallConfig:
        return self.config.replace(extra={**self.config.extra, "architectures": [self.hf_architecture]})

    def _rngs(self, train: bool, dropout_rng) -> dict:
        if not train:
            return {}
        if dropout_rng is None:
            raise UsageError("train=True needs an explicit dropout_rng (a jax.random key)")
        return {"dropout": dropout_rng}

    def _token_inputs(self, ids, embeds, mask, ids_name: str, mask_name: str, required: bool = True):
        """Validate one side's ids or embeddings and its mask; returns (ids, embeds, mask) arrays."""
        check.exactly_one(ids, embeds, ids_name, ids_name.replace("input_ids", "inputs_embeds"), required)
        if ids is not None:
            ids = check.as_token_array(ids, ids_name, self.config.vocab_size)
            shape = ids.shape
        elif embeds is not None:
            embeds = check.as_embeddings(embeds, self.config.d_model, ids_name.replace("input_ids", "inputs_embeds"))
            shape = embeds.shape[:2]
        else:
            return None, None, mask
        if shape[0] == 0:
            raise UsageError(f"{ids_name if ids is not None else ids_name.replace('input_ids', 'inputs_embeds')} "
                             f"has batch size 0: pass at least one sequence")
        if shape[1] == 0:
            raise UsageError(f"{ids_name} is empty (length 0)")
        check.check_length(shape[1], self.config.max_position_embeddings, ids_name)
        return ids, embeds, check.as_mask(mask, shape, mask_name)

    def _position_ids(self, position_ids, shape: tuple[int, ...], name: str):
        """[B, T] int32 positions below `max_position_embeddings`, or None (positions 0..T-1)."""
        if position_ids is None:
            return None
        ids = check.as_token_array(position_ids, name, self.config.max_position_embeddings)
        if tuple(ids.shape) != tuple(shape):
            raise UsageError(f"{name} has shape {tuple(ids.shape)}, but the sequence it places has {tuple(shape)}")
        return ids

    def _labels(self, labels, batch_shape: Optional[tuple[int, ...]]):
        if labels is None:
            return None
        labels = check.as_token_array(labels, "labels", self.config.vocab_size, allow_ignore_index=True)
        if batch_shape is not None and labels.shape != tuple(batch_shape):
            raise UsageError(f"labels have shape {labels.shape}, but the logits they score have {tuple(batch_shape)}")
        check.check_length(labels.shape[1], self.config.max_position_embeddings, "labels")
        return labels


class _Seq2Seq(_PretrainedModel):
    """Shared `__call__`, `encode`, `decode` and `init_cache` of the two encoder-decoder classes."""

    def _encoder_outputs(self, encoder_outputs, attention_mask):
        if isinstance(encoder_outputs, EncoderOutput):
            hidden = encoder_outputs.last_hidden_state
        elif isinstance(encoder_outputs, (tuple, list, ModelOutput)):
            hidden = encoder_outputs[0]
        else:
            hidden = getattr(encoder_outputs, "last_hidden_state", encoder_outputs)
        hidden = check.as_embeddings(hidden, self.config.d_model, "encoder_outputs.last_hidden_state")
        if hidden.shape[0] == 0:
            raise UsageError("encoder_outputs.last_hidden_state has batch size 0: pass at least one sequence")
        mask = check.as_mask(attention_mask, hidden.shape[:2], "attention_mask")
        return EncoderOutput(last_hidden_state=jnp.asarray(hidden)), mask

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                 output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                 params=None, train: bool = False, dropout_rng=None, position_ids=None, decoder_position_ids=None,
                 return_dict: Optional[bool] = None):
        """The full forward: `Seq2SeqLMOutput` (logits, and the loss with `labels`) for the LM head,
        `Seq2SeqModelOutput` for the bare model, or their `to_tuple()` with `return_dict=False`.

        As transformers' PyTorch class, the reference: decoder inputs are `decoder_input_ids` (or embeddings), or
        with `labels` and the LM head, `labels` shifted right. transformers' Flax class instead shifts
        `input_ids` when both are missing; pass `decoder_input_ids=shift_tokens_right(input_ids, ...)` for that.
        """
        if encoder_outputs is not None:
            if input_ids is not None or inputs_embeds is not None:
                raise UsageError("pass encoder_outputs or input_ids/inputs_embeds, not both")
            encoder_outputs, attention_mask = self._encoder_outputs(encoder_outputs, attention_mask)
            shape = encoder_outputs.last_hidden_state.shape[:2]
        else:
            input_ids, inputs_embeds, attention_mask = self._token_inputs(
                input_ids, inputs_embeds, attention_mask, "input_ids", "attention_mask")
            shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        needs_decoder = labels is None or self.head != "seq2seq_lm"
        decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask = self._token_inputs(
            decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask, "decoder_input_ids",
            "decoder_attention_mask", required=needs_decoder)
        decoder = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        if decoder is not None and decoder.shape[0] != shape[0]:
            raise UsageError(f"decoder inputs have batch size {decoder.shape[0]}, encoder inputs {shape[0]}")
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                      inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                      position_ids=self._position_ids(position_ids, shape, "position_ids"))
        if self.head == "seq2seq_lm":
            labels = self._labels(labels, None if decoder is None else decoder.shape[:2])
            if labels is not None and labels.shape[0] != shape[0]:
                raise UsageError(f"labels have batch size {labels.shape[0]}, inputs {shape[0]}")
            inputs["labels"] = labels
        elif labels is not None:
            raise UsageError("BlenderbotSmallModel has no LM head and takes no labels; "
                             "use BlenderbotSmallForConditionalGeneration")
        decoder_shape = decoder.shape[:2] if decoder is not None else labels.shape
        inputs["decoder_position_ids"] = self._position_ids(decoder_position_ids, decoder_shape,
                                                            "decoder_position_ids")
        return self._run(params, inputs, train, dropout_rng, return_dict, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions)

    def encode(self, input_ids=None, attention_mask=None, position_ids=None,
               output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
               return_dict: Optional[bool] = None, train: bool = False, params=None, dropout_rng=None,
               inputs_embeds=None):
        """The encoder alone (transformers' Flax `encode`): an `EncoderOutput` with `last_hidden_state`
        [B, S, D], which `decode`, `init_cache` and `__call__(encoder_outputs=...)` take."""
        input_ids, inputs_embeds, attention_mask = self._token_inputs(
            input_ids, inputs_embeds, attention_mask, "input_ids", "attention_mask")
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                      position_ids=self._position_ids(position_ids, shape, "position_ids"))
        return self._run(params, inputs, train, dropout_rng, return_dict, method="encode",
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def init_cache(self, batch_size: int, max_length: int, encoder_outputs=None) -> KVCache:
        """An empty self-attention cache of `max_length` positions for `decode` (transformers' Flax
        `init_cache`; `encoder_outputs` is accepted for its signature: cross-attention is computed by `decode`)."""
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UsageError(f"init_cache: {name} must be a positive int, got {value!r}")
        check.check_length(int(max_length), self.config.max_position_embeddings, "init_cache max_length")
        return KVCache.empty(self.config, int(batch_size), int(max_length), self.dtype)

    def decode(self, decoder_input_ids, encoder_outputs, encoder_attention_mask=None,
               decoder_attention_mask=None, decoder_position_ids=None, past_key_values: Optional[KVCache] = None,
               output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
               return_dict: Optional[bool] = None, train: bool = False, params=None, dropout_rng=None):
        """The decoder over `decoder_input_ids` [B, T] given `encoder_outputs` (transformers' Flax `decode`).

        Without `past_key_values` the T tokens attend causally among themselves (`decoder_attention_mask`
        [B, T]). With a cache from `init_cache` (or a previous `decode`), they are written at its index and
        attend to everything before it; `decoder_attention_mask` then covers the whole cache, [B, max_length],
        and positions continue from the cache's index unless `decoder_position_ids` [B, T] say otherwise.
        Returns `CausalLMOutput` (logits) for the LM head, `DecoderOutputWithPast` for the bare model, each
        with the updated cache as `past_key_values`.
        """
        encoder, encoder_attention_mask = self._encoder_outputs(encoder_outputs, encoder_attention_mask)
        decoder_input_ids = check.as_token_array(decoder_input_ids, "decoder_input_ids", self.config.vocab_size)
        batch, length = decoder_input_ids.shape
        if batch != encoder.last_hidden_state.shape[0]:
            raise UsageError(f"decoder_input_ids have batch size {batch}, encoder_outputs "
                             f"{encoder.last_hidden_state.shape[0]}")
        mask_shape = (batch, length)
        if past_key_values is not None:
            mask_shape = (batch, self._check_cache(past_key_values, batch, length).max_length)
        inputs = dict(decoder_input_ids=decoder_input_ids, encoder_hidden_states=encoder.last_hidden_state,
                      encoder_attention_mask=encoder_attention_mask,
                      decoder_attention_mask=check.as_mask(decoder_attention_mask, mask_shape, "decoder_attention_mask"),
                      cache=past_key_values,
                      position_ids=self._position_ids(decoder_position_ids, (batch, length), "decoder_position_ids"))
        return self._run(params, inputs, train, dropout_rng, return_dict, method=_decode_with_cache,
                         output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def _check_cache(self, cache, batch: int, length: int) -> KVCache:
        if not isinstance(cache, KVCache):
            raise UsageTypeError(
                f"past_key_values must be the KVCache of init_cache or decode, got {type(cache).__name__}")
        if cache.rows != batch or cache.layers != self.config.decoder_layers:
            raise UsageError(f"past_key_values holds {cache.rows} rows of {cache.layers} layers; decoder_input_ids "
                             f"have {batch} rows and the model {self.config.decoder_layers} layers")
        if not check.is_traced(cache.index) and int(cache.index) + length > cache.max_length:
            raise UsageError(f"past_key_values holds {int(cache.index)} of {cache.max_length} positions: "
                             f"{length} more do not fit; make it with init_cache(batch_size, max_length) larger")
        return cache


def _decode_with_cache(module, decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                       decoder_attention_mask, cache, position_ids, deterministic, output_hidden_states,
                       output_attentions):
    """The decode step of `_Seq2Seq.decode`, applied as a method of the Flax module."""
    out = module.decode(decoder_input_ids, encoder_hidden_states, encoder_attention_mask, decoder_attention_mask,
                        None, cache, deterministic, output_hidden_states, output_attentions, position_ids)
    hidden = out.last_hidden_state
    if cache is not None:  # `decode` checks a concrete index; a traced one past the end would clamp the write
        hidden = jnp.where(cache.index + decoder_input_ids.shape[1] <= cache.max_length, hidden, jnp.nan)
    common = dict(past_key_values=out.cache, hidden_states=out.hidden_states, attentions=out.attentions,
                  cross_attentions=out.cross_attentions)
    if module.lm_head:
        return CausalLMOutput(logits=module.logits(hidden), **common)
    return DecoderOutputWithPast(last_hidden_state=hidden, **common)


class BlenderbotSmallModel(_Seq2Seq):
    """The bare encoder-decoder: `last_hidden_state`, `encoder_last_hidden_state` and optional outputs."""

    head = "seq2seq"
    hf_architecture = "BlenderbotSmallModel"
    module_class = BlenderbotSmallSeq2Seq


class BlenderbotSmallForConditionalGeneration(GenerationMixin, _Seq2Seq):
    """Encoder-decoder with the tied LM head plus `final_logits_bias`: `logits` and `loss`."""

    head = "seq2seq_lm"
    hf_architecture = "BlenderbotSmallForConditionalGeneration"
    module_class = BlenderbotSmallSeq2Seq


class BlenderbotSmallForCausalLM(GenerationMixin, _PretrainedModel):
    """The decoder alone with the tied LM head; cross-attention when `encoder_hidden_states` are given."""

    head = "decoder_only"
    hf_architecture = "BlenderbotSmallForCausalLM"
    module_class = BlenderbotSmallDecoderOnly

    def _config_to_save(self) -> BlenderbotSmallConfig:
        return super()._config_to_save().replace(is_decoder=True, is_encoder_decoder=False)

    def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, inputs_embeds=None, labels=None, logits_to_keep: int = 0,
                 output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                 params=None, train: bool = False, dropout_rng=None, return_dict: Optional[bool] = None):
        """The full forward: `CausalLMOutput` (or its `to_tuple()` with `return_dict=False`)."""
        input_ids, inputs_embeds, attention_mask = self._token_inputs(
            input_ids, inputs_embeds, attention_mask, "input_ids", "attention_mask")
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        encoder_hidden_states, encoder_attention_mask = check.encoder_states(
            encoder_hidden_states, encoder_attention_mask, shape[0], self.config.d_model)
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise UsageError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        kept = shape[1] if logits_to_keep == 0 else min(logits_to_keep, shape[1])
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                      inputs_embeds=inputs_embeds, labels=self._labels(labels, (shape[0], kept)))
        return self._run(params, inputs, train, dropout_rng, return_dict, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, logits_to_keep=logits_to_keep)


# The Flax module class of each model class under transformers' names (`Model.module_class` says the same).
BlenderbotSmallModule = BlenderbotSmallForConditionalGenerationModule = BlenderbotSmallSeq2Seq
BlenderbotSmallForCausalLMModule = BlenderbotSmallDecoderOnly


@functools.lru_cache(maxsize=16)
def _param_shapes(config: BlenderbotSmallConfig, head: Head) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every param of a head's module, kept in the process and on disk (tracing the module's
    init takes most of a second). Read only: the same dict is returned to every caller."""
    return startup_cache.remember("param_shapes", (config.identity(), head),
                                  lambda: param_shapes(build_module(config, head)))


def _cast_floating(params: dict, dtype, mask: Optional[dict]) -> dict:
    """`params` with the floating leaves that `mask` selects (all without one) cast to `dtype`."""
    def cast(leaf, chosen=True):
        return leaf.astype(dtype) if chosen and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    if mask is None:
        return jax.tree_util.tree_map(cast, params)
    flat, chosen = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    return traverse_util.unflatten_dict({path: cast(leaf, chosen.get(path, False)) for path, leaf in flat.items()})


def param_count(params: Any) -> int:
    """Number of scalars in a param pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
