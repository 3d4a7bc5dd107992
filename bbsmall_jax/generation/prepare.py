"""Host-side preparation of a `generate` call, a pure function of its arguments: checks, special tokens,
lengths, the search spec, and the bucketed numpy inputs of the jitted program."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.generation import search
from bbsmall_jax.generation.config import UNSUPPORTED, GenerationConfig
from bbsmall_jax.nn import validation as check
from bbsmall_jax.nn.config import BlenderbotSmallConfig

MIN_BUCKET = 16  # smallest source/prompt length bucket
# the decoding buffer grows in steps of this: every decoding step reads the whole self-attention cache, so its
# padding costs on every step (33 positions: 40, not 48), and a cache position is a leading axis, never a tile's
BUFFER_STEP = 8


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shapes of one generation program besides the input shapes."""

    buffer_length: int  # decoding buffer and cache length, >= max_length
    expand: int  # rows per batch element: num_beams, or num_return_sequences when sampling
    prompt_bucket: int  # decoder-only: the (bucketed) prompt length prefilled into the cache; 0 otherwise


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything the program and the finishing step need, on the host."""

    inputs: dict  # numpy arrays: sequences [B', T], and input_ids/attention_mask or key_mask (+ encoder states)
    search: search.SearchInputs
    spec: search.SearchSpec
    layout: Layout
    batch: int  # real batch elements (B' >= batch is the bucket)
    prompt_length: int
    rows_out: int  # sequences returned
    return_dict: bool

    @property
    def rows(self) -> int:
        """Rows the program decodes: the batch bucket times beams or samples."""
        return self.inputs["sequences"].shape[0] * self.layout.expand


def bucket_batch(size: int, multiple: int = 1) -> int:
    """Batch sizes are padded to a power of two, then up to a multiple of `multiple` (the devices)."""
    return -(-(1 << max(size - 1, 0).bit_length()) // multiple) * multiple


def bucket_length(length: int, cap: int) -> int:
    """Source/prompt lengths are padded to a power of two (at least MIN_BUCKET), at most `cap`."""
    return max(length, min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), cap))


def buffer_length(max_length: int, cap: int) -> int:
    """The decoding buffer: `max_length` rounded up to a multiple of BUFFER_STEP, at most `cap`."""
    return max(max_length, min(-(-max_length // BUFFER_STEP) * BUFFER_STEP, cap))


def default_key():
    """`jax.random.PRNGKey(0)`, without running a program under the default threefry keys (whose data is [0, 0])."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and not jax.config.jax_enable_custom_prng:
        return np.zeros(2, np.uint32)
    return jax.random.PRNGKey(0)


def neutral(value, option: Optional[str] = None) -> bool:
    """Whether an unsupported option's value leaves generation unchanged: None, or the option's transformers
    default in `UNSUPPORTED` (True is not 1 and 0.0 is not False here); without the option's name only None."""
    if value is None:
        return True
    default = UNSUPPORTED.get(option)
    if isinstance(default, bool):
        return value is default
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default
    return False


def token_ids(value, name: str, vocab_size: int) -> tuple[int, ...]:
    """An id or list of ids -> tuple, each checked to lie in the vocabulary."""
    if value is None:
        return ()
    ids = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
            raise UsageError(f"{name} must be token ids in [0, {vocab_size}), got {value!r}")
    return tuple(int(t) for t in ids)


def _check_int(cfg: GenerationConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
        raise UsageError(f"do_sample must be True or False, got {cfg.do_sample!r}")
    if not (isinstance(cfg.early_stopping, bool) or cfg.early_stopping == "never"):
        raise UsageError(f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}")
    greedy = cfg.num_beams == 1 and not cfg.do_sample
    if greedy and cfg.num_return_sequences > 1:
        raise UsageError(f"greedy search returns one sequence per input; num_return_sequences="
                         f"{cfg.num_return_sequences} needs num_beams > 1 or do_sample=True")
    if cfg.num_beams > 1 and cfg.num_return_sequences > cfg.num_beams:
        raise UsageError(f"num_return_sequences ({cfg.num_return_sequences}) must be at most num_beams "
                         f"({cfg.num_beams})")
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value!r}")
    if cfg.temperature < 0 or (cfg.do_sample and cfg.temperature == 0):
        raise UsageError(f"temperature must be > 0 (use do_sample=False for greedy search), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.repetition_penalty <= 0:
        raise UsageError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
    for name in ("eos_token_id", "forced_eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
                 "forced_bos_token_id"):
        token_ids(getattr(cfg, name), name, vocab_size)
    if cfg.bad_words_ids is not None:
        words = cfg.bad_words_ids
        if not isinstance(words, (list, tuple)) or not words or any(
                not isinstance(w, (list, tuple)) or not w for w in words):
            raise UsageError(f"bad_words_ids must be a non-empty list of non-empty lists of ids, got {words!r}")
        for word in words:
            token_ids(word, "bad_words_ids", vocab_size)
    for key, value in cfg.extra.items():
        if key in UNSUPPORTED and not neutral(value, key):
            raise UsageError(f"generation option {key}={value!r} is not supported by this implementation")


def _model_inputs(config: BlenderbotSmallConfig, seq2seq: bool, cfg: GenerationConfig, input_ids, attention_mask,
                  encoder_hidden_states, encoder_attention_mask):
    """Checked (ids [B, S], mask [B, S], encoder states, encoder mask) of a call."""
    if seq2seq:
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise UsageTypeError("encoder_hidden_states are for BlenderbotSmallForCausalLM; pass input_ids")
        if input_ids is None:
            raise UsageError("generate() needs input_ids for the encoder")
    elif input_ids is None:
        if cfg.bos_token_id is None:
            raise UsageError("generate() without input_ids starts from bos_token_id, which is not set")
        batch = 1 if encoder_hidden_states is None else np.shape(encoder_hidden_states)[0]
        input_ids = np.full((batch, 1), cfg.bos_token_id, np.int32)
    ids = check.as_token_array(input_ids, "input_ids", config.vocab_size)
    mask = check.as_mask(attention_mask, ids.shape, "attention_mask")
    if mask is None:
        mask = np.ones(ids.shape, np.int32)
    check.check_length(ids.shape[1], config.max_position_embeddings, "input_ids")
    if ids.shape[1] == 0:
        raise UsageError("input_ids is empty (length 0)")
    states, states_mask = check.encoder_states(encoder_hidden_states, encoder_attention_mask, ids.shape[0],
                                               config.d_model)
    return ids, mask, states, states_mask


def _lengths(cfg: GenerationConfig, default_max_length: bool, prompt_length: int, max_positions: int,
             seq2seq: bool) -> tuple[int, int]:
    """(max_length, min_length) as transformers' `_prepare_generated_length`."""
    max_length = cfg.max_length
    if cfg.max_new_tokens is not None:
        max_length = cfg.max_new_tokens + prompt_length
    elif default_max_length:
        max_length = min(cfg.max_length + prompt_length, max_positions)
    min_length = cfg.min_length if cfg.min_new_tokens is None else cfg.min_new_tokens + prompt_length
    if max_length > max_positions:
        raise UsageError(f"max_length {max_length} exceeds max_position_embeddings={max_positions}: the "
                         "decoder has no positions beyond it")
    if min_length > max_length:
        raise UsageError(f"min_length ({min_length}) is larger than max_length ({max_length}): no sequence can "
                         "satisfy both; lower min_length (the model's generation config may set it) or raise "
                         "max_length")
    if prompt_length >= max_length:
        name = "the decoder start token" if seq2seq else "input_ids"
        raise UsageError(f"{name} has length {prompt_length}, but max_length is {max_length}; "
                         "increase max_length or set max_new_tokens")
    return max_length, min_length


def _spec(cfg: GenerationConfig, eos: tuple[int, ...], pad: Optional[int], vocab_size: int) -> search.SearchSpec:
    """The static search settings."""
    beam = cfg.num_beams > 1
    return search.SearchSpec(
        strategy="beam" if beam else ("sample" if cfg.do_sample else "greedy"),
        processors=lp.ProcessorSpec(
            eos_token_ids=eos,
            repetition_penalty=cfg.repetition_penalty != 1.0,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
            encoder_no_repeat_ngram_size=cfg.encoder_no_repeat_ngram_size,
            bad_words_ids=tuple(tuple(int(t) for t in w) for w in (cfg.bad_words_ids or ())
                                if not (len(w) == 1 and w[0] in eos)),
            forced_bos_token_id=cfg.forced_bos_token_id,
            forced_eos_token_ids=token_ids(cfg.forced_eos_token_id, "forced_eos_token_id", vocab_size),
            temperature=cfg.do_sample and cfg.temperature != 1.0,
            top_k=cfg.top_k if cfg.do_sample else 0,
            top_p=cfg.do_sample and cfg.top_p < 1.0,
            min_tokens_to_keep=len(eos) + 1 if beam else 1),
        eos_token_ids=eos, pad_token_id=pad if pad is not None else 0, num_beams=cfg.num_beams,
        do_sample=cfg.do_sample, early_stopping=cfg.early_stopping,
        output_scores=bool(cfg.output_scores and cfg.return_dict_in_generate))


def prepare(config: BlenderbotSmallConfig, seq2seq: bool, cfg: GenerationConfig, default_max_length: bool,
            input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
            prng_key=None, batch_multiple: int = 1, traced: bool = False) -> Prepared:
    """Check a call and lay out its inputs, bucketed: the batch to a power of two (and a multiple of
    `batch_multiple`), the source/prompt to its length bucket, the decoding buffer to a multiple of BUFFER_STEP.
    `cfg` is resolved (`with_defaults`). With `traced` (a call inside the caller's own jit) the inputs are laid
    out as jax arrays; everything static is decided here all the same."""
    validate(cfg, config.vocab_size)
    max_positions = config.max_position_embeddings
    ids, mask, states, states_mask = _model_inputs(config, seq2seq, cfg, input_ids, attention_mask,
                                                   encoder_hidden_states, encoder_attention_mask)

    # special tokens, as transformers' _prepare_special_tokens
    eos = token_ids(cfg.eos_token_id, "eos_token_id", config.vocab_size)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
    fill = (pad if pad else eos[0]) if eos else -1  # transformers' beam-search fill value
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
    if seq2seq and start is None:
        raise UsageError("decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation")
    prompt_length = 1 if seq2seq else ids.shape[1]
    max_length, min_length = _lengths(cfg, default_max_length, prompt_length, max_positions, seq2seq)

    beam = cfg.num_beams > 1
    expand = cfg.num_beams if beam else cfg.num_return_sequences
    batch, src_len = ids.shape
    length = buffer_length(max_length, max_positions)
    # Inside the caller's own jit the inputs are padded by jax (the same buckets: sampling then draws as outside)
    xp = jnp if traced else np
    batch_bucket = bucket_batch(batch, batch_multiple)
    src_bucket = bucket_length(src_len, max_positions)

    def padded(array, columns: int, value):  # [batch, n] -> [batch_bucket, n + columns], `value` in the new places
        return xp.pad(xp.asarray(array), ((0, batch_bucket - batch), (0, columns)), constant_values=value)

    inputs = {}
    if seq2seq:
        sequences = xp.concatenate([xp.full((batch_bucket, 1), start, np.int32),
                                    xp.full((batch_bucket, length - 1), fill, np.int32)], axis=1)  # [B', T]
        inputs.update(input_ids=padded(ids, src_bucket - src_len, pad if pad is not None else 0),
                      attention_mask=padded(mask, src_bucket - src_len, 0))
        prompt_bucket = 0
        encoder_ids = inputs["input_ids"] if cfg.encoder_no_repeat_ngram_size else inputs["input_ids"][:, :0]
    else:
        prompt_bucket = min(src_bucket, length)
        sequences = padded(ids, length - src_len, fill)  # [B', T]
        inputs.update(key_mask=padded(mask, length - src_len, 1))
        if states is not None:
            states_mask = xp.ones(states.shape[:2], np.int32) if states_mask is None else states_mask
            inputs.update(encoder_hidden_states=xp.pad(states, ((0, batch_bucket - batch), (0, 0), (0, 0))),
                          encoder_attention_mask=padded(states_mask, 0, 0))
        encoder_ids = sequences[:, :src_bucket] if cfg.encoder_no_repeat_ngram_size else sequences[:, :0]
    inputs["sequences"] = sequences
    prompt_ignore = xp.zeros(batch_bucket * expand, np.int32)
    if not seq2seq and cfg.repetition_penalty != 1.0:
        prompt_ignore = xp.repeat(xp.pad((mask != 0).argmax(axis=1), (0, batch_bucket - batch)), expand)
    inputs_of_search = search.SearchInputs(
        processors=lp.ProcessorInputs(
            max_length=np.int32(max_length), min_length=np.int32(min_length),
            repetition_penalty=np.float32(cfg.repetition_penalty), temperature=np.float32(cfg.temperature),
            top_p=np.float32(cfg.top_p), prompt_ignore=prompt_ignore.astype(np.int32),
            encoder_ids=encoder_ids, encoder_length=np.int32(src_len)),
        prompt_length=np.int32(prompt_length), max_length=np.int32(max_length),
        length_denominators=search.length_denominators(cfg.length_penalty, length + 1),
        length_penalty=np.float32(cfg.length_penalty), valid=np.arange(batch_bucket) < batch,
        rng=default_key() if prng_key is None else prng_key)
    return Prepared(
        inputs=inputs, search=inputs_of_search, spec=_spec(cfg, eos, pad, config.vocab_size),
        layout=Layout(buffer_length=length, expand=expand, prompt_bucket=prompt_bucket),
        batch=batch, prompt_length=prompt_length,
        rows_out=batch * (cfg.num_return_sequences if beam or cfg.do_sample else 1),
        return_dict=bool(cfg.return_dict_in_generate))
