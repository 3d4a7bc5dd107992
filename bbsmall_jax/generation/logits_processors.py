"""Logits processors and sampling warpers as jittable functions, applied in transformers' order."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    """Which processors run (static: each one changes the program)."""

    eos_token_ids: tuple[int, ...] = ()
    repetition_penalty: bool = False
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_ids: tuple[int, ...] = ()
    # warpers, sampling only
    temperature: bool = False
    top_k: int = 0
    top_p: bool = False
    min_tokens_to_keep: int = 1


@struct.dataclass
class ProcessorInputs:
    """The processors' data (traced: changing a value does not recompile)."""

    max_length: Array  # [] int32
    min_length: Array  # [] int32, counts the prompt (the decoder start token for encoder-decoders)
    repetition_penalty: Array  # [] float32
    temperature: Array  # [] float32
    top_p: Array  # [] float32
    prompt_ignore: Array  # [N] int32, leading tokens of each row the repetition penalty skips
    encoder_ids: Array  # [B, S] int32, the ids encoder_no_repeat_ngram_size looks at ([B, 0] when unused)
    encoder_length: Array  # [] int32, how many leading encoder ids count


TokenMask = Callable[[Array, int], Array]  # (token ids [N, J], vocab size) -> [N, V] bool


def compared_token_mask(token_ids: Array, vocab: int) -> Array:
    """[N, V] bool, True at every id of token_ids [N, J] (ids >= vocab mark nothing): each id compared with
    the vocabulary's iota, reduced over J. Elementwise, so XLA fuses it into the pass over the scores that
    uses it, where a scatter would be a pass of its own (and a sort of its indices on TPU)."""
    tokens = jax.lax.broadcasted_iota(token_ids.dtype, (1, 1, vocab), 2)
    return jnp.any(token_ids[:, :, None] == tokens, axis=1)  # [N, J, V] -> [N, V]


def _ban(scores: Array, token_ids: Array, token_mask: Optional[TokenMask]) -> Array:
    """Set scores[n, token_ids[n, j]] to -inf; ids >= vocab are skipped. token_ids [N, J].

    By scatter, or through `token_mask` (a decoding plan's choice) when given."""
    if token_mask is not None:
        return jnp.where(token_mask(token_ids, scores.shape[-1]), NEG_INF, scores)
    rows = jnp.arange(scores.shape[0])[:, None]
    return scores.at[rows, token_ids].set(NEG_INF, mode="drop")


def _last_tokens(sequences: Array, cur_len: Array, count: int) -> Array:
    """sequences[:, cur_len - count : cur_len], [N, count] (clamped at 0; callers gate on cur_len >= count)."""
    if count == 0:
        return sequences[:, :0]
    return jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - count, 0), count, axis=1)


def _windows(tokens: Array, n: int) -> Array:
    """All length-n windows: [N, T] -> [N, T - n + 1, n]."""
    width = tokens.shape[1] - n + 1
    return jnp.stack([tokens[:, j:j + width] for j in range(n)], axis=-1)


def repetition_penalty(scores: Array, sequences: Array, cur_len: Array, penalty: Array,
                       prompt_ignore: Array, token_mask: Optional[TokenMask] = None) -> Array:
    """Divide positive (multiply negative) scores of tokens already in the sequence by `penalty`."""
    vocab = scores.shape[-1]
    positions = jnp.arange(sequences.shape[1])[None, :]
    seen = (positions < cur_len) & (positions >= prompt_ignore[:, None])
    ids = jnp.where(seen, sequences, vocab)  # [N, T]
    if token_mask is not None:
        mask = token_mask(ids, vocab)
    else:
        mask = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], ids].set(True, mode="drop")
    return jnp.where(mask, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def no_repeat_ngram(scores: Array, sequences: Array, cur_len: Array, n: int,
                    token_mask: Optional[TokenMask] = None) -> Array:
    """Ban every token that would complete an n-gram already in `sequences[:, :cur_len]`."""
    vocab = scores.shape[-1]
    windows = _windows(sequences, n)  # [N, W, n]
    prefix = _last_tokens(sequences, cur_len, n - 1)  # [N, n-1]
    valid = jnp.arange(windows.shape[1])[None, :] <= cur_len - n  # the window lies inside the sequence
    matches = jnp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1) & valid & (cur_len >= n)
    return _ban(scores, jnp.where(matches, windows[:, :, -1], vocab), token_mask)


def encoder_no_repeat_ngram(scores: Array, sequences: Array, cur_len: Array, n: int, encoder_ids: Array,
                            encoder_length: Array, token_mask: Optional[TokenMask] = None) -> Array:
    """Ban every token that would complete an n-gram of the encoder input (rows grouped per batch element)."""
    vocab, rows = scores.shape[-1], scores.shape[0]
    windows = _windows(encoder_ids, n)  # [B, W, n]
    windows = jnp.repeat(windows, rows // encoder_ids.shape[0], axis=0)  # [N, W, n]
    prefix = _last_tokens(sequences, cur_len, n - 1)  # [N, n-1]
    valid = jnp.arange(windows.shape[1])[None, :] <= encoder_length - n
    matches = jnp.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1) & valid & (cur_len >= n - 1)
    return _ban(scores, jnp.where(matches, windows[:, :, -1], vocab), token_mask)


def bad_words(scores: Array, sequences: Array, cur_len: Array, words: tuple[tuple[int, ...], ...]) -> Array:
    """Ban single-token words always, and the last token of longer words whose prefix ends the sequence."""
    singles = [w[0] for w in words if len(w) == 1]
    if singles:
        scores = scores.at[:, jnp.asarray(singles)].set(NEG_INF)
    for word in (w for w in words if len(w) > 1):
        prefix = jnp.asarray(word[:-1], sequences.dtype)
        hit = jnp.all(_last_tokens(sequences, cur_len, len(prefix)) == prefix, axis=-1) & (cur_len >= len(prefix))
        scores = scores.at[:, word[-1]].set(jnp.where(hit, NEG_INF, scores[:, word[-1]]))
    return scores


def force_tokens(scores: Array, token_ids: tuple[int, ...], when: Array) -> Array:
    """Where `when`: every score -inf except `token_ids`, which get 0."""
    forced = jnp.full(scores.shape, NEG_INF, scores.dtype).at[:, jnp.asarray(token_ids)].set(0.0)
    return jnp.where(when, forced, scores)


def min_length(scores: Array, cur_len: Array, length: Array, eos_token_ids: tuple[int, ...]) -> Array:
    """EOS gets -inf while the sequence is shorter than `length`."""
    eos = jnp.asarray(eos_token_ids)
    return scores.at[:, eos].set(jnp.where(cur_len < length, NEG_INF, scores[:, eos]))


def top_k(scores: Array, k: int) -> Array:
    """Keep the k highest scores (ties with the k-th kept), -inf elsewhere."""
    k = min(k, scores.shape[-1])
    threshold = jax.lax.top_k(scores, k)[0][:, -1:]
    return jnp.where(scores < threshold, NEG_INF, scores)


def top_p(scores: Array, p: Array, min_tokens_to_keep: int) -> Array:
    """Keep the smallest set of highest scores whose probability reaches p (ties with its last kept)."""
    ascending = jnp.sort(scores, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = cumulative <= 1.0 - p
    remove = remove.at[:, -min_tokens_to_keep:].set(False)  # a prefix of the ascending order
    first_kept = jnp.argmin(remove, axis=-1)[:, None]
    threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)
    return jnp.where(scores < threshold, NEG_INF, scores)


def process(scores: Array, sequences: Array, cur_len: Array, spec: ProcessorSpec, inputs: ProcessorInputs,
            warp: bool, token_mask: Optional[TokenMask] = None) -> Array:
    """All enabled processors in transformers' order; the sampling warpers last when `warp`.

    scores [N, V] float32 (logits for greedy/sampling, log-probabilities for beam search);
    sequences [N, T] the tokens so far, of which the first `cur_len` are real; `token_mask`: how the
    penalty and the n-gram bans mark their tokens (a decoding plan's choice; None: by scatter).
    """
    if spec.repetition_penalty:
        scores = repetition_penalty(scores, sequences, cur_len, inputs.repetition_penalty, inputs.prompt_ignore,
                                    token_mask)
    if spec.no_repeat_ngram_size:
        scores = no_repeat_ngram(scores, sequences, cur_len, spec.no_repeat_ngram_size, token_mask)
    if spec.encoder_no_repeat_ngram_size:
        scores = encoder_no_repeat_ngram(scores, sequences, cur_len, spec.encoder_no_repeat_ngram_size,
                                         inputs.encoder_ids, inputs.encoder_length, token_mask)
    if spec.bad_words_ids:
        scores = bad_words(scores, sequences, cur_len, spec.bad_words_ids)
    if spec.eos_token_ids:
        scores = min_length(scores, cur_len, inputs.min_length, spec.eos_token_ids)
    if spec.forced_bos_token_id is not None:
        scores = force_tokens(scores, (spec.forced_bos_token_id,), cur_len == 1)
    if spec.forced_eos_token_ids:
        scores = force_tokens(scores, spec.forced_eos_token_ids, cur_len == inputs.max_length - 1)
    if warp:
        if spec.temperature:
            scores = scores / inputs.temperature
        if spec.top_k:
            scores = top_k(scores, max(spec.top_k, spec.min_tokens_to_keep))
        if spec.top_p:
            scores = top_p(scores, inputs.top_p, spec.min_tokens_to_keep)
    return scores
