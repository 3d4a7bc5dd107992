"""`generate` for the encoder-decoder and decoder-only classes: config resolution, validation, bucketing, one jit."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import cpu_kernels, decoding
from . import logits_processors as lp
from . import validation as check
from .cache import KVCache
from .cpu_kernels import PackedColumns
from .generation_config import UNSUPPORTED, GenerationConfig

Array = jax.Array

MIN_BUCKET = 16  # smallest source/prompt length bucket; the decoding buffer grows in steps of this

# XLA's CPU backend hands matmuls to YNNPACK by default; its Eigen path is faster for the few-row
# products of decoding once the LM head runs over the transposed table (1.2x-1.6x per step on the 90M
# shape, greedy and beam, measured on a 2-core AVX-512 machine)
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_trace_count = 0
_transposed = jax.jit(jnp.transpose)


def trace_count() -> int:
    """How many times a generation program has been traced (each trace is one compilation)."""
    return _trace_count


@struct.dataclass
class GenerateOutput:
    """What `generate` returns with `return_dict_in_generate=True`."""

    sequences: Array  # [rows, T] int32: the prompt (or decoder start token), generated tokens, padding
    scores: Optional[tuple] = None  # per step, [rows searched, V] float32 processed scores (output_scores)
    sequences_scores: Optional[Array] = None  # beam search: [rows] length-penalised score (output_scores)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shapes of one generation program besides the input shapes."""

    buffer_length: int  # decoding buffer and cache length, >= max_length
    expand: int  # rows per batch element: num_beams, or num_return_sequences when sampling
    prompt_bucket: int  # decoder-only: the (bucketed) prompt length prefilled into the cache; 0 otherwise


def bucket_batch(size: int) -> int:
    """Batch sizes are padded to a power of two."""
    return 1 << max(size - 1, 0).bit_length()


def bucket_length(length: int, cap: int) -> int:
    """Source/prompt lengths are padded to a power of two (at least MIN_BUCKET), at most `cap`."""
    return max(length, min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), cap))


def buffer_length(max_length: int, cap: int) -> int:
    """The decoding buffer: `max_length` rounded up to a multiple of MIN_BUCKET, at most `cap`."""
    return max(max_length, min(-(-max_length // MIN_BUCKET) * MIN_BUCKET, cap))


def _neutral(value) -> bool:
    """Whether an unsupported option's value leaves generation unchanged (transformers' defaults)."""
    return value is None or value is False or (isinstance(value, (int, float)) and value in (0, 1)) \
        or (isinstance(value, (list, dict)) and not value)


def _token_ids(value, name: str, vocab_size: int) -> tuple[int, ...]:
    """An id or list of ids -> tuple, each checked to lie in the vocabulary."""
    if value is None:
        return ()
    ids = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
            raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {value!r}")
    return tuple(int(t) for t in ids)


def _check_int(cfg: GenerationConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate(cfg: GenerationConfig, vocab_size: int) -> None:
    """Raise a clear error for settings transformers would reject (or that make no sense)."""
    for name, minimum in (("num_beams", 1), ("num_return_sequences", 1), ("max_length", 1), ("min_length", 0),
                          ("top_k", 0), ("no_repeat_ngram_size", 0), ("encoder_no_repeat_ngram_size", 0)):
        _check_int(cfg, name, minimum)
    if cfg.max_new_tokens is not None:
        _check_int(cfg, "max_new_tokens", 1)
    if cfg.min_new_tokens is not None:
        _check_int(cfg, "min_new_tokens", 0)
    if not isinstance(cfg.do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {cfg.do_sample!r}")
    if not (isinstance(cfg.early_stopping, bool) or cfg.early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}")
    greedy = cfg.num_beams == 1 and not cfg.do_sample
    if greedy and cfg.num_return_sequences > 1:
        raise ValueError(f"greedy search returns one sequence per input; num_return_sequences="
                         f"{cfg.num_return_sequences} needs num_beams > 1 or do_sample=True")
    if cfg.num_beams > 1 and cfg.num_return_sequences > cfg.num_beams:
        raise ValueError(f"num_return_sequences ({cfg.num_return_sequences}) must be at most num_beams "
                         f"({cfg.num_beams})")
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if cfg.temperature < 0 or (cfg.do_sample and cfg.temperature == 0):
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy search), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
    for name in ("eos_token_id", "forced_eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
                 "forced_bos_token_id"):
        _token_ids(getattr(cfg, name), name, vocab_size)
    if cfg.bad_words_ids is not None:
        words = cfg.bad_words_ids
        if not isinstance(words, (list, tuple)) or not words or any(
                not isinstance(w, (list, tuple)) or not w for w in words):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of ids, got {words!r}")
        for word in words:
            _token_ids(word, "bad_words_ids", vocab_size)
    for key, value in cfg.extra.items():
        if key in UNSUPPORTED and not _neutral(value):
            raise ValueError(f"generation option {key}={value!r} is not supported by this implementation")


def _program(module, seq2seq: bool, params, lm_kernel: Union[None, Array, PackedColumns], packed: Optional[dict],
             batch: dict, search: decoding.SearchInputs, spec: decoding.SearchSpec, layout: Layout):
    """Encode, build the cache, run the decoding loop. Traced once per static configuration and shapes.

    lm_kernel, packed: the weights laid out for decoding (see `GenerationMixin._decoding_weights`); the
    packed Dense kernels serve the decoding steps only.
    """
    global _trace_count
    _trace_count += 1
    variables = {"params": params}
    step_variables = variables if packed is None else {"params": params, cpu_kernels.PACKED: packed}
    expand, length = layout.expand, layout.buffer_length
    sequences = batch["sequences"]  # [B, T] the prompt, fill beyond it
    rows = sequences.shape[0] * expand

    if seq2seq:
        encoded = module.apply(variables, batch["input_ids"], batch["attention_mask"], method="encode")
        encoder_states, encoder_mask = encoded.last_hidden_state, batch["attention_mask"]
    else:
        encoder_states, encoder_mask = batch.get("encoder_hidden_states"), batch.get("encoder_attention_mask")
    cache = KVCache.empty(module.config, rows, length, module.dtype)
    if encoder_states is not None:  # cross-attention keys/values projected once per batch element, and
        # kept once: the `expand` rows (beams or samples) of a batch element share them
        cross = module.apply(variables, encoder_states.shape[0], 1, encoder_states, encoder_mask,
                             method="init_cache")
        cache = cache.replace(cross_key=cross.cross_key, cross_value=cross.cross_value,
                              encoder_mask=cross.encoder_mask)
    sequences = jnp.repeat(sequences, expand, axis=0)  # [N, T]

    key_mask = None
    if seq2seq:
        def step_fn(tokens, cache):
            out = module.apply(step_variables, decoder_input_ids=tokens, cache=cache, method="decode")
            return module.apply(variables, out.last_hidden_state, lm_kernel, method="logits")[:, -1], out.cache
    else:
        key_mask = jnp.repeat(batch["key_mask"], expand, axis=0)  # [N, T]: the prompt's mask, then ones

        def step_fn(tokens, cache):
            out = module.apply(step_variables, input_ids=tokens, attention_mask=key_mask, cache=cache,
                               method="decode")
            return module.apply(variables, out.last_hidden_state, lm_kernel, method="logits")[:, -1], out.cache

        prompt = jnp.maximum(sequences[:, :layout.prompt_bucket], 0)  # the fill beyond the prompt may be -1
        cache = module.apply(variables, input_ids=prompt, attention_mask=key_mask, cache=cache,
                             method="decode").cache
        cache = cache.replace(index=search.prompt_length - 1)  # the loop feeds the last prompt token

    vocab = module.config.vocab_size
    if spec.strategy == "beam":
        def reorder_fn(cache, source_rows, cur_len):
            return cache.reorder(source_rows)

        state = decoding.beam_search(sequences, search, cache.tracking_origins(), step_fn, reorder_fn, spec, vocab)
        return dict(sequences=state.sequences, lengths=state.lengths, scores=state.scores,
                    cur_len=state.cur_len, step_scores=state.step_scores)
    state = decoding.sample(sequences, search, cache, step_fn, spec, vocab)
    return dict(sequences=state.sequences, cur_len=state.cur_len, step_scores=state.scores)


class GenerationMixin:
    """`generate` for a model class with `config`, `params`, `module` and `head`."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's generation defaults: its `generation_config.json`, else derived from `config.json`."""
        if getattr(self, "_generation_config", None) is None:
            self._generation_config = GenerationConfig.from_model_config(self.config)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self._generation_config = value

    def _generation_program(self):
        if getattr(self, "_generate_jit", None) is None:
            fn = partial(_program, self.module, self.head != "decoder_only")
            options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
            self._generate_jit = jax.jit(fn, static_argnames=("spec", "layout"), compiler_options=options)
        return self._generate_jit

    def _decoding_weights(self, params, rows: int) -> tuple:
        """Copies of weights laid out for decoding `rows` rows: (the LM head's table, packed Dense kernels).

        One row: (None, None), the params as they are (XLA's one-row matmul reads them at full speed).
        Several rows, with float32 compute where the CPU kernel runs (`cpu_kernels`): the embedding
        transposed and every decoder Dense kernel, packed for it; elsewhere the embedding transposed to
        [D, V], over which XLA's CPU matmul is several times faster than over [V, D], and no packed
        kernels. The copies take about 0.2 s and 230 MB for the 90M shape, so they are kept for later
        calls with the same params.
        """
        if rows == 1:
            return None, None
        packed = self.module.dtype == jnp.float32 and cpu_kernels.available()
        sources = jax.tree_util.tree_leaves(params)
        kept = getattr(self, "_kept_decoding_weights", None)
        if kept is None or kept[1] != packed or len(kept[0]) != len(sources) or any(
                old is not new for old, new in zip(kept[0], sources)):
            embedding = params["shared"]["embedding"]
            if packed:
                weights = (cpu_kernels.pack_transposed(embedding),
                           cpu_kernels.pack_dense_kernels({"decoder": params["decoder"]}))
            else:
                weights = (_transposed(embedding), None)
            self._kept_decoding_weights = (sources, packed, weights)
        return self._kept_decoding_weights[2]

    def _resolve_generation_config(self, generation_config: Optional[GenerationConfig],
                                   kwargs: dict) -> tuple[GenerationConfig, bool]:
        """Model defaults < `generation_config` < kwargs < (for what is still unset) global defaults."""
        names = set(GenerationConfig.field_names())
        for key, value in kwargs.items():
            if key in UNSUPPORTED:
                if not _neutral(value):
                    raise ValueError(f"generation option {key}={value!r} is not supported by this implementation")
            elif key not in names:
                raise TypeError(f"generate() got an unexpected keyword argument {key!r}")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
        base = self.generation_config
        if generation_config is not None:
            base = base.update(generation_config)
        given = {k: v for k, v in kwargs.items() if k in names}  # an explicit None unsets, as in transformers
        cfg = base.replace(**given)
        default_max_length = cfg.max_length is None
        return cfg.with_defaults(), default_max_length

    def generate(self, input_ids=None, attention_mask=None, generation_config: Optional[GenerationConfig] = None, *,
                 prng_key: Optional[Array] = None, params=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, **kwargs):
        """Generate token ids as transformers' `generate` does (greedy, sampling or beam search), jit-compiled.

        Settings come from `generation_config` and keyword arguments (HF names), over the model's
        `generation_config`. Returns the sequences [rows, T] (starting with the decoder start token for
        the encoder-decoder, with the prompt for the decoder-only model; padded like transformers),
        or a `GenerateOutput` with `return_dict_in_generate=True`. Sampling draws from `prng_key`
        (default `PRNGKey(0)`), so a fixed key reproduces the output.
        """
        cfg, default_max_length = self._resolve_generation_config(generation_config, kwargs)
        validate(cfg, self.config.vocab_size)
        seq2seq = self.head != "decoder_only"
        max_positions = self.config.max_position_embeddings

        # inputs
        if seq2seq:
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise TypeError("encoder_hidden_states are for BlenderbotSmallForCausalLM; pass input_ids")
            if input_ids is None:
                raise ValueError("generate() needs input_ids for the encoder")
        elif input_ids is None:
            if cfg.bos_token_id is None:
                raise ValueError("generate() without input_ids starts from bos_token_id, which is not set")
            batch = 1 if encoder_hidden_states is None else np.shape(encoder_hidden_states)[0]
            input_ids = np.full((batch, 1), cfg.bos_token_id, np.int32)
        ids = check.as_token_array(input_ids, "input_ids", self.config.vocab_size)
        mask = check.as_mask(attention_mask, ids.shape, "attention_mask")
        if mask is None:
            mask = np.ones(ids.shape, np.int32)
        check.check_length(ids.shape[1], max_positions, "input_ids")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty (length 0)")
        encoder_hidden_states, encoder_attention_mask = check.encoder_states(
            encoder_hidden_states, encoder_attention_mask, ids.shape[0], self.config.d_model)

        # special tokens, as transformers' _prepare_special_tokens
        eos = _token_ids(cfg.eos_token_id, "eos_token_id", self.config.vocab_size)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
        fill = (pad if pad else eos[0]) if eos else -1  # transformers' beam-search fill value
        if seq2seq:
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
            if start is None:
                raise ValueError("decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation")
            prompt_length = 1
        else:
            prompt_length = ids.shape[1]

        # lengths, as transformers' _prepare_generated_length
        max_length = cfg.max_length
        if cfg.max_new_tokens is not None:
            max_length = cfg.max_new_tokens + prompt_length
        elif default_max_length:
            max_length = min(cfg.max_length + prompt_length, max_positions)
        min_length = cfg.min_length if cfg.min_new_tokens is None else cfg.min_new_tokens + prompt_length
        if max_length > max_positions:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings={max_positions}: the "
                             "decoder has no positions beyond it")
        if prompt_length >= max_length:
            name = "the decoder start token" if seq2seq else "input_ids"
            raise ValueError(f"{name} has length {prompt_length}, but max_length is {max_length}; "
                             "increase max_length or set max_new_tokens")

        beam = cfg.num_beams > 1
        expand = cfg.num_beams if beam else cfg.num_return_sequences
        rows_out = ids.shape[0] * (cfg.num_return_sequences if beam or cfg.do_sample else 1)
        if ids.shape[0] == 0:  # nothing to compile or run
            prompt = np.zeros((0, prompt_length), np.int32)
            return GenerateOutput(sequences=jnp.asarray(prompt)) if cfg.return_dict_in_generate \
                else jnp.asarray(prompt)

        spec = decoding.SearchSpec(
            strategy="beam" if beam else ("sample" if cfg.do_sample else "greedy"),
            processors=lp.ProcessorSpec(
                eos_token_ids=eos,
                repetition_penalty=cfg.repetition_penalty != 1.0,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                encoder_no_repeat_ngram_size=cfg.encoder_no_repeat_ngram_size,
                bad_words_ids=tuple(tuple(int(t) for t in w) for w in (cfg.bad_words_ids or ())
                                    if not (len(w) == 1 and w[0] in eos)),
                forced_bos_token_id=cfg.forced_bos_token_id,
                forced_eos_token_ids=_token_ids(cfg.forced_eos_token_id, "forced_eos_token_id",
                                                self.config.vocab_size),
                temperature=cfg.do_sample and cfg.temperature != 1.0,
                top_k=cfg.top_k if cfg.do_sample else 0,
                top_p=cfg.do_sample and cfg.top_p < 1.0,
                min_tokens_to_keep=len(eos) + 1 if beam else 1),
            eos_token_ids=eos, pad_token_id=pad if pad is not None else 0, num_beams=cfg.num_beams,
            do_sample=cfg.do_sample, early_stopping=cfg.early_stopping,
            output_scores=bool(cfg.output_scores and cfg.return_dict_in_generate))

        # bucketing: pad the batch to a power of two and the source/prompt to its length bucket
        batch, src_len = ids.shape
        batch_bucket = bucket_batch(batch)
        length = buffer_length(max_length, max_positions)
        src_bucket = bucket_length(src_len, max_positions)
        sequences = np.full((batch_bucket, length), fill, np.int32)
        inputs = dict()
        if seq2seq:
            sequences[:, 0] = start
            input_ids = np.full((batch_bucket, src_bucket), pad if pad is not None else 0, np.int32)
            input_ids[:batch, :src_len] = ids
            input_mask = np.zeros((batch_bucket, src_bucket), np.int32)
            input_mask[:batch, :src_len] = mask
            inputs.update(input_ids=input_ids, attention_mask=input_mask)
            prompt_bucket = 0
            encoder_ids = input_ids if cfg.encoder_no_repeat_ngram_size else input_ids[:, :0]
        else:
            prompt_bucket = min(src_bucket, length)
            sequences[:batch, :src_len] = ids
            key_mask = np.ones((batch_bucket, length), np.int32)
            key_mask[:batch, :src_len] = mask
            inputs.update(key_mask=key_mask)
            if encoder_hidden_states is not None:
                states = np.zeros((batch_bucket,) + encoder_hidden_states.shape[1:], encoder_hidden_states.dtype)
                states[:batch] = encoder_hidden_states
                enc_mask = np.zeros((batch_bucket, states.shape[1]), np.int32)
                enc_mask[:batch] = 1 if encoder_attention_mask is None else encoder_attention_mask
                inputs.update(encoder_hidden_states=states, encoder_attention_mask=enc_mask)
            encoder_ids = sequences[:, :src_bucket] if cfg.encoder_no_repeat_ngram_size else sequences[:, :0]
        inputs["sequences"] = sequences
        valid = np.arange(batch_bucket) < batch
        prompt_ignore = np.zeros(batch_bucket * expand, np.int32)
        if not seq2seq and cfg.repetition_penalty != 1.0:
            prompt_ignore = np.repeat(np.pad((mask != 0).argmax(axis=1), (0, batch_bucket - batch)), expand)
        search = decoding.SearchInputs(
            processors=lp.ProcessorInputs(
                max_length=np.int32(max_length), min_length=np.int32(min_length),
                repetition_penalty=np.float32(cfg.repetition_penalty), temperature=np.float32(cfg.temperature),
                top_p=np.float32(cfg.top_p), prompt_ignore=prompt_ignore.astype(np.int32),
                encoder_ids=encoder_ids, encoder_length=np.int32(src_len)),
            prompt_length=np.int32(prompt_length), max_length=np.int32(max_length),
            length_denominators=decoding.length_denominators(cfg.length_penalty, length + 1),
            length_penalty=np.float32(cfg.length_penalty), valid=valid,
            rng=jax.random.PRNGKey(0) if prng_key is None else prng_key)
        layout = Layout(buffer_length=length, expand=expand, prompt_bucket=prompt_bucket)
        params = self.params if params is None else params
        lm_kernel, packed = self._decoding_weights(params, batch_bucket * expand)
        out = self._generation_program()(params, lm_kernel, packed, inputs, search, spec=spec, layout=layout)
        return self._finish(out, spec, cfg, batch, prompt_length, rows_out)

    def _finish(self, out: dict, spec: decoding.SearchSpec, cfg: GenerationConfig, batch: int,
                prompt_length: int, rows_out: int):
        """Crop and un-bucket the program's outputs as transformers shapes them."""
        steps = int(out["cur_len"]) - prompt_length
        sequences_scores = None
        if spec.strategy == "beam":
            keep = cfg.num_return_sequences
            sequences = np.asarray(out["sequences"])[:batch, :keep].reshape(rows_out, -1)
            lengths = np.asarray(out["lengths"])[:batch, :keep]
            sequences = sequences[:, :prompt_length + int(lengths.max())]
            sequences_scores = jnp.asarray(np.asarray(out["scores"])[:batch, :keep].reshape(-1))
            rows_searched = batch * spec.num_beams
        else:
            sequences = np.asarray(out["sequences"])[:rows_out, :prompt_length + steps]
            rows_searched = rows_out
        sequences = jnp.asarray(sequences)
        if not cfg.return_dict_in_generate:
            return sequences
        scores = None
        if spec.output_scores:
            step_scores = np.asarray(out["step_scores"])
            scores = tuple(jnp.asarray(step_scores[i, :rows_searched]) for i in range(steps))
        return GenerateOutput(sequences=sequences, scores=scores,
                              sequences_scores=sequences_scores if spec.output_scores else None)
