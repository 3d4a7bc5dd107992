"""Serving from the decode engine: requests join free slots between decoding steps, and their tokens are handed
to the event loop as they are decoded (`Job.tokens`), for streamed replies.

The worker thread owns the engine (and the model): it warms it up, then cycles while any request waits or
decodes. Each cycle admits what fits, runs `steps` decoding steps for every slot, and reports tokens and
finished replies; a request whose client left is cancelled there and its slots freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Optional

import jax
import numpy as np

from bbsmall_jax.generation.engine import DecodeEngine, EngineRequest
from bbsmall_jax.runtime.responder import Reply, Responder
from bbsmall_jax.serve.batcher import QueueFull, settle, warm_up_then_ready
from bbsmall_jax.serve.metrics import ServerMetrics
from bbsmall_jax.serve.schemas import ApiError
from bbsmall_jax.serve.settings import Settings

log = logging.getLogger("uvicorn.error")


@dataclasses.dataclass(eq=False)
class Job:
    """One conversation decoding in the engine; `tokens` (when streamed) receives (row, token id) as they come
    and None after the last."""

    ids: list[int]
    settings: Settings
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    log_probs: bool = False
    tokens: Optional[asyncio.Queue] = None
    request: Optional[EngineRequest] = None
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)
    last_token: Optional[float] = None  # when its latest token was decoded
    cancelled: bool = False

    def deliver(self, result) -> None:
        """Hand the replies (or an exception) to the waiting request, from any thread."""
        if self.tokens is not None:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, None)
        self.loop.call_soon_threadsafe(settle, self.future, result)


class EngineWorker:
    """The engine and the worker thread that cycles it; the same calls as `RequestBatcher`."""

    def __init__(self, responder: Responder, metrics: ServerMetrics, engine: DecodeEngine, max_queue: int = 256,
                 seed: int = 0, warm_up: bool = True):
        self.responder, self.metrics, self.engine = responder, metrics, engine
        self.max_queue, self.warm = max_queue, warm_up
        self._rng = np.random.default_rng(seed)
        self._cond = threading.Condition()
        self._stopping = False
        self._cycle_seconds = 0.0  # moving average of a cycle, for Retry-After
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bbsmall-engine", daemon=True)

    # ---- the event loop's side

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: list[int], settings: Settings, log_probs: bool = False, stream: bool = False) -> Job:
        """Queue a conversation; with `stream`, its tokens also arrive in `Job.tokens` (greedy and sampled
        replies; a beam search's reply comes whole). Raises QueueFull, or ApiError for settings the engine
        cannot decode. Call on the event loop."""
        loop = asyncio.get_running_loop()
        job = Job(ids, settings, loop.create_future(), loop, log_probs, asyncio.Queue() if stream else None)
        waiting = self.engine.waiting
        if waiting >= self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(waiting, max(1, int(np.ceil((waiting / self.engine.spec.slots + 1)
                                                        * max(self._cycle_seconds, 0.1)))))
        kwargs = settings.generate_kwargs()
        if settings.do_sample:
            seed = settings.seed if settings.seed is not None else int(self._rng.integers(2 ** 31))
            kwargs["prng_key"] = jax.random.PRNGKey(seed)
        try:
            job.request = self.engine.submit(ids, on_token=lambda row, token: self._on_token(job, row, token),
                                             on_finish=lambda request: self._finish(job), **kwargs)
        except ValueError as err:
            raise ApiError(400, f"Invalid request: {err}") from None
        self.metrics.queue_depth.set(self.engine.waiting)
        with self._cond:
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: the engine drops the request (frees its slots at its next cycle)."""
        job.cancelled = True
        if job.request is not None:
            self.engine.cancel(job.request)
        with self._cond:
            self._cond.notify()

    def flush(self) -> None:
        """Draining: nothing is held back here (requests start as soon as slots are free)."""

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what was submitted, then end the worker (waits up to `timeout` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread

    def _warm_up(self) -> None:
        if not self.warm:
            return
        began = time.perf_counter()
        self.engine.warm_up()
        jax.random.PRNGKey(0)  # the sampling keys' small program
        log.info("warm-up: the engine's programs (%d slots, contexts up to %d tokens) ready in %.1f s",
                 self.engine.spec.slots, self.engine.spec.source_length, time.perf_counter() - began)

    def _run(self) -> None:
        warm_up_then_ready(self._warm_up, self.metrics, self.ready)
        while True:
            with self._cond:
                while not self.engine.busy and not self._stopping:
                    self._cond.wait()
                if not self.engine.busy:
                    return
            self._cycle()

    def _cycle(self) -> None:
        began = time.perf_counter()
        try:
            self.engine.cycle()
        except Exception as err:  # noqa: BLE001 - reported to every request in the engine, which starts over
            log.exception("bbsmall serve: a decoding step failed")
            self.engine.abort(err)
        seconds = time.perf_counter() - began
        self._cycle_seconds = seconds if not self._cycle_seconds else 0.8 * self._cycle_seconds + 0.2 * seconds
        self.metrics.slots_in_use.set(self.engine.slots_in_use)
        self.metrics.queue_depth.set(self.engine.waiting)

    def _on_token(self, job: Job, row: int, token: int) -> None:
        now = time.perf_counter()
        if job.last_token is None:
            self.metrics.time_to_first_token.observe(now - job.enqueued)
        else:
            self.metrics.inter_token_latency.observe(now - job.last_token)
        job.last_token = now
        if job.tokens is not None:
            job.loop.call_soon_threadsafe(job.tokens.put_nowait, (row, token))

    def _finish(self, job: Job) -> None:
        """The request's rows are done: its replies (with log-probabilities when asked), or its error."""
        request = job.request
        if request.error is not None or job.cancelled:
            job.deliver(request.error or ApiError(499, "the client left"))
            return
        if job.last_token is None:  # a beam search: its reply is its first token
            self.metrics.time_to_first_token.observe(time.perf_counter() - job.enqueued)
        try:
            replies = self._replies(job, request.result)
        except Exception as err:  # noqa: BLE001 - reported to the request; the worker goes on
            log.exception("bbsmall serve: finishing a reply failed")
            replies = err
        job.deliver(replies)

    def _replies(self, job: Job, rows: list[list[int]]) -> list[Reply]:
        replies = self.responder.finished_replies(rows, **job.settings.generate_kwargs())
        if job.log_probs:
            replies = self.responder.with_log_probs([job.ids] * len(replies), replies)
        self.metrics.generate_seconds.observe(time.perf_counter() - job.enqueued)
        return replies
