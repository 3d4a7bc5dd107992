"""The user-facing classes: HF-like `from_pretrained` / `save_pretrained` / `__call__` over the Flax modules."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax import startup_cache
from bbsmall_jax.nn import validation as check
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.checkpoint.names import flax_to_hf, hf_to_flax
from bbsmall_jax.generation.generate import GenerationMixin
from bbsmall_jax.generation.config import GenerationConfig
from bbsmall_jax.checkpoint.files import find_weights_file, load_state_dict, save_safetensors
from bbsmall_jax.checkpoint.hub import resolve_directory
from bbsmall_jax.nn.model import Head, build_module, init_params, param_shapes
from bbsmall_jax.nn.outputs import CausalLMOutput, EncoderOutput, Seq2SeqLMOutput, Seq2SeqModelOutput

class _PretrainedModel:
    """Config + params + Flax module; `module.apply({"params": params}, ...)` is the pure core."""

    head: Head
    hf_architecture: str

    def __init__(self, config: BlenderbotSmallConfig, params: Optional[dict] = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0):
        self.config = config
        self.dtype = dtype
        self.module = build_module(config, self.head, dtype, param_dtype)
        if params is None:
            params = init_params(self.module, jax.random.PRNGKey(seed))
        # ShapeDtypeStructs make an abstract model: its programs can be lowered and compiled, not run.
        self.params = jax.tree_util.tree_map(
            lambda p: p if isinstance(p, jax.ShapeDtypeStruct) else jnp.asarray(p, param_dtype), params)
        self._forward = jax.jit(self._apply, static_argnames=("deterministic", "output_hidden_states",
                                                               "output_attentions", "logits_to_keep"))

    def _apply(self, params, inputs: dict, rngs, **static):
        return self.module.apply({"params": params}, **inputs, rngs=rngs, **static)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
                        config: Optional[BlenderbotSmallConfig] = None):
        """Load an HF directory (ours or transformers'), a weights file's directory, or a hub id.

        `dtype` is the compute dtype (bf16 works); params are stored in `param_dtype`.
        """
        directory = resolve_directory(path_or_hub_id)
        if config is None:
            config_path = os.path.join(directory, "config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(f"{directory} has no config.json")
            config = BlenderbotSmallConfig.from_json_file(config_path)
        expected = startup_cache.remember(  # tracing the module's init takes most of a second
            "param_shapes", (json.dumps(config.to_dict(), sort_keys=True, default=str), cls.head),
            lambda: param_shapes(build_module(config, cls.head)))
        weights = find_weights_file(directory)
        state = load_state_dict(weights)
        try:
            params = hf_to_flax(state, config, cls.head, expected, dtype=param_dtype)
        except ValueError as err:
            raise ValueError(f"{weights}: {err}") from None
        model = cls(config, params, dtype=dtype, param_dtype=param_dtype)
        model._loaded_from = directory
        if os.path.isfile(os.path.join(directory, "generation_config.json")):
            model._generation_config = GenerationConfig.from_pretrained(directory)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json`, `model.safetensors` (and `generation_config.json`) that transformers loads."""
        directory = os.fspath(directory)
        self._config_to_save().save_pretrained(directory)
        generation_config = getattr(self, "generation_config", None)  # the classes that generate
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        save_safetensors(flax_to_hf(jax.device_get(self.params), self.config, self.head), directory)

    def _config_to_save(self) -> BlenderbotSmallConfig:
        return self.config.replace(extra={**self.config.extra, "architectures": [self.hf_architecture]})

    def _rngs(self, train: bool, dropout_rng) -> dict:
        if not train:
            return {}
        if dropout_rng is None:
            raise ValueError("train=True needs an explicit dropout_rng (a jax.random key)")
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
            raise ValueError(f"{ids_name if ids is not None else ids_name.replace('input_ids', 'inputs_embeds')} "
                             f"has batch size 0: pass at least one sequence")
        if shape[1] == 0:
            raise ValueError(f"{ids_name} is empty (length 0)")
        check.check_length(shape[1], self.config.max_position_embeddings, ids_name)
        return ids, embeds, check.as_mask(mask, shape, mask_name)

    def _labels(self, labels, batch_shape: Optional[tuple[int, ...]]):
        if labels is None:
            return None
        labels = check.as_token_array(labels, "labels", self.config.vocab_size, allow_ignore_index=True)
        if batch_shape is not None and labels.shape != tuple(batch_shape):
            raise ValueError(f"labels have shape {labels.shape}, but the logits they score have {tuple(batch_shape)}")
        check.check_length(labels.shape[1], self.config.max_position_embeddings, "labels")
        return labels


class _Seq2Seq(_PretrainedModel):
    """Shared `__call__` of the two encoder-decoder classes."""

    def _encoder_outputs(self, encoder_outputs, attention_mask):
        if isinstance(encoder_outputs, EncoderOutput):
            hidden = encoder_outputs.last_hidden_state
        elif isinstance(encoder_outputs, (tuple, list)):
            hidden = encoder_outputs[0]
        else:
            hidden = getattr(encoder_outputs, "last_hidden_state", encoder_outputs)
        hidden = check.as_embeddings(hidden, self.config.d_model, "encoder_outputs.last_hidden_state")
        if hidden.shape[0] == 0:
            raise ValueError("encoder_outputs.last_hidden_state has batch size 0: pass at least one sequence")
        mask = check.as_mask(attention_mask, hidden.shape[:2], "attention_mask")
        return EncoderOutput(last_hidden_state=jnp.asarray(hidden)), mask

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                 output_hidden_states: bool = False, output_attentions: bool = False, params=None,
                 train: bool = False, dropout_rng=None):
        if encoder_outputs is not None:
            if input_ids is not None or inputs_embeds is not None:
                raise ValueError("pass encoder_outputs or input_ids/inputs_embeds, not both")
            encoder_outputs, attention_mask = self._encoder_outputs(encoder_outputs, attention_mask)
            batch = encoder_outputs.last_hidden_state.shape[0]
        else:
            input_ids, inputs_embeds, attention_mask = self._token_inputs(
                input_ids, inputs_embeds, attention_mask, "input_ids", "attention_mask")
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        needs_decoder = labels is None or self.head != "seq2seq_lm"
        decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask = self._token_inputs(
            decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask, "decoder_input_ids",
            "decoder_attention_mask", required=needs_decoder)
        decoder = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        if decoder is not None and decoder.shape[0] != batch:
            raise ValueError(f"decoder inputs have batch size {decoder.shape[0]}, encoder inputs {batch}")
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                      inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds)
        if self.head == "seq2seq_lm":
            labels = self._labels(labels, None if decoder is None else decoder.shape[:2])
            if labels is not None and labels.shape[0] != batch:
                raise ValueError(f"labels have batch size {labels.shape[0]}, inputs {batch}")
            inputs["labels"] = labels
        elif labels is not None:
            raise ValueError("BlenderbotSmallModel has no LM head and takes no labels; "
                             "use BlenderbotSmallForConditionalGeneration")
        return self._forward(self.params if params is None else params, inputs, self._rngs(train, dropout_rng),
                             deterministic=not train, output_hidden_states=output_hidden_states,
                             output_attentions=output_attentions)


class BlenderbotSmallModel(_Seq2Seq):
    """The bare encoder-decoder: `last_hidden_state`, `encoder_last_hidden_state` and optional outputs."""

    head = "seq2seq"
    hf_architecture = "BlenderbotSmallModel"

    def __call__(self, *args, **kwargs) -> Seq2SeqModelOutput:  # noqa: D102 - documented on the class
        return super().__call__(*args, **kwargs)


class BlenderbotSmallForConditionalGeneration(GenerationMixin, _Seq2Seq):
    """Encoder-decoder with the tied LM head plus `final_logits_bias`: `logits` and `loss`."""

    head = "seq2seq_lm"
    hf_architecture = "BlenderbotSmallForConditionalGeneration"

    def __call__(self, *args, **kwargs) -> Seq2SeqLMOutput:  # noqa: D102 - documented on the class
        return super().__call__(*args, **kwargs)


class BlenderbotSmallForCausalLM(GenerationMixin, _PretrainedModel):
    """The decoder alone with the tied LM head; cross-attention when `encoder_hidden_states` are given."""

    head = "decoder_only"
    hf_architecture = "BlenderbotSmallForCausalLM"

    def _config_to_save(self) -> BlenderbotSmallConfig:
        return super()._config_to_save().replace(is_decoder=True, is_encoder_decoder=False)

    def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, inputs_embeds=None, labels=None, logits_to_keep: int = 0,
                 output_hidden_states: bool = False, output_attentions: bool = False, params=None,
                 train: bool = False, dropout_rng=None) -> CausalLMOutput:
        input_ids, inputs_embeds, attention_mask = self._token_inputs(
            input_ids, inputs_embeds, attention_mask, "input_ids", "attention_mask")
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        encoder_hidden_states, encoder_attention_mask = check.encoder_states(
            encoder_hidden_states, encoder_attention_mask, shape[0], self.config.d_model)
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        kept = shape[1] if logits_to_keep == 0 else min(logits_to_keep, shape[1])
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                      inputs_embeds=inputs_embeds, labels=self._labels(labels, (shape[0], kept)))
        return self._forward(self.params if params is None else params, inputs, self._rngs(train, dropout_rng),
                             deterministic=not train, output_hidden_states=output_hidden_states,
                             output_attentions=output_attentions, logits_to_keep=logits_to_keep)


def param_count(params: Any) -> int:
    """Number of scalars in a param pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
