"""Dynamic batching: queued requests grouped by settings and context-length bucket into one `generate` call,
run in a worker thread (compilation too), results routed back to each request's asyncio future."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from bbsmall_jax.generation.prepare import bucket_length
from bbsmall_jax.runtime.responder import Reply, Responder
from bbsmall_jax.serve.metrics import ServerMetrics
from bbsmall_jax.serve.settings import Settings

log = logging.getLogger("uvicorn.error")
WARMUP_TEXT = "hello, how are you today? i like to go hiking with my dog on the weekends."


class QueueFull(Exception):
    """The queue holds `max_queue` requests; `retry_after` estimates the seconds until there is room."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the request queue is full ({depth} waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)
class Job:
    """One conversation waiting for its replies."""

    ids: list[int]  # context token ids
    settings: Settings
    key: tuple  # batching key: settings and length bucket (and the job itself when not batchable)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    log_probs: bool = False  # the replies carry their tokens' log-probabilities
    tokens = None  # replies arrive whole here (the engine's jobs stream their tokens)

    def deliver(self, result) -> None:
        """Hand the replies (or an exception) to the waiting request, from any thread."""
        self.loop.call_soon_threadsafe(settle, self.future, result)


def settle(future: asyncio.Future, result) -> None:
    """Resolve a future with a result or an exception, unless it is already done (on the event loop)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def warm_up_then_ready(warm_up: Callable[[], None], metrics: ServerMetrics, ready: threading.Event) -> None:
    """Run `warm_up` (a failure is logged and leaves compiling to the first requests), then count the
    compilations from here on and report ready."""
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - logged; the server still answers
        log.exception("bbsmall serve: warm-up failed")
    metrics.count_compilations()
    ready.set()
    metrics.ready.set(1)


def power_of_two_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two >= max_batch (the batch sizes `generate` compiles)."""
    return tuple(1 << i for i in range(max(max_batch - 1, 0).bit_length() + 1))


class RequestBatcher:
    """A queue of Jobs and the worker thread that owns the model: warm-up first, then batch after batch."""

    def __init__(self, responder: Responder, metrics: ServerMetrics, max_batch: int = 32, max_wait_ms: float = 10,
                 max_queue: int = 256, batch_buckets: Optional[Sequence[int]] = None,
                 warmup: Sequence[tuple[Settings, int]] = (), seed: int = 0):
        self.responder, self.metrics = responder, metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.batch_buckets = tuple(sorted(set(batch_buckets or power_of_two_buckets(max_batch)) | {1}))
        self.max_positions = responder.model.config.max_position_embeddings
        self.warmup = tuple(warmup)
        # tokenized here, before any request is tokenized on the server's tokenizing thread
        self._warmup_ids = (responder.context_ids([WARMUP_TEXT]) or [responder.tokenizer.eos_token_id]
                            if warmup else [])
        self._rng = np.random.default_rng(seed)
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._flush = self._stopping = False
        self._ids = itertools.count()
        self._batch_seconds = 0.0  # moving average of a generate call, for Retry-After
        self._free_since = 0.0  # when the worker finished its last batch (time.monotonic)
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bbsmall-generate", daemon=True)

    # ---- the event loop's side

    def start(self) -> None:
        """Start the worker thread (warm-up first)."""
        self._thread.start()

    def submit(self, ids: list[int], settings: Settings, log_probs: bool = False, stream: bool = False) -> Job:
        """Queue a conversation (its replies with their tokens' log-probabilities if `log_probs`); raises
        QueueFull when `max_queue` are waiting. Replies arrive whole, `stream` or not. Call on the event
        loop."""
        loop = asyncio.get_running_loop()
        bucket = bucket_length(max(len(ids), 1), self.max_positions)
        key = (settings, bucket) if settings.batchable else (settings, bucket, next(self._ids))
        job = Job(ids, settings, key, loop.create_future(), loop, log_probs=log_probs)
        with self._cond:
            if len(self._jobs) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(len(self._jobs), self._retry_after(len(self._jobs)))
            self._jobs.append(job)
            self.metrics.queue_depth.set(len(self._jobs))
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it still waits (a running batch just discards its rows)."""
        with self._cond:
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
                self.metrics.queue_depth.set(len(self._jobs))
            self._cond.notify()

    def flush(self) -> None:
        """Stop waiting for more requests to fill batches (draining)."""
        with self._cond:
            self._flush = True
            self._cond.notify()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Answer what is queued, then end the worker (waits up to `timeout` seconds)."""
        with self._cond:
            self._flush = self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _retry_after(self, depth: int) -> int:
        """Seconds until the queue has likely drained enough for one more request."""
        calls = depth / self.max_batch + 1
        return max(1, int(np.ceil(calls * max(self._batch_seconds, 0.1))))

    # ---- the worker thread

    def _run(self) -> None:
        """The worker: warm up, report ready, then run batches until stopped."""
        warm_up_then_ready(self._warm_up, self.metrics, self.ready)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)
            self._free_since = time.monotonic()

    def _warm_up(self) -> None:
        """Compile every batch bucket for each warm-up (settings, context length bucket)."""
        if self.warmup:
            log.info("warm-up: compiling %d shapes (batch sizes %s x context lengths %s); /health answers 503 "
                     "until done", len(self.warmup) * len(self.batch_buckets), ",".join(map(str, self.batch_buckets)),
                     ",".join(str(length) for _, length in self.warmup))
        for settings, length in self.warmup:
            ids = list(itertools.islice(itertools.cycle(self._warmup_ids), length))
            for size in self.batch_buckets:
                if self._stopping:
                    return
                began = time.perf_counter()
                self._generate([ids] * size, settings)
                log.info("warm-up: batch %d x context %d compiled and ran in %.1f s", size, length,
                         time.perf_counter() - began)

    def _next_batch(self) -> Optional[list[Job]]:
        """The oldest job's group, once it is full or `max_wait` has passed since the oldest arrived or, if it
        arrived while the worker was busy, since the worker became free (so the requests answered by the
        last batch may join the next); None when stopped."""
        with self._cond:
            while True:
                if not self._jobs:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._jobs[0]
                group = [job for job in self._jobs if job.key == head.key][:self.max_batch]
                remaining = max(head.enqueued, self._free_since) + self.max_wait - time.monotonic()
                if len(group) >= self.max_batch or remaining <= 0 or self._flush or not head.settings.batchable:
                    for job in group:
                        self._jobs.remove(job)
                    self.metrics.queue_depth.set(len(self._jobs))
                    return group
                self._cond.wait(remaining)

    def _padded(self, contexts: list[list[int]]) -> list[list[int]]:
        """Contexts padded with copies of the first up to the next batch bucket (so few shapes compile)."""
        size = next((b for b in self.batch_buckets if b >= len(contexts)), len(contexts))
        return contexts + [contexts[0]] * (size - len(contexts))

    def _generate(self, contexts: list[list[int]], settings: Settings) -> list[list[Reply]]:
        """One `generate` call for contexts sharing `settings`; replies for the unpadded ones."""
        kwargs = settings.generate_kwargs()
        if settings.do_sample:
            seed = settings.seed if settings.seed is not None else int(self._rng.integers(2 ** 31))
            kwargs["prng_key"] = jax.random.PRNGKey(seed)
        return self.responder.replies(self._padded(contexts), **kwargs)[:len(contexts)]

    def _with_log_probs(self, jobs: list[Job], results: list[list[Reply]]) -> list[list[Reply]]:
        """The results, with log-probabilities added to the replies of the jobs that ask for them (one call)."""
        asking = [(job.ids, reply) for job, replies in zip(jobs, results) if job.log_probs for reply in replies]
        if not asking:
            return results
        scored = iter(self.responder.with_log_probs(*zip(*asking)))
        return [[next(scored) for _ in replies] if job.log_probs else replies for job, replies in zip(jobs, results)]

    def _execute(self, batch: list[Job]) -> None:
        """Generate for a batch and deliver each job's replies (or the error)."""
        live = [job for job in batch if not job.cancelled]
        if not live:
            return
        began = time.perf_counter()
        try:
            results = self._with_log_probs(live, self._generate([job.ids for job in live], live[0].settings))
        except Exception as err:  # reported to each request; the worker goes on
            log.exception("bbsmall serve: generate failed for a batch of %d", len(live))
            for job in live:
                job.deliver(err)
            return
        seconds = time.perf_counter() - began
        self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batch_size.observe(len(live))
        self.metrics.generate_seconds.observe(seconds)
        for job, replies in zip(live, results):
            if not job.cancelled:
                job.deliver(replies)
