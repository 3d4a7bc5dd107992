"""A decode engine's device side: a fixed set of slots with a persistent decoding state, and its three programs.

After JetStream's engine: `prefill` encodes contexts (one program per context-length bucket and prefill batch
size), `insert` puts a prefilled request into free slots, and `step` runs `EngineSpec.steps` decoding steps
for the slots in use in one jitted loop. Requests join and leave between `step` calls, so a slot freed by a
short reply is reused at once, where a static batch would keep computing it until its longest row ends.
Requests take the lowest free slots, and `step` decodes the smallest of a few prefixes of the slots that
holds them all, over the smallest of a few prefixes of the encoder positions that holds their contexts, so a
step costs what the slots in use and their contexts cost.

Each slot has its own position (the cache's per-row index), length, settings and processor state, so every
request gets the tokens `generate` gives it alone with the same settings, whatever its neighbours:

- greedy and sampling requests take one slot per returned sequence. Sampling noise is drawn per request as
  `generate` draws it (`fold_in(key, length)`, one row of a [rows, V] draw per sequence);
- a beam search takes `num_beams` slots of one lane (`EngineSpec.group_width` slots in a row) as a group,
  and its reorders stay inside the lane. A lane holds at most one group (a beam search, or the sequences of
  a sampled request with several), at its first slots; single-slot requests use the rest.

Only the encoder-decoder model decodes here (its prompt is the decoder start token).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.generation import search, sharding
from bbsmall_jax.generation.plan import DecodingPlan
from bbsmall_jax.generation.program import _step_function
from bbsmall_jax.nn.cache import KVCache

Array = jax.Array

GREEDY, SAMPLE, BEAM = 0, 1, 2  # a slot's decoding mode
NEG = search.NEG


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything that shapes the engine's programs (static under jit): one per engine."""

    slots: int  # S, a multiple of group_width
    group_width: int  # W: the largest beam search or sampled group, and the slots of a lane
    steps: int  # decoding steps per `step` call
    buffer_length: int  # T: decoder positions per slot (the start token included), >= every max_length
    source_length: int  # encoder positions per slot (the longest context bucket)
    processors: lp.ProcessorSpec  # the logits processors every request gets (the warpers are below)
    top_k: int  # sampling's top-k warper (0: none)
    repetition_penalty: float  # with `processors.repetition_penalty`
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    start_token_id: int
    early_stopping: Any  # beam search's: True, False or "never"
    plan: DecodingPlan

    @property
    def lanes(self) -> int:
        return self.slots // self.group_width

    def beam_search_spec(self) -> search.SearchSpec:
        """The beam-search settings of a lane, as `search` takes them (num_beams: the lane's width)."""
        return search.SearchSpec("beam", self.processors, self.eos_token_ids, self.pad_token_id,
                                 num_beams=self.group_width, early_stopping=self.early_stopping, plan=self.plan)


@struct.dataclass
class SlotSettings:
    """Each slot's request settings (data: any mix runs in the same programs)."""

    mode: Array  # [S] int32: GREEDY, SAMPLE or BEAM
    max_length: Array  # [S] int32, counting the start token
    min_length: Array  # [S] int32
    temperature: Array  # [S] float32 (sampling)
    top_p: Array  # [S] float32 (sampling; 1 turns the warper off)
    key: Array  # [S, 2] uint32: the request's sampling key
    row: Array  # [S] int32: which of its request's sequences (beam, or sampled row) the slot holds
    encoder_length: Array  # [S] int32: real encoder positions (encoder_no_repeat_ngram_size)
    encoder_ids: Array  # [S, source_length or 0] int32: the context (encoder_no_repeat_ngram_size)


@struct.dataclass
class Lanes:
    """Per lane [G]: its group (beam search or sampled sequences) at its first `size` slots."""

    size: Array  # [G] int32, 0 when the lane holds no group
    key: Array  # [G, 2] uint32: a sampled group's key
    running_scores: Array  # [G, W] float32: beam search's live beams (-inf beyond `size`)
    sequences: Array  # [G, W, T] int32: finished hypotheses, best first
    scores: Array  # [G, W] float32: their length-penalised scores
    lengths: Array  # [G, W] int32: their generated lengths
    is_finished: Array  # [G, W] bool
    improvable: Array  # [G] bool
    done: Array  # [G] bool: the beam search is over (its result is in `sequences`)
    denominators: Array  # [G, T + 1] float32: n ** length_penalty
    length_penalty: Array  # [G] float32


@struct.dataclass
class EngineState:
    """The engine's decoding state on the device."""

    cache: KVCache  # S rows, each at its own position; cross-attention entries per slot
    tokens: Array  # [S, T] int32: start token, then the tokens so far
    length: Array  # [S] int32: tokens so far (the next goes to this position)
    live: Array  # [S] bool: decoding (occupied and unfinished)
    settings: SlotSettings
    lanes: Lanes


@struct.dataclass
class Prefilled:
    """P contexts encoded: their cross-attention entries padded to `source_length`."""

    cross_key: Array  # [L, P, source_length, H, Dh]
    cross_value: Array  # [L, P, source_length, H, Dh]
    encoder_mask: Array  # [P, source_length] bool
    encoder_ids: Array  # [P, source_length or 0] int32
    encoder_length: Array  # [P] int32


@struct.dataclass
class Admission:
    """Where and how one request enters: its slots (W entries; `slots` marks unused ones) and settings."""

    slots: Array  # [W] int32: the slots it takes, S for none (their writes are dropped)
    settings: SlotSettings  # [W] entries (encoder fields [W, ...] unused: they come from the Prefilled)
    lane: Array  # [] int32: the lane of its group, G for none
    group_size: Array  # [] int32: beams or sampled sequences of the group (0 without one)
    denominators: Array  # [T + 1] float32
    length_penalty: Array  # [] float32


def empty_state(spec: EngineSpec, module) -> EngineState:
    """Every slot free."""
    config, s, w, t = module.config, spec.slots, spec.group_width, spec.buffer_length
    g, heads = spec.lanes, config.decoder_attention_heads
    cache = KVCache.empty(config, s, t, module.dtype, spec.plan.time_major_cache)
    cross_shape = (config.decoder_layers, s, spec.source_length, heads, config.d_model // heads)
    cache = cache.replace(index=jnp.zeros((s,), jnp.int32), cross_key=jnp.zeros(cross_shape, module.dtype),
                          cross_value=jnp.zeros(cross_shape, module.dtype),
                          encoder_mask=jnp.zeros((s, spec.source_length), bool))
    if spec.plan.track_origins:
        cache = cache.tracking_origins()
    source = spec.source_length if spec.processors.encoder_no_repeat_ngram_size else 0
    settings = SlotSettings(
        mode=jnp.zeros((s,), jnp.int32), max_length=jnp.full((s,), t, jnp.int32), min_length=jnp.zeros((s,), jnp.int32),
        temperature=jnp.ones((s,), jnp.float32), top_p=jnp.ones((s,), jnp.float32),
        key=jnp.zeros((s, 2), jnp.uint32), row=jnp.zeros((s,), jnp.int32), encoder_length=jnp.zeros((s,), jnp.int32),
        encoder_ids=jnp.zeros((s, source), jnp.int32))
    lanes = Lanes(
        size=jnp.zeros((g,), jnp.int32), key=jnp.zeros((g, 2), jnp.uint32),
        running_scores=jnp.full((g, w), -jnp.inf, jnp.float32), sequences=jnp.zeros((g, w, t), jnp.int32),
        scores=jnp.full((g, w), NEG, jnp.float32), lengths=jnp.zeros((g, w), jnp.int32),
        is_finished=jnp.zeros((g, w), bool), improvable=jnp.zeros((g,), bool), done=jnp.zeros((g,), bool),
        denominators=jnp.ones((g, t + 1), jnp.float32), length_penalty=jnp.ones((g,), jnp.float32))
    return EngineState(cache=cache, tokens=jnp.full((s, t), spec.pad_token_id, jnp.int32),
                       length=jnp.ones((s,), jnp.int32), live=jnp.zeros((s,), bool), settings=settings, lanes=lanes)


# ---------------------------------------------------------------- prefill and insert


def prefill(module, params, input_ids: Array, attention_mask: Array, *, spec: EngineSpec) -> Prefilled:
    """Encode P contexts, ids and mask [P, bucket], and project their cross-attention keys/values."""
    variables = {"params": params}
    states = module.apply(variables, input_ids, attention_mask, method="encode").last_hidden_state
    cross = module.apply(variables, input_ids.shape[0], 1, states, attention_mask, method="init_cache")
    pad = spec.source_length - input_ids.shape[1]
    widen = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))  # [L, P, bucket..] -> [L, P, source..]
    encoder_ids = jnp.pad(input_ids, ((0, 0), (0, pad)))
    if not spec.processors.encoder_no_repeat_ngram_size:
        encoder_ids = encoder_ids[:, :0]
    return Prefilled(cross_key=widen(cross.cross_key), cross_value=widen(cross.cross_value),
                     encoder_mask=jnp.pad(cross.encoder_mask, ((0, 0), (0, pad))), encoder_ids=encoder_ids,
                     encoder_length=jnp.sum(attention_mask, axis=1).astype(jnp.int32))


def _set_rows(tree, slots: Array, values):
    """Every leaf of `tree` with rows `slots` (axis 0) set from `values` (out-of-range slots dropped)."""
    return jax.tree_util.tree_map(lambda x, v: x.at[slots].set(v.astype(x.dtype), mode="drop"), tree, values)


def insert(state: EngineState, prefilled: Prefilled, row: Array, admission: Admission, *, spec: EngineSpec,
           mesh: Optional[Mesh] = None) -> EngineState:
    """Start the request prefilled at `row` of `prefilled` in its slots: a fresh history, the start token, its
    settings and group."""
    slots, w = admission.slots, spec.group_width
    cache = state.cache
    prefilled = Prefilled(  # the request's own entries, [.., 1, ..] on the rows' axis
        cross_key=jax.lax.dynamic_slice_in_dim(prefilled.cross_key, row, 1, axis=1),
        cross_value=jax.lax.dynamic_slice_in_dim(prefilled.cross_value, row, 1, axis=1),
        encoder_mask=jax.lax.dynamic_slice_in_dim(prefilled.encoder_mask, row, 1),
        encoder_ids=jax.lax.dynamic_slice_in_dim(prefilled.encoder_ids, row, 1),
        encoder_length=prefilled.encoder_length[row])

    def rows_of(x: Array) -> Array:  # one request's [.., 1, ..] entries for its W slots (on the rows' axis)
        return jnp.broadcast_to(x, x.shape[:1] + (w,) + x.shape[2:])

    cache = cache.replace(
        cross_key=cache.cross_key.at[:, slots].set(rows_of(prefilled.cross_key), mode="drop"),
        cross_value=cache.cross_value.at[:, slots].set(rows_of(prefilled.cross_value), mode="drop"),
        encoder_mask=cache.encoder_mask.at[slots].set(
            jnp.broadcast_to(prefilled.encoder_mask, (w,) + prefilled.encoder_mask.shape[1:]), mode="drop"))
    if cache.origins is not None:  # each slot's positions in its own buffer row
        cache = cache.replace(origins=cache.origins.at[slots].set(slots[:, None], mode="drop"))
    first = jnp.full((w, spec.buffer_length), spec.pad_token_id, jnp.int32).at[:, 0].set(spec.start_token_id)
    settings = admission.settings.replace(
        encoder_length=jnp.broadcast_to(prefilled.encoder_length, (w,)),
        encoder_ids=jnp.broadcast_to(prefilled.encoder_ids, (w,) + prefilled.encoder_ids.shape[1:]))
    lanes = _start_group(spec, state.lanes, admission)
    return constrain_state(state.replace(
        cache=cache, tokens=state.tokens.at[slots].set(first, mode="drop"),
        length=state.length.at[slots].set(1, mode="drop"), live=state.live.at[slots].set(True, mode="drop"),
        settings=_set_rows(state.settings, slots, settings), lanes=lanes), mesh)


def _start_group(spec: EngineSpec, lanes: Lanes, admission: Admission) -> Lanes:
    """The lane's group as `search.init_beam_state` starts one: beam 0 live at 0, the others at NEG."""
    w, size = spec.group_width, admission.group_size
    beams = jnp.arange(w)
    running = jnp.where(beams == 0, 0.0, jnp.where(beams < size, NEG, -jnp.inf)).astype(jnp.float32)
    fresh = dict(size=size, key=admission.settings.key[0], running_scores=running,
                 scores=jnp.full((w,), NEG, jnp.float32), lengths=jnp.zeros((w,), jnp.int32),
                 is_finished=jnp.zeros((w,), bool), improvable=jnp.asarray(True), done=jnp.asarray(False),
                 denominators=admission.denominators, length_penalty=admission.length_penalty)
    updated = {name: getattr(lanes, name).at[admission.lane].set(value, mode="drop") for name, value in fresh.items()}
    return lanes.replace(**updated)


# ---------------------------------------------------------------- step


def _process(spec: EngineSpec, scores: Array, state: EngineState) -> Array:
    """`logits_processors.process` for every slot at its own length and settings (no warpers): [S, V]."""
    settings = state.settings

    def one(scores, tokens, length, max_length, min_length, encoder_ids, encoder_length):
        inputs = lp.ProcessorInputs(
            max_length=max_length, min_length=min_length, repetition_penalty=jnp.float32(spec.repetition_penalty),
            temperature=jnp.float32(1.0), top_p=jnp.float32(1.0), prompt_ignore=jnp.zeros((1,), jnp.int32),
            encoder_ids=encoder_ids[None], encoder_length=encoder_length)
        return lp.process(scores[None], tokens[None], length, spec.processors, inputs, warp=False,
                          token_mask=spec.plan.token_mask())[0]
    return jax.vmap(one)(scores, state.tokens, state.length, settings.max_length, settings.min_length,
                         settings.encoder_ids, settings.encoder_length)


def _warp(spec: EngineSpec, scores: Array, settings: SlotSettings) -> Array:
    """Sampling's warpers as `generate` applies them (temperature, top-k, top-p), per slot's settings."""
    scores = scores / settings.temperature[:, None]  # exact for 1.0
    if spec.top_k:
        scores = lp.top_k(scores, spec.top_k)
    return jnp.where((settings.top_p < 1.0)[:, None], lp.top_p(scores, settings.top_p[:, None], 1), scores)


def _noise(spec: EngineSpec, state: EngineState, vocab: int) -> Array:
    """Each slot's Gumbel noise [S, V]: row `row` of the [rows, V] draw `generate` makes at this length with
    its request's key (a draw's row r does not depend on how many rows it has, with partitionable threefry)."""
    settings = state.settings
    step_key = lambda key, length: jax.random.fold_in(key, length)
    single = jax.vmap(lambda key, length: jax.random.gumbel(step_key(key, length), (1, vocab))[0])(
        settings.key, state.length)
    grouped = _lane_member(spec, state) & (state.settings.mode == SAMPLE)
    lane_length = jnp.max(jnp.where(grouped, state.length, 0).reshape(spec.lanes, -1), axis=1)  # [G]: live ones'

    def lane_draws():  # [G, W, V] -> [S, V]: row r of the lane's group draw in the group's slot r
        draws = jax.vmap(lambda key, length: jax.random.gumbel(step_key(key, length), (spec.group_width, vocab)))(
            state.lanes.key, lane_length)
        return draws.reshape(spec.slots, vocab)
    lanes = jax.lax.cond(jnp.any(grouped & state.live), lane_draws, lambda: jnp.zeros_like(single))
    return jnp.where(grouped[:, None], lanes, single)


def _lane_member(spec: EngineSpec, state: EngineState) -> Array:
    """[S] bool: the slot belongs to its lane's group."""
    position = jnp.arange(spec.slots) % spec.group_width
    return position < jnp.repeat(state.lanes.size, spec.group_width)


def _pick(spec: EngineSpec, state: EngineState, processed: Array) -> Array:
    """Greedy and sampled slots' next tokens [S] from their processed scores."""
    greedy = spec.plan.select_argmax(processed)
    sampling = (state.settings.mode == SAMPLE) & state.live

    def sampled():
        drawn = jnp.argmax(_warp(spec, processed, state.settings) + _noise(spec, state, processed.shape[-1]), axis=-1)
        return jnp.where(sampling, drawn, greedy)
    return jax.lax.cond(jnp.any(sampling), sampled, lambda: greedy).astype(jnp.int32)


def _is_eos(spec: EngineSpec, tokens: Array) -> Array:
    return search._is_eos(tokens, spec.eos_token_ids)


def _beam_lanes(spec: EngineSpec, state: EngineState, log_probs: Array) -> tuple[Lanes, Array, Array, Array]:
    """One beam-search step for every lane's group, as `search.beam_body` takes it for one batch element of
    `size` beams: the lane's other slots are masked out (-inf), and its candidates beyond `size`'s count too.

    Returns (lanes, the group slots' new tokens [S, T], the cache rows they continue [S], active lanes [G]).
    """
    g, w, t, vocab = spec.lanes, spec.group_width, spec.buffer_length, log_probs.shape[-1]
    lanes, beam_spec = state.lanes, spec.beam_search_spec()
    count = beam_spec.beams_to_keep
    members = jnp.arange(w)[None, :] < lanes.size[:, None]  # [G, W]
    slot_mode = state.settings.mode.reshape(g, w)
    active = (lanes.size > 0) & (slot_mode[:, 0] == BEAM) & ~lanes.done & state.live.reshape(g, w)[:, 0]  # [G]
    cur = state.length.reshape(g, w)[:, 0]  # [G]: the group's length
    max_length = state.settings.max_length.reshape(g, w)[:, 0]
    candidates = jnp.arange(count)[None, :] < (count // w) * lanes.size[:, None]  # [G, 2W]: the group's 2K

    scores = jnp.where(members[:, :, None], log_probs.reshape(g, w, vocab), -jnp.inf)
    running = jnp.where(members, lanes.running_scores, -jnp.inf)
    top_scores, top_ids = search._top_k_continuations(scores, running, count, beam_spec, None)  # [G, 2W]
    sources, tokens = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
    lane_tokens = state.tokens.reshape(g, w, t)
    top_sequences = search._gather(lane_tokens, sources)  # [G, 2W, T]
    at_cur = jnp.arange(t)[None, None, :] == cur[:, None, None]
    top_sequences = jnp.where(at_cur, tokens[:, :, None], top_sequences)
    hits = (cur[:, None] + 1 >= max_length[:, None]) | _is_eos(spec, tokens)  # [G, 2W]

    live_scores = jnp.where(candidates, top_scores + hits.astype(jnp.float32) * NEG, -jnp.inf)
    running_scores, keep = jax.lax.top_k(live_scores, w)  # [G, W]
    running_scores = jnp.where(members, running_scores, -jnp.inf)
    running_sequences = search._gather(top_sequences, keep)
    rows = jnp.take_along_axis(sources, keep, axis=1) + (jnp.arange(g) * w)[:, None]  # [G, W] slots continued

    just_finished = hits & (jnp.arange(count)[None, :] < lanes.size[:, None])
    denominator = jnp.take_along_axis(lanes.denominators, cur[:, None], axis=1)  # n = cur + 1 - prompt (1)
    all_finished = jnp.all(lanes.is_finished | ~members, axis=1, keepdims=True)
    finished_scores = top_scores / denominator
    finished_scores = finished_scores + (all_finished & (spec.early_stopping is True)).astype(jnp.float32) * NEG
    finished_scores = finished_scores + (~lanes.improvable)[:, None].astype(jnp.float32) * NEG
    finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * NEG
    finished_scores = jnp.where(candidates, finished_scores, -jnp.inf)
    merged_scores = jnp.concatenate([jnp.where(members, lanes.scores, -jnp.inf), finished_scores], axis=1)
    kept_scores, best = jax.lax.top_k(merged_scores, w)  # [G, W]
    merged_lengths = jnp.concatenate([lanes.lengths, jnp.broadcast_to(cur[:, None], hits.shape)], axis=1)
    is_finished = jnp.take_along_axis(jnp.concatenate([lanes.is_finished, just_finished], axis=1), best, axis=1)
    improvable = lanes.improvable & _may_improve(spec, running_scores, kept_scores, is_finished & members, members,
                                                 cur + 1, max_length, lanes)
    done = ~(improvable & ~(jnp.all(is_finished | ~members, axis=1) & (spec.early_stopping is True))
             & ~jnp.all(hits | ~candidates, axis=1))
    updated = lanes.replace(
        running_scores=running_scores,
        sequences=search._gather(jnp.concatenate([lanes.sequences, top_sequences], axis=1), best),
        scores=kept_scores, lengths=jnp.take_along_axis(merged_lengths, best, axis=1), is_finished=is_finished,
        improvable=improvable, done=done)
    lanes = jax.tree_util.tree_map(
        lambda new, old: jnp.where(active.reshape((g,) + (1,) * (new.ndim - 1)), new, old), updated, lanes)
    in_step = (members & active[:, None]).reshape(-1)  # [S]
    tokens = jnp.where(in_step[:, None], running_sequences.reshape(-1, t), state.tokens)
    rows = jnp.where(in_step, rows.reshape(-1), jnp.arange(spec.slots))
    return lanes, tokens, rows, active


def _may_improve(spec: EngineSpec, running_scores: Array, scores: Array, finished: Array, members: Array,
                 cur_len: Array, max_length: Array, lanes: Lanes) -> Array:
    """`search._may_improve` for each lane's group: the worst finished score over its own slots only. [G]."""
    generated = cur_len - 1
    if spec.early_stopping == "never":
        generated = jnp.where(lanes.length_penalty > 0.0, max_length - 1, generated)
    best_possible = running_scores[:, :1] / jnp.take_along_axis(lanes.denominators, generated[:, None], axis=1)
    worst = jnp.min(jnp.where(members, scores, jnp.inf), axis=1, keepdims=True)
    worst_finished = jnp.where(finished, worst, NEG)
    return jnp.any((best_possible > worst_finished) & members, axis=-1)


def _one_step(spec: EngineSpec, step_fn, state: EngineState) -> tuple[EngineState, Array]:
    """One token for every live slot; returns the state and the tokens a client sees [S] (-1: none)."""
    last = jnp.take_along_axis(state.tokens, (state.length - 1)[:, None], axis=1)  # [S, 1]
    logits, cache = step_fn(last, state.cache.replace(index=state.length - 1))
    logits = logits.astype(jnp.float32)
    beam = state.settings.mode == BEAM
    scores = jnp.where(beam[:, None], jax.nn.log_softmax(logits, axis=-1), logits)
    processed = _process(spec, scores, state)

    tokens = _pick(spec, state, processed)
    single = state.live & ~beam
    ended = (state.length + 1 >= state.settings.max_length) | _is_eos(spec, tokens)
    sequences = jnp.where((jnp.arange(spec.buffer_length)[None, :] == state.length[:, None]) & single[:, None],
                          tokens[:, None], state.tokens)
    state = state.replace(tokens=sequences)

    def beam_step(state: EngineState):
        lanes, sequences, rows, active = _beam_lanes(spec, state, processed)
        group_done = jnp.repeat(lanes.done & active, spec.group_width) & _lane_member(spec, state)
        return state.replace(lanes=lanes, tokens=sequences), rows, group_done
    state, rows, group_done = jax.lax.cond(
        jnp.any(beam & state.live), beam_step,
        lambda state: (state, jnp.arange(spec.slots), jnp.zeros((spec.slots,), bool)), state)
    cache = cache.reorder(rows)
    shown = jnp.where(single, tokens, -1)
    live = state.live & ~(single & ended) & ~(beam & group_done)
    return _with_live(spec, state.replace(cache=cache, length=state.length + state.live.astype(jnp.int32)),
                      live), shown


def _with_live(spec: EngineSpec, state: EngineState, live: Array) -> EngineState:
    """The state with these slots decoding; a lane whose group has no live slot left is free again."""
    members_live = jnp.any((live & _lane_member(spec, state)).reshape(spec.lanes, -1), axis=1)
    return state.replace(live=live, lanes=state.lanes.replace(size=jnp.where(members_live, state.lanes.size, 0)))


def release(state: EngineState, slots: Array, *, spec: EngineSpec, mesh: Optional[Mesh] = None) -> EngineState:
    """Stop decoding `slots` [S] (S marks an unused entry): cancelled requests."""
    return constrain_state(_with_live(spec, state, state.live.at[slots].set(False, mode="drop")), mesh)


def step(module, params, weights: tuple, state: EngineState, *, spec: EngineSpec, mesh: Optional[Mesh] = None,
         active: Optional[int] = None, source: Optional[int] = None) -> tuple[EngineState, Array]:
    """`spec.steps` decoding steps for every live slot: the state and each step's shown tokens [S, steps].

    With `active` (a multiple of the lane width, on one device), only the first `active` slots are decoded
    (every live slot must be among them); with `source`, cross-attention reads only the first `source`
    encoder positions (every live slot's context must fit). A step then costs what the slots in use and
    their contexts cost, not all S slots over the longest context the engine takes.
    """
    step_fn = _step_function(module, {"params": params}, True, spec.plan, weights, None)
    count = spec.slots if active is None else active
    part_spec = dataclasses.replace(spec, slots=count)

    def body(i, carry):
        part, shown = carry
        part, tokens = _one_step(part_spec, step_fn, part)
        return part, shown.at[:, i].set(tokens)
    whole = constrain_state(state if active is None else first_slots(state, count, spec), mesh)
    shown = jnp.full((count, spec.steps), -1, jnp.int32)
    part, shown = jax.lax.fori_loop(0, spec.steps, body, (_narrowed(whole, source), shown))
    if active is None:
        return constrain_state(_with_encoder_of(part, state), mesh), shown
    everyone = jnp.full((spec.slots, spec.steps), -1, jnp.int32)
    return with_first_slots(state, part, spec), jax.lax.dynamic_update_slice_in_dim(everyone, shown, 0, axis=0)


def _narrowed(state: EngineState, source: Optional[int]) -> EngineState:
    """The state with its encoder entries cut to the first `source` positions (None: as it is)."""
    if source is None:
        return state
    cache = state.cache
    return state.replace(
        cache=cache.replace(cross_key=cache.cross_key[:, :, :source], cross_value=cache.cross_value[:, :, :source],
                            encoder_mask=cache.encoder_mask[:, :source]),
        settings=state.settings.replace(encoder_ids=state.settings.encoder_ids[:, :source]))


def _with_encoder_of(state: EngineState, whole: EngineState) -> EngineState:
    """`state` with the encoder entries of `whole` (decoding steps leave them as they were)."""
    cache = whole.cache
    return state.replace(
        cache=state.cache.replace(cross_key=cache.cross_key, cross_value=cache.cross_value,
                                  encoder_mask=cache.encoder_mask),
        settings=state.settings.replace(encoder_ids=whole.settings.encoder_ids))


def _decoding_state(state: EngineState) -> EngineState:
    """`state` without its encoder entries and lanes (None in their place): what decoding changes per slot."""
    return state.replace(
        cache=state.cache.replace(cross_key=None, cross_value=None, encoder_mask=None),
        settings=state.settings.replace(encoder_ids=None), lanes=None)


def first_slots(state: EngineState, count: int, spec: EngineSpec) -> EngineState:
    """The state of the first `count` slots (whole lanes) and of their lanes."""
    axes = slot_axes(state)
    part = jax.tree_util.tree_map(lambda x, axis: jax.lax.slice_in_dim(x, 0, count, axis=axis),
                                  state.replace(lanes=None), axes.replace(lanes=None))
    return part.replace(lanes=jax.tree_util.tree_map(lambda x: x[:count // spec.group_width], state.lanes))


def with_first_slots(state: EngineState, part: EngineState, spec: EngineSpec) -> EngineState:
    """`state` with the decoding state of its first slots and their lanes written from `part` (from
    `first_slots`, decoded). The encoder entries, which decoding leaves as they were, are not written back."""
    put = lambda x, new, axis: jax.lax.dynamic_update_slice_in_dim(x, new, 0, axis=axis)  # noqa: E731
    merged = jax.tree_util.tree_map(put, _decoding_state(state), _decoding_state(part),
                                    _decoding_state(slot_axes(state)))
    lanes = jax.tree_util.tree_map(lambda x, new: put(x, new, 0), state.lanes, part.lanes)
    return _with_encoder_of(merged, state).replace(lanes=lanes)


def slot_axes(state: EngineState) -> EngineState:
    """The axis of each state leaf that runs over the slots (or the lanes): where a mesh splits it."""
    cache = state.cache
    every = lambda tree, axis: jax.tree_util.tree_map(lambda _: axis, tree)  # noqa: E731
    return state.replace(
        cache=cache.replace(entries=2, index=0, cross_key=1, cross_value=1, encoder_mask=0,
                            origins=None if cache.origins is None else 0),
        tokens=0, length=0, live=0, settings=every(state.settings, 0), lanes=every(state.lanes, 0))


def state_shardings(state: EngineState, mesh: Mesh) -> EngineState:
    """The state's layout over a data mesh: slots (and lanes) split in contiguous blocks, a lane on one device."""
    return jax.tree_util.tree_map(lambda axis: sharding.rows(mesh, axis), slot_axes(state))


def constrain_state(state: EngineState, mesh: Optional[Mesh]) -> EngineState:
    """Inside a program: the state laid out as `state_shardings` (nothing on one device)."""
    if mesh is None:
        return state
    return jax.tree_util.tree_map(lambda x, axis: sharding.constrain_rows(x, mesh, axis), state, slot_axes(state))


def compile_programs(module, spec: EngineSpec) -> dict:
    """The engine's jitted programs for one module (`spec` static); `step` and `insert` update the state in
    place."""
    options = dict(spec.plan.compiler_options) or None
    static = ("spec", "mesh")
    module = spec.plan.decoding_module(module)
    return dict(
        prefill=jax.jit(partial(prefill, module), static_argnames="spec", compiler_options=options),
        insert=jax.jit(insert, static_argnames=static, donate_argnames="state"),
        release=jax.jit(release, static_argnames=static, donate_argnames="state"),
        step=jax.jit(partial(step, module), static_argnames=static + ("active", "source"), donate_argnames="state",
                     compiler_options=options))
