"""The decoding loops under `lax.while_loop`: greedy/sampling and beam search, with transformers' semantics.

Both loops take a `step_fn(tokens [N, 1], cache) -> (logits [N, V] float32, cache)` that runs the model
on the last token of every row, so they know nothing about the model. Their `cond_fn`/`body_fn` are
plain functions: `while cond_fn(s): s = body_fn(s)` in Python steps the same loop for debugging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.generation.plan import PORTABLE, DecodingPlan

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]
ReorderFn = Callable[[Any, Array, Array], Any]  # (cache, source rows [N], length) -> cache

NEG = -1.0e9  # transformers' "very large negative" beam score


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Everything that changes the program (static under jit)."""

    strategy: str  # "greedy", "sample" or "beam"
    processors: lp.ProcessorSpec
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    num_beams: int = 1
    do_sample: bool = False  # with "beam": beam sampling
    early_stopping: Any = False  # True, False or "never"
    output_scores: bool = False
    plan: DecodingPlan = PORTABLE  # the backend's top-k, argmax and token masks (see `plan.py`)

    @property
    def beams_to_keep(self) -> int:
        """Candidates kept per batch element and step: enough that `num_beams` stay alive."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams


@struct.dataclass
class SearchInputs:
    """The loop's data (traced: changing a value does not recompile)."""

    processors: lp.ProcessorInputs
    prompt_length: Array  # [] int32, tokens each row starts with
    max_length: Array  # [] int32, the total length (prompt included) at which a row stops
    length_denominators: Array  # [T + 1] float32, n ** length_penalty for n = 0..T, rounded from float64
    length_penalty: Array  # [] float32
    valid: Array  # [B] bool, False for rows that only pad the batch to its bucket
    rng: Array  # PRNG key (sampling)


def _is_eos(tokens: Array, eos_token_ids: tuple[int, ...]) -> Array:
    if not eos_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_token_ids, tokens.dtype))


def _last_token(sequences: Array, cur_len: Array) -> Array:
    """sequences[..., cur_len - 1] as [N, 1]."""
    return jax.lax.dynamic_slice_in_dim(sequences, cur_len - 1, 1, axis=1)


def _step_rng(rng: Array, cur_len: Array) -> Array:
    return jax.random.fold_in(rng, cur_len)


# ---------------------------------------------------------------- greedy and sampling


@struct.dataclass
class SamplingState:
    """State of greedy search and sampling."""

    cur_len: Array  # [] int32, tokens so far (the next one goes to this position)
    sequences: Array  # [N, T] int32, prompt then generated tokens, pad beyond cur_len
    unfinished: Array  # [N] bool
    cache: Any  # the model's cache, written up to cur_len - 1
    scores: Optional[Array] = None  # [T, N, V] float32 processed scores per step (with output_scores)


def init_sampling_state(sequences: Array, inputs: SearchInputs, cache: Any, spec: SearchSpec,
                        vocab_size: int) -> SamplingState:
    """sequences [N, T] hold the prompt; inputs.valid [B] marks real batch elements (N = B * samples each)."""
    scores = None
    if spec.output_scores:
        scores = jnp.zeros((sequences.shape[1],) + (sequences.shape[0], vocab_size), jnp.float32)
    unfinished = jnp.repeat(inputs.valid, sequences.shape[0] // inputs.valid.shape[0])  # [N]
    return SamplingState(cur_len=inputs.prompt_length, sequences=sequences, unfinished=unfinished,
                         cache=cache, scores=scores)


def sampling_cond(state: SamplingState) -> Array:
    """Go on while some row is unfinished (and there is room)."""
    return jnp.any(state.unfinished) & (state.cur_len < state.sequences.shape[1])


def sampling_body(state: SamplingState, step_fn: StepFn, spec: SearchSpec, inputs: SearchInputs) -> SamplingState:
    """One token for every row: run the model, process the logits, pick, append, update `unfinished`."""
    cur = state.cur_len
    logits, cache = step_fn(_last_token(state.sequences, cur), state.cache)
    scores = lp.process(logits.astype(jnp.float32), state.sequences, cur, spec.processors, inputs.processors,
                        warp=spec.do_sample, token_mask=spec.plan.token_mask())
    if spec.do_sample:
        tokens = jax.random.categorical(_step_rng(inputs.rng, cur), scores, axis=-1)
    else:
        tokens = spec.plan.select_argmax(scores)
    tokens = tokens.astype(state.sequences.dtype)
    if spec.eos_token_ids:  # finished rows are padded
        tokens = jnp.where(state.unfinished, tokens, spec.pad_token_id)
    sequences = jax.lax.dynamic_update_slice_in_dim(state.sequences, tokens[:, None], cur, axis=1)
    done = (cur + 1 >= inputs.max_length) | _is_eos(tokens, spec.eos_token_ids)
    all_scores = state.scores
    if all_scores is not None:
        all_scores = all_scores.at[cur - inputs.prompt_length].set(scores)
    return state.replace(cur_len=cur + 1, sequences=sequences, unfinished=state.unfinished & ~done, cache=cache,
                         scores=all_scores)


def _varying_axes(leaf) -> frozenset:
    """The manual mesh axes (inside `shard_map`) an array varies over; none for host arrays and outside."""
    aval = jax.typeof(leaf)
    kind = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
    return frozenset(kind.varying) if kind is not None else frozenset(getattr(aval, "vma", ()))


def _varying_alike(state, inputs: SearchInputs):
    """`state` with every leaf varying over the manual mesh axes that any leaf of it or of `inputs` varies over.

    Inside the caller's `shard_map`, a loop's carry keeps its type, and the body mixes all of it with the
    inputs: a leaf made from constants (an empty cache, the decoder start tokens) would otherwise come back
    varying over the axes the batch varies over. Outside `shard_map` there are none, and nothing changes.
    """
    axes = set().union(*map(_varying_axes, jax.tree_util.tree_leaves((state, inputs))))
    if not axes:
        return state

    def vary(leaf):
        missing = tuple(sorted(axes - _varying_axes(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf
    return jax.tree_util.tree_map(vary, state)


def sample(sequences: Array, inputs: SearchInputs, cache: Any, step_fn: StepFn, spec: SearchSpec,
           vocab_size: int) -> SamplingState:
    """Greedy search or sampling until every row is finished; `cur_len` of the result is the output length."""
    state = _varying_alike(init_sampling_state(sequences, inputs, cache, spec, vocab_size), inputs)
    return jax.lax.while_loop(sampling_cond, lambda s: sampling_body(s, step_fn, spec, inputs), state)


# ---------------------------------------------------------------- beam search


@struct.dataclass
class BeamState:
    """State of beam search: `num_beams` live beams and the `num_beams` best finished hypotheses."""

    cur_len: Array  # [] int32
    running_sequences: Array  # [B, K, T] int32
    running_scores: Array  # [B, K] float32, sum of log-probabilities
    sequences: Array  # [B, K, T] int32, finished hypotheses, best first
    scores: Array  # [B, K] float32, their length-penalised scores (-1e9 for empty slots)
    lengths: Array  # [B, K] int32, their generated lengths (0 for empty slots)
    is_finished: Array  # [B, K] bool, whether the slot holds a finished hypothesis
    improvable: Array  # [B] bool, whether a live beam may still beat the worst finished one
    done: Array  # [] bool
    cache: Any  # the model's cache for the B * K live beams
    step_scores: Optional[Array] = None  # [T, B * K, V] float32 processed log-probabilities (with output_scores)


def init_beam_state(sequences: Array, inputs: SearchInputs, cache: Any, spec: SearchSpec,
                    vocab_size: int) -> BeamState:
    """sequences [B * K, T] hold the prompt (each row repeated K times); inputs.valid is [B]."""
    k = spec.num_beams
    batch = sequences.shape[0] // k
    running = sequences.reshape(batch, k, -1)  # [B, K, T]
    running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG)
    step_scores = None
    if spec.output_scores:
        step_scores = jnp.zeros((sequences.shape[1], sequences.shape[0], vocab_size), jnp.float32)
    return BeamState(
        cur_len=inputs.prompt_length, running_sequences=running, running_scores=running_scores,
        sequences=running, scores=jnp.full((batch, k), NEG, jnp.float32), lengths=jnp.zeros((batch, k), jnp.int32),
        is_finished=jnp.broadcast_to(~inputs.valid[:, None], (batch, k)), improvable=inputs.valid,
        done=~jnp.any(inputs.valid), cache=cache, step_scores=step_scores)


def beam_cond(state: BeamState) -> Array:
    """Go on until the stopping rule of the last step says done."""
    return ~state.done


def _gather(x: Array, indices: Array) -> Array:
    """x [B, M, ...] indexed along axis 1 by indices [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _per_beam_top_k(scores: Array, count: int, plan: DecodingPlan) -> tuple[Array, Array]:
    """`select_top_k` over scores [B, K, V] seen as [B, K * V], without that reshape: each beam's `count`
    best, then the best of those. The same entries and order, ties included: each beam's are listed by
    score with ties to the lower token, beam after beam, so equal scores stay in flat-index order."""
    batch, k, vocab = scores.shape
    values, tokens = plan.select_top_k(scores.reshape(batch * k, vocab), count)  # [B * K, count]
    flat_ids = tokens.reshape(batch, k, count) + (jnp.arange(k) * vocab)[None, :, None]
    values, picked = plan.select_top_k(values.reshape(batch, k * count), count)
    return values, jnp.take_along_axis(flat_ids.reshape(batch, k * count), picked, axis=1)


def _top_k_continuations(log_probs: Array, running_scores: Array, count: int, spec: SearchSpec,
                         rng: Array) -> tuple[Array, Array]:
    """The `count` best (beam, token) continuations of every batch element: scores and flat ids [B, count].

    The best of all its beams' scores; with sampling, `count` draws without replacement (Gumbel top-k),
    sorted by score as transformers does.
    """
    batch, k, vocab = log_probs.shape
    scores = log_probs + running_scores[:, :, None]  # [B, K, V]
    ranked = scores  # Gumbel noise drawn for [B, K, V] equals the [B, K * V] draw reshaped
    if spec.do_sample:
        ranked = scores + jax.random.gumbel(rng, scores.shape, jnp.float32)
    if spec.plan.beam_top_k == "per_beam":
        values, ids = _per_beam_top_k(ranked, count, spec.plan)
    else:
        values, ids = spec.plan.select_top_k(ranked.reshape(batch, k * vocab), count)
    if not spec.do_sample:
        return values, ids
    picked = scores[jnp.arange(batch)[:, None], ids // vocab, ids % vocab]  # [B, count]
    order = jnp.argsort(-picked, axis=1, stable=True)
    return jnp.take_along_axis(picked, order, axis=1), jnp.take_along_axis(ids, order, axis=1)


def beam_body(state: BeamState, step_fn: StepFn, reorder_fn: ReorderFn, spec: SearchSpec,
              inputs: SearchInputs) -> BeamState:
    """One beam-search step, as transformers' `_beam_search` loop body."""
    batch, k, length = state.running_sequences.shape
    cur = state.cur_len
    flat_sequences = state.running_sequences.reshape(batch * k, length)  # [N, T]
    logits, cache = step_fn(_last_token(flat_sequences, cur), state.cache)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = lp.process(log_probs, flat_sequences, cur, spec.processors, inputs.processors, warp=spec.do_sample,
                           token_mask=spec.plan.token_mask())
    vocab = log_probs.shape[-1]
    step_scores = state.step_scores
    if step_scores is not None:
        step_scores = step_scores.at[cur - inputs.prompt_length].set(log_probs)

    # top 2K continuations over all beams of a batch element
    count = spec.beams_to_keep
    topk_scores, topk_ids = _top_k_continuations(log_probs.reshape(batch, k, vocab), state.running_scores, count,
                                                 spec, _step_rng(inputs.rng, cur))
    source_beams, tokens = topk_ids // vocab, (topk_ids % vocab).astype(flat_sequences.dtype)  # [B, 2K]
    topk_sequences = _gather(state.running_sequences, source_beams)  # [B, 2K, T]
    topk_sequences = jax.lax.dynamic_update_slice_in_dim(topk_sequences, tokens[:, :, None], cur, axis=2)
    hits = (cur + 1 >= inputs.max_length) | _is_eos(tokens, spec.eos_token_ids)  # [B, 2K]

    # the K best unfinished continuations live on
    live_scores = topk_scores + hits.astype(jnp.float32) * NEG
    running_scores, keep = jax.lax.top_k(live_scores, k)  # [B, K]
    running_sequences = _gather(topk_sequences, keep)
    rows = (jnp.take_along_axis(source_beams, keep, axis=1) + jnp.arange(batch)[:, None] * k).reshape(-1)
    cache = reorder_fn(cache, rows, cur)

    # finished candidates among the top K enter the finished set if they beat it
    is_top_k = jnp.arange(count) < k
    just_finished = hits & is_top_k[None, :]
    denominator = inputs.length_denominators[cur + 1 - inputs.prompt_length]
    finished_scores = topk_scores / denominator
    batch_full = jnp.all(state.is_finished, axis=1, keepdims=True) & (spec.early_stopping is True)
    finished_scores = finished_scores + batch_full.astype(jnp.float32) * NEG
    finished_scores = finished_scores + (~state.improvable)[:, None].astype(jnp.float32) * NEG
    finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([state.scores, finished_scores], axis=1)  # [B, 3K]
    scores, best = jax.lax.top_k(merged_scores, k)
    merged_sequences = jnp.concatenate([state.sequences, topk_sequences], axis=1)
    new_lengths = jnp.broadcast_to(cur + 1 - inputs.prompt_length, finished_scores.shape).astype(jnp.int32)
    merged_lengths = jnp.concatenate([state.lengths, new_lengths], axis=1)
    merged_finished = jnp.concatenate([state.is_finished, just_finished], axis=1)

    is_finished = jnp.take_along_axis(merged_finished, best, axis=1)
    improvable = state.improvable & _may_improve(running_scores, scores, is_finished, cur + 1, spec, inputs)
    done = ~(jnp.any(improvable)
             & ~(jnp.all(is_finished) & (spec.early_stopping is True))
             & ~jnp.all(hits | ~inputs.valid[:, None]))
    return BeamState(
        cur_len=cur + 1, running_sequences=running_sequences, running_scores=running_scores,
        sequences=_gather(merged_sequences, best), scores=scores,
        lengths=jnp.take_along_axis(merged_lengths, best, axis=1), is_finished=is_finished,
        improvable=improvable, done=done, cache=cache, step_scores=step_scores)


def _may_improve(running_scores: Array, scores: Array, is_finished: Array, cur_len: Array, spec: SearchSpec,
                 inputs: SearchInputs) -> Array:
    """transformers' early-stop heuristic: can the best live beam still beat the worst finished one? [B]."""
    generated = cur_len - inputs.prompt_length
    if spec.early_stopping == "never":
        generated = jnp.where(inputs.length_penalty > 0.0, inputs.max_length - inputs.prompt_length, generated)
    best_possible = running_scores[:, :1] / inputs.length_denominators[generated]  # [B, 1]
    worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG)  # [B, K]
    return jnp.any(best_possible > worst_finished, axis=-1)


def beam_search(sequences: Array, inputs: SearchInputs, cache: Any, step_fn: StepFn, reorder_fn: ReorderFn,
                spec: SearchSpec, vocab_size: int) -> BeamState:
    """Beam search until transformers' stopping rule holds; the finished hypotheses are in the result."""
    state = _varying_alike(init_beam_state(sequences, inputs, cache, spec, vocab_size), inputs)
    return jax.lax.while_loop(beam_cond, lambda s: beam_body(s, step_fn, reorder_fn, spec, inputs), state)


def length_denominators(length_penalty: float, size: int):
    """n ** length_penalty for n = 0..size-1, computed in float64 as transformers does, then float32."""
    n = np.arange(size, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.power(n, float(length_penalty)).astype(np.float32)
