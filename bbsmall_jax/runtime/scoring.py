"""Scoring replies with a model: the log-probability of every reply token given its context, in jitted batches
of bucketed shapes; each context is encoded once for all its candidate replies."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation.prepare import bucket_length
from bbsmall_jax.nn.model import label_log_probs, shift_tokens_right
from bbsmall_jax.runtime.examples import TokenizedExamples

IGNORED = -100  # label padding, as in training


@dataclasses.dataclass(frozen=True)
class ReplyScores:
    """Per example and candidate reply: the summed token log-probability, the tokens, the argmax hits."""

    log_prob: np.ndarray  # [N, C] float64, sum over the reply's tokens (its __end__ included)
    tokens: np.ndarray  # [N, C] int64
    correct: np.ndarray  # [N, C] int64 tokens whose most likely prediction is the reply's token

    @property
    def mean_log_prob(self) -> np.ndarray:
        """[N, C] the mean token log-probability of each candidate."""
        return self.log_prob / np.maximum(self.tokens, 1)


def _reply_logits(module, params, input_ids, attention_mask, labels):
    """Logits [B * C, T, V] float32 of the replies labels [B, C, T] (IGNORED beyond each reply) to the contexts
    input_ids [B, S], teacher-forced: the encoder runs on B rows and its output is repeated for the C replies."""
    config = module.config
    batch, count, length = labels.shape
    variables = {"params": params}
    encoded = module.apply(variables, input_ids, attention_mask, method="encode").last_hidden_state  # [B, S, D]
    states = jnp.repeat(encoded, count, axis=0)  # [B * C, S, D]
    states_mask = jnp.repeat(attention_mask, count, axis=0)  # [B * C, S]
    flat = labels.reshape(batch * count, length)  # [B * C, T]
    decoder_input_ids = shift_tokens_right(flat, config.pad_token_id, config.decoder_start_token_id)
    hidden = module.apply(variables, decoder_input_ids=decoder_input_ids, encoder_hidden_states=states,
                          encoder_attention_mask=states_mask, method="decode").last_hidden_state
    return module.apply(variables, hidden, method="logits")  # [B * C, T, V] float32


def _score_batch(module, params, input_ids, attention_mask, labels):
    """(summed log-prob, tokens, argmax hits), each [B, C], of the replies labels [B, C, T] to the contexts
    input_ids [B, S]."""
    logits = _reply_logits(module, params, input_ids, attention_mask, labels)
    flat = labels.reshape(-1, labels.shape[-1])  # [B * C, T]
    log_prob, valid = label_log_probs(logits, flat)
    correct = valid & (jnp.argmax(logits, axis=-1) == flat)
    shape = labels.shape[:2]
    return log_prob.sum(-1).reshape(shape), valid.sum(-1).reshape(shape), correct.sum(-1).reshape(shape)


@functools.lru_cache(maxsize=8)
def _scorer(module):
    """`_score_batch` jitted for one module (kept, so later calls with the same shapes do not compile)."""
    return jax.jit(functools.partial(_score_batch, module))


def bucket_lengths(lengths: np.ndarray, cap: int) -> np.ndarray:
    """The padded length of each length: half of `cap` or `cap` (two buckets per axis keep compilations few;
    each one costs seconds, and the decoder rows of a hits@1 batch are nearly always as long as `cap`)."""
    return np.where(lengths <= cap // 2, max(cap // 2, 1), cap)


def _groups(data: TokenizedExamples, contexts: np.ndarray, candidates: np.ndarray, max_source: int,
            max_target: int, per_batch: int) -> list[tuple[int, int, np.ndarray]]:
    """[(source bucket, reply bucket, rows of `contexts`)] with at most `per_batch` rows each, in order within a
    bucket; each row goes to the buckets of its context and of its longest candidate."""
    source = bucket_lengths(data.source_lengths[contexts], max_source)
    target = bucket_lengths(data.target_lengths[candidates].max(axis=1), max_target)
    groups = []
    for s, t in sorted(set(zip(source.tolist(), target.tolist()))):
        rows = np.flatnonzero((source == s) & (target == t))
        groups += [(s, t, rows[k:k + per_batch]) for k in range(0, len(rows), per_batch)]
    return groups


def _padded(sources: list, targets: list[list], rows: int, count: int, source_len: int, target_len: int,
            pad: int) -> tuple[np.ndarray, ...]:
    """input_ids, attention_mask [rows, S] of the id sequences `sources` and labels [rows, count, T] of their
    replies `targets[r]` (`count` a row); the rows past them are filler (one pad token of context, no reply)."""
    input_ids = np.full((rows, source_len), pad, np.int32)
    attention_mask = np.zeros((rows, source_len), np.int32)
    attention_mask[:, 0] = 1
    labels = np.full((rows, count, target_len), IGNORED, np.int32)
    for r, (source, replies) in enumerate(zip(sources, targets)):
        input_ids[r, :len(source)] = source
        attention_mask[r, :len(source)] = 1
        for c, target in enumerate(replies):
            labels[r, c, :len(target)] = target
    return input_ids, attention_mask, labels


def _materialize(data: TokenizedExamples, contexts: np.ndarray, candidates: np.ndarray, rows: np.ndarray,
                 per_batch: int, source_len: int, target_len: int, pad: int) -> tuple[np.ndarray, ...]:
    """input_ids, attention_mask [per_batch, S] and labels [per_batch, C, T] of some rows (`_padded`)."""
    return _padded([data.source_ids(contexts[row]) for row in rows],
                   [[data.target_ids(index) for index in candidates[row]] for row in rows], per_batch,
                   candidates.shape[1], source_len, target_len, pad)


def score_replies(model, data: TokenizedExamples, contexts: np.ndarray, candidates: np.ndarray,
                  max_source_length: int, max_target_length: int, rows_per_batch: int = 160,
                  progress: Optional[object] = None) -> ReplyScores:
    """Score the replies of the examples `candidates[m]` ([M, C] indices into `data`) as replies to the
    context of example `contexts[m]`, for each m. A batch holds rows_per_batch // C contexts (at least one),
    padded to bucketed shapes so that a few programs compile. `progress` (a tqdm bar) advances per batch."""
    score = _scorer(model.module)
    count = candidates.shape[1]
    per_batch = max(1, rows_per_batch // count)
    out = [np.zeros(candidates.shape, dtype) for dtype in (np.float64, np.int64, np.int64)]
    groups = _groups(data, contexts, candidates, max_source_length, max_target_length, per_batch)
    if progress is not None:
        progress.total = len(groups)  # set, not reset: nothing is drawn before the first batch
    pad = model.config.pad_token_id
    for source_len, target_len, rows in groups:
        arrays = _materialize(data, contexts, candidates, rows, per_batch, source_len, target_len, pad)
        for target, values in zip(out, jax.device_get(score(model.params, *arrays))):
            target[rows] = np.asarray(values)[:len(rows)]
        if progress is not None:
            progress.update(1)
    return ReplyScores(*out)


MAX_TOP = 20  # the most alternatives `reply_token_log_probs` lists per token (OpenAI's top_logprobs limit)
LOGITS_BUDGET = 1 << 28  # bytes of float32 logits one `reply_token_log_probs` call holds at most (256 MiB)


@dataclasses.dataclass(frozen=True)
class TokenLogProbs:
    """The model's log-probability of each token of one reply, and of the most likely tokens at each position."""

    chosen: np.ndarray  # [T] float32, log_softmax of the model's logits at the reply's own token
    top: np.ndarray  # [T, MAX_TOP] float32, the largest log-probabilities, in decreasing order
    top_ids: np.ndarray  # [T, MAX_TOP] int32, their tokens


def _token_log_probs(module, params, input_ids, attention_mask, labels):
    """(log-prob of each reply token [B, T], the MAX_TOP largest log-probs and their ids [B, T, MAX_TOP]) of the
    replies labels [B, T] (IGNORED beyond each) to the contexts input_ids [B, S]."""
    logits = _reply_logits(module, params, input_ids, attention_mask, labels[:, None])  # [B, T, V]
    chosen, _ = label_log_probs(logits, labels)
    top, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), min(MAX_TOP, logits.shape[-1]))
    return chosen, top, top_ids


@functools.lru_cache(maxsize=8)
def _token_scorer(module):
    """`_token_log_probs` jitted for one module."""
    return jax.jit(functools.partial(_token_log_probs, module))


def reply_token_log_probs(model, contexts: list[list[int]], replies: list[list[int]]) -> list[TokenLogProbs]:
    """The log-probability, teacher-forced, of every token of `replies[i]` (generated tokens, the decoder start
    token left out) as the reply to `contexts[i]` (token ids), with the MAX_TOP most likely tokens at each
    position: the raw model's distribution, before any temperature, top-p or other logits processing.

    Shapes are padded (rows to a power of two, lengths to `bucket_length`) so few programs compile, and the rows
    go in calls whose float32 logits stay under LOGITS_BUDGET bytes."""
    if len(contexts) != len(replies):
        raise UsageError(f"{len(contexts)} contexts for {len(replies)} replies")
    if not contexts:
        return []
    config = model.config
    source_len = bucket_length(max(max(map(len, contexts)), 1), config.max_position_embeddings)
    target_len = bucket_length(max(max(map(len, replies)), 1), config.max_position_embeddings)
    fitting = max(LOGITS_BUDGET // (target_len * config.vocab_size * 4), 1)
    rows = min(1 << (fitting.bit_length() - 1), 1 << max(len(contexts) - 1, 0).bit_length())  # powers of two
    score, out = _token_scorer(model.module), []
    for first in range(0, len(contexts), rows):
        input_ids, attention_mask, labels = _padded(contexts[first:first + rows],
                                                    [[reply] for reply in replies[first:first + rows]], rows, 1,
                                                    source_len, target_len, config.pad_token_id)
        chosen, top, top_ids = jax.device_get(score(model.params, input_ids, attention_mask, labels[:, 0]))
        out += [TokenLogProbs(chosen[row, :len(reply)], top[row, :len(reply)], top_ids[row, :len(reply)])
                for row, reply in enumerate(replies[first:first + rows])]
    return out
