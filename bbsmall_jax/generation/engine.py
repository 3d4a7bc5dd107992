"""The decode engine's host side: requests in, slots filled between `step` calls, tokens out as they come.

    engine = DecodeEngine(model, dict(num_beams=1, max_length=32), slots=32)
    engine.warm_up()                       # compiles every program a request mix can need, once
    request = engine.submit(ids, on_token=print)
    while engine.busy:
        engine.cycle()                     # admit waiting requests, run `steps` decoding steps, report
    request.result                         # the rows `generate` would return for it alone

A request is checked and laid out by the same `prepare` as `generate`, so it gets the same settings,
errors and tokens. Settings that shape the programs (the logits processors, top-k, early stopping, the
special tokens) are the engine's, from the model's generation config and `generation_kwargs`; a request
may change the rest (greedy, sampling or beam search, temperature, top_p, lengths, length penalty, key).
`cycle` runs on one thread; `submit` and `cancel` may be called from any.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from bbsmall_jax import startup_cache
from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation import engine_programs as programs
from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.generation import sharding
from bbsmall_jax.generation.prepare import MIN_BUCKET, Prepared, bucket_length, buffer_length, prepare
from bbsmall_jax.generation.engine_programs import BEAM, GREEDY, SAMPLE, Admission, EngineSpec, SlotSettings

TokenCallback = Callable[[int, int], None]  # (row of the request, token id)
PREFILL_BATCH = 8  # the most contexts of one length bucket encoded in one prefill call
PREFILL_SIZES = (1, 2, 4, PREFILL_BATCH)  # prefill programs per bucket: fewer contexts are padded to the next


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One submitted request: where it decodes and what it has produced."""

    prepared: Prepared
    on_token: Optional[TokenCallback] = None  # each new token of a greedy or sampled row, as it is decoded
    on_finish: Optional[Callable[["EngineRequest"], None]] = None
    slots: tuple[int, ...] = ()
    lane: Optional[int] = None  # the lane of its group (beam search, several sampled rows)
    tokens: list = dataclasses.field(default_factory=list)  # per row: the tokens so far (greedy, sampled)
    result: Optional[list[list[int]]] = None  # per returned row: the start token and the generated tokens
    error: Optional[BaseException] = None  # why it ended without a result (`DecodeEngine.abort`)
    cancelled: bool = False

    @property
    def mode(self) -> int:
        spec = self.prepared.spec
        return BEAM if spec.strategy == "beam" else SAMPLE if spec.do_sample else GREEDY

    @property
    def width(self) -> int:
        """Slots it takes: its beams, or its sampled rows."""
        return self.prepared.layout.expand


class DecodeEngine:
    """A fixed set of decoding slots over one encoder-decoder model (see the module's docstring).

    slots: the most requests' rows decoded together (S, rounded up to a multiple of group_width times the
    devices; a step decodes the smallest of `step_sizes` that holds the slots in use);
    group_width: the largest beam search or sampled `n` (a lane's slots; default: the settings' num_beams or
    num_return_sequences); steps: decoding steps per call; max_length: the longest reply (start token
    included) a request may ask for (default: the model's max_length setting); max_context: the longest
    context, in tokens; devices: the slots are split over them in blocks of whole lanes (default: this
    process's devices), the weights replicated.
    """

    def __init__(self, model, generation_kwargs: Optional[dict] = None, *, slots: int = 32,
                 group_width: Optional[int] = None, steps: int = 8, max_length: Optional[int] = None,
                 max_context: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None):
        self.model, self.generation_kwargs = model, dict(generation_kwargs or {})
        self.mesh = sharding.data_mesh(devices)
        self.spec = engine_spec(model, self.generation_kwargs, slots=slots, group_width=group_width, steps=steps,
                                max_length=max_length, max_context=max_context,
                                devices=sharding.device_count(self.mesh))
        self._programs = model.sampler.engine_programs(self.spec)
        self.step_sizes = step_sizes(self.spec, sharding.device_count(self.mesh))
        self.source_windows = source_windows(self.spec)
        self._params, self._weights = model.sampler.placed_weights(model.params, self.spec.plan, self.mesh)
        self.state = self._empty_state()
        self._owner: list[Optional[EngineRequest]] = [None] * self.spec.slots
        self._groups: list[Optional[EngineRequest]] = [None] * self.spec.lanes  # each lane's group
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._lock = threading.Lock()

    # ---- requests

    def _prepare(self, ids, overrides: dict, prng_key=None) -> Prepared:
        return prepare_request(self.model, {**self.generation_kwargs, **overrides}, ids, prng_key)

    def submit(self, ids, *, prng_key=None, on_token: Optional[TokenCallback] = None,
               on_finish: Optional[Callable[[EngineRequest], None]] = None, **overrides) -> EngineRequest:
        """Queue one context (token ids) with `generate`'s keyword arguments; raises ValueError for settings
        `generate` refuses or this engine cannot decode (naming the setting)."""
        prepared = self._prepare(ids, overrides, prng_key)
        self._check(prepared, len(ids))
        request = EngineRequest(prepared, on_token, on_finish)
        request.tokens = [[] for _ in range(request.width)]
        with self._lock:
            self._waiting.append(request)
        return request

    def cancel(self, request: EngineRequest) -> None:
        """Stop decoding a request: it leaves the queue, or its slots are freed at the next cycle."""
        request.cancelled = True

    def _check(self, prepared: Prepared, context_length: int) -> None:
        spec, engine = prepared.spec, self.spec
        if spec.strategy == "beam" and spec.do_sample:
            raise UsageError("beam sampling (num_beams > 1 with do_sample=True) is not decoded by the engine; "
                             "use generate()")
        if prepared.layout.expand > engine.group_width:
            what = "num_beams" if spec.strategy == "beam" else "num_return_sequences"
            raise UsageError(f"{what}={prepared.layout.expand} is more than this engine's group_width "
                             f"({engine.group_width})")
        if spec.do_sample and prepared.layout.expand > 1 and not jax.config.jax_threefry_partitionable:
            raise UsageError("several sampled sequences per request need jax_threefry_partitionable=True")
        if int(prepared.search.max_length) > engine.buffer_length:
            raise UsageError(f"max_length {int(prepared.search.max_length)} is more than this engine's "
                             f"{engine.buffer_length} positions per slot")
        if context_length > engine.source_length:
            raise UsageError(f"the context has {context_length} tokens, more than this engine's "
                             f"{engine.source_length}")
        differences = _differences(prepared, engine)
        if differences:
            raise UsageError("this engine decodes with other settings: " + "; ".join(differences)
                             + " (they are fixed when the engine is made; use generate() for these)")

    # ---- the decoding loop

    @property
    def busy(self) -> bool:
        """Whether a request waits or decodes."""
        return bool(self._waiting) or any(owner is not None for owner in self._owner)

    @property
    def slots_in_use(self) -> int:
        return sum(owner is not None for owner in self._owner)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in slots."""
        return len(self._waiting)

    def abort(self, error: BaseException) -> None:
        """End every request, waiting or decoding, with `error` (their `on_finish` called), and start over with
        every slot free: after a failed program call, the state may be lost."""
        with self._lock:
            requests = list(self._waiting) + list({owner for owner in self._owner if owner is not None})
            self._waiting.clear()
        self._owner = [None] * self.spec.slots
        self._groups = [None] * self.spec.lanes
        self.state = self._empty_state()
        for request in requests:
            request.error = error
            if request.on_finish is not None:
                request.on_finish(request)

    def cycle(self) -> None:
        """Free cancelled requests' slots, admit waiting requests while slots are free, run `steps` decoding
        steps, and report new tokens and finished requests."""
        self._release_cancelled()
        self._admit()
        if self.slots_in_use == 0:
            return
        self.state, shown = self._run("step", self._weights, self.state, **self._step_shape())
        shown, live = jax.device_get((shown, self.state.live))
        self._report(np.asarray(shown), np.asarray(live))

    def _step_shape(self) -> dict:
        """The `step` program for the requests in the slots: the smallest of `step_sizes` that holds every
        occupied slot, and the smallest of `source_windows` that holds their contexts (None: all of them)."""
        occupied = [(slot, owner) for slot, owner in enumerate(self._owner) if owner is not None]
        highest = max(slot for slot, _ in occupied)
        longest = max(owner.prepared.inputs["input_ids"].shape[1] for _, owner in occupied)  # its bucket
        size = next(size for size in self.step_sizes if size > highest)
        window = next(window for window in self.source_windows if window >= longest)
        return dict(active=None if size == self.spec.slots else size,
                    source=None if window == self.spec.source_length else window)

    def _empty_state(self) -> programs.EngineState:
        """Every slot free, laid out over the devices."""
        state = programs.empty_state(self.spec, self.model.module)
        return state if self.mesh is None else jax.device_put(state, programs.state_shardings(state, self.mesh))

    def _run(self, name: str, *args, **options):
        """An engine program through the start-up cache (params first for prefill and step)."""
        static = dict(spec=self.spec) if name == "prefill" else dict(spec=self.spec, mesh=self.mesh, **options)
        if name in ("prefill", "step"):
            args = (self._params,) + args
        return startup_cache.run_program(self._programs[name], args, static,
                                         ("engine", name) + self.model._program_identity())

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while their slots are free: their contexts encoded together
        per length bucket (up to `PREFILL_BATCH` at a time), then each inserted."""
        admitted = []
        with self._lock:
            while self._waiting:
                request = self._waiting[0]
                placement = None if request.cancelled else self._place(request)
                if placement is None and not request.cancelled:
                    break
                self._waiting.popleft()
                if placement is not None:
                    self._take(request, *placement)
                    admitted.append(request)
        by_bucket: dict[int, list[EngineRequest]] = {}
        for request in admitted:
            by_bucket.setdefault(request.prepared.inputs["input_ids"].shape[1], []).append(request)
        for requests in by_bucket.values():
            for start in range(0, len(requests), PREFILL_BATCH):
                self._start(requests[start:start + PREFILL_BATCH])

    def _place(self, request: EngineRequest) -> Optional[tuple[tuple[int, ...], Optional[int]]]:
        """(slots, lane) for a request, or None while they are taken: in the lowest lane that has room, so that
        the slots in use stay at the front. A group takes a free lane's first slots; a single slot is taken
        from a lane's end first, to leave its first slots to a group."""
        w = self.spec.group_width
        for lane, group in enumerate(self._groups):
            if request.width > 1:
                slots = tuple(range(lane * w, lane * w + request.width))
                if group is None and all(self._owner[s] is None for s in slots):
                    return slots, lane
                continue
            for position in reversed(range(w)):
                slot = lane * w + position
                if self._owner[slot] is None and (group is None or position >= group.width):
                    return (slot,), None
        return None

    def _take(self, request: EngineRequest, slots: tuple[int, ...], lane: Optional[int]) -> None:
        request.slots, request.lane = slots, lane
        for slot in slots:
            self._owner[slot] = request
        if lane is not None:
            self._groups[lane] = request

    def _start(self, requests: list[EngineRequest]) -> None:
        """Prefill requests of one context bucket in one call (padded to a power of two), then insert each in
        the slots it took."""
        rows = 1 << (len(requests) - 1).bit_length()  # 1, 2, 4 or PREFILL_BATCH
        # [rows, bucket]: the requests' contexts, then copies of the first
        ids, mask = (np.concatenate([r.prepared.inputs[name] for r in requests]
                                    + [requests[0].prepared.inputs[name]] * (rows - len(requests)))
                     for name in ("input_ids", "attention_mask"))
        prefilled = self._run("prefill", ids, mask)
        for row, request in enumerate(requests):
            self.state = self._run("insert", self.state, prefilled, np.int32(row),
                                   self._admission(request, request.slots, request.lane))

    def _admission(self, request: EngineRequest, slots: tuple[int, ...], lane: Optional[int]) -> Admission:
        """The insert program's arguments for a request in `slots` (W entries, S marking the unused)."""
        spec, w, prepared = self.spec, self.spec.group_width, request.prepared
        search_inputs, processors = prepared.search, prepared.spec.processors
        taken = np.full(w, spec.slots, np.int32)
        taken[:len(slots)] = slots
        key = _key_data(search_inputs.rng)
        fill = lambda value, dtype: np.full(w, value, dtype)
        settings = SlotSettings(
            mode=fill(request.mode, np.int32), max_length=fill(search_inputs.max_length, np.int32),
            min_length=fill(search_inputs.processors.min_length, np.int32),
            temperature=fill(search_inputs.processors.temperature if processors.temperature else 1.0, np.float32),
            top_p=fill(search_inputs.processors.top_p if processors.top_p else 1.0, np.float32),
            key=np.broadcast_to(key, (w, 2)).copy(), row=np.arange(w, dtype=np.int32),
            encoder_length=fill(0, np.int32), encoder_ids=np.zeros((w, 0), np.int32))
        # the request's own n ** length_penalty (from the setting's float64 value), for every length it reaches
        denominators = np.ones(spec.buffer_length + 1, np.float32)
        own = np.asarray(search_inputs.length_denominators)
        denominators[:len(own)] = own
        return Admission(slots=taken, settings=settings, lane=np.int32(spec.lanes if lane is None else lane),
                         group_size=np.int32(request.width if lane is not None else 0), denominators=denominators,
                         length_penalty=np.float32(search_inputs.length_penalty))

    def _report(self, shown: np.ndarray, live: np.ndarray) -> None:
        """Hand out the new tokens [S, steps] (-1: none) of greedy and sampled rows, and finish the requests
        whose slots stopped."""
        for request in {owner for owner in self._owner if owner is not None}:
            if request.mode != BEAM:
                for row, slot in enumerate(request.slots):
                    for token in shown[slot][shown[slot] >= 0].tolist():
                        request.tokens[row].append(token)
                        if request.on_token is not None and not request.cancelled:
                            request.on_token(row, token)
            if not live[list(request.slots)].any():
                self._finish(request)

    def _finish(self, request: EngineRequest) -> None:
        """A request's rows are done: its result, its slots freed, its callback."""
        start = self.spec.start_token_id
        if request.mode == BEAM:
            lanes = jax.device_get((self.state.lanes.sequences, self.state.lanes.lengths))
            sequences, lengths = (np.asarray(x)[request.lane] for x in lanes)
            request.result = [sequences[row, :1 + lengths[row]].tolist() for row in range(request.prepared.rows_out)]
        else:
            request.result = [[start] + tokens for tokens in request.tokens]
        self._free(request)
        if request.on_finish is not None:
            request.on_finish(request)

    def _free(self, request: EngineRequest) -> None:
        for slot in request.slots:
            self._owner[slot] = None
        if request.lane is not None:
            self._groups[request.lane] = None

    def _release_cancelled(self) -> None:
        """Stop the slots of cancelled requests (one program call for all of them)."""
        cancelled = {owner for owner in self._owner if owner is not None and owner.cancelled}
        if not cancelled:
            return
        slots = np.full(self.spec.slots, self.spec.slots, np.int32)
        taken = sorted(slot for request in cancelled for slot in request.slots)
        slots[:len(taken)] = taken
        self.state = self._run("release", self.state, slots)
        for request in cancelled:
            self._free(request)

    # ---- warm-up and compilations

    def warm_up(self) -> None:
        """Compile (or load from the start-up cache) every program a request mix needs: `prefill` for each
        context bucket and each of `PREFILL_SIZES`, `insert` after each, `step` and `release`, by
        decoding one-token greedy requests; then `step` over each of `step_sizes` and `source_windows`."""
        bucket = MIN_BUCKET
        while True:
            length = min(bucket, self.spec.source_length)
            for count in PREFILL_SIZES:
                for _ in range(count):
                    self.submit([self.spec.start_token_id] * length, num_beams=1, do_sample=False,
                                num_return_sequences=1, max_length=2, min_length=0)
                while self.busy:
                    self.cycle()
            if length >= self.spec.source_length:
                break
            bucket *= 2
        for size in self.step_sizes:  # on free slots: decodes nothing
            for window in self.source_windows:
                self.state, _ = self._run("step", self._weights, self.state,
                                          active=None if size == self.spec.slots else size,
                                          source=None if window == self.spec.source_length else window)
        self.state = self._run("release", self.state, np.full(self.spec.slots, self.spec.slots, np.int32))


def prepare_request(model, settings: dict, ids, prng_key=None) -> Prepared:
    """One context checked and laid out as `generate` would for it alone, with these keyword arguments."""
    cfg, default_max_length = model._resolve_generation_config(None, settings)
    return prepare(model.config, True, cfg, default_max_length, np.asarray([ids], np.int32), prng_key=prng_key)


STEP_SHIFTS = (0, 2, 4)  # step programs over all the slots, a quarter and a sixteenth of them
WINDOW_SHIFTS = (0, 2, 4)  # and over all encoder positions, a quarter and a sixteenth of them
SMALLEST_WINDOW = 32  # encoder positions of the narrowest `step` program


def step_sizes(spec: EngineSpec, devices: int) -> tuple[int, ...]:
    """The numbers of leading slots a `step` program decodes, ascending, in whole lanes: all S, and on one
    device also S / 4 and S / 16 (the slots are split over several devices, each decoding its own)."""
    if devices > 1:
        return (spec.slots,)
    lane = spec.group_width
    return tuple(sorted({max(lane, -(-(spec.slots >> shift) // lane) * lane) for shift in STEP_SHIFTS}))


def source_windows(spec: EngineSpec) -> tuple[int, ...]:
    """The encoder positions a `step` program's cross-attention reads, ascending: all of them, and a quarter
    and a sixteenth of them where that is at least `SMALLEST_WINDOW`."""
    return tuple(sorted({spec.source_length >> shift for shift in WINDOW_SHIFTS
                         if shift == 0 or spec.source_length >> shift >= SMALLEST_WINDOW}))


def engine_spec(model, generation_kwargs: dict, *, slots: int, group_width: Optional[int], steps: int,
                max_length: Optional[int], max_context: Optional[int], devices: int = 1,
                backend: Optional[str] = None) -> EngineSpec:
    """The programs' static settings for a model and `generate` keyword arguments (see `DecodeEngine`); slots
    rounded up to whole lanes on each of `devices` devices of `backend` (default: JAX's default)."""
    if model.head == "decoder_only":
        raise UsageError("the decode engine serves the encoder-decoder model; use generate() for the "
                         "decoder-only one")
    pad = [model.config.pad_token_id]
    base = prepare_request(model, {**generation_kwargs, "num_beams": 1, "do_sample": False, "max_length": 2,
                                   "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
                                   "num_return_sequences": 1}, pad)
    cfg, _ = model._resolve_generation_config(None, dict(generation_kwargs))
    width = group_width if group_width is not None else max(cfg.num_beams, cfg.num_return_sequences, 1)
    _check_positive(slots=slots, steps=steps, group_width=width)
    lanes_together = width * devices  # every device holds whole lanes
    slots = -(-slots // lanes_together) * lanes_together
    positions = model.config.max_position_embeddings
    longest = max_length if max_length is not None else int(prepare_request(model, generation_kwargs,
                                                                            pad).search.max_length)
    context = positions if max_context is None else max_context
    _check_positive(max_length=longest, max_context=context)
    return EngineSpec(
        slots=slots, group_width=width, steps=steps, buffer_length=buffer_length(int(longest), positions),
        source_length=bucket_length(min(context, positions), positions),
        processors=_without_warpers(base.spec.processors), top_k=int(cfg.top_k or 0),
        repetition_penalty=float(cfg.repetition_penalty), eos_token_ids=base.spec.eos_token_ids,
        pad_token_id=base.spec.pad_token_id, start_token_id=int(base.inputs["sequences"][0, 0]),
        early_stopping=cfg.early_stopping, plan=model.decoding_plan(slots, devices, backend))


def _key_data(key) -> np.ndarray:
    """A PRNG key's two uint32 words (typed keys and raw `PRNGKey` arrays alike)."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32).reshape(2)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _without_warpers(processors: lp.ProcessorSpec) -> lp.ProcessorSpec:
    """The processors of a spec with the sampling warpers off (the engine applies those per slot)."""
    return dataclasses.replace(processors, temperature=False, top_k=0, top_p=False, min_tokens_to_keep=1)


def _differences(prepared: Prepared, engine: EngineSpec) -> list[str]:
    """The settings of a prepared request that the engine's programs fix otherwise, named."""
    spec, out = prepared.spec, []
    ours = _without_warpers(spec.processors)
    for field in dataclasses.fields(ours):
        mine, theirs = getattr(ours, field.name), getattr(engine.processors, field.name)
        if mine != theirs:
            out.append(f"{field.name}: {theirs!r} here, {mine!r} asked")
    if spec.do_sample and spec.processors.top_k != engine.top_k:
        out.append(f"top_k: {engine.top_k} here, {spec.processors.top_k} asked")
    if spec.processors.repetition_penalty and float(prepared.search.processors.repetition_penalty) != \
            np.float32(engine.repetition_penalty):
        out.append(f"repetition_penalty: {engine.repetition_penalty} here, "
                   f"{float(prepared.search.processors.repetition_penalty)} asked")
    for name in ("eos_token_ids", "pad_token_id", "early_stopping"):
        if getattr(spec, name) != getattr(engine, name):
            out.append(f"{name}: {getattr(engine, name)!r} here, {getattr(spec, name)!r} asked")
    if int(prepared.inputs["sequences"][0, 0]) != engine.start_token_id:
        out.append(f"decoder_start_token_id: {engine.start_token_id} here, "
                   f"{int(prepared.inputs['sequences'][0, 0])} asked")
    return out
