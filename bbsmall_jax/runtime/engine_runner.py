"""A decode engine cycled on a thread of its own, answering batches of contexts with futures of their replies
(batch inference: records flow through the slots, and a batch's future resolves when all of it is done)."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future
from typing import Sequence

from bbsmall_jax.generation.engine import DecodeEngine, EngineRequest
from bbsmall_jax.runtime.responder import Responder


def resolve_scheduler(choice: str) -> str:
    """`bbsmall generate`'s `auto` -> the decode engine ("engine") on GPU and TPU, static batches ("batch") on
    the CPU, where they write a corpus's replies at least as fast (the README's decode-engine figures)."""
    if choice != "auto":
        return choice
    import jax

    return "batch" if jax.default_backend() == "cpu" else "engine"


class EngineRunner:
    """`replies(contexts)` -> Future of each context's replies, as `Responder.replies` returns them."""

    def __init__(self, responder: Responder, requests: int = 32, steps: int = 8):
        """`requests` decode together: the engine's slots are that many times the beams (or sequences) each
        takes, the rows a static batch of `requests` decodes."""
        self.responder = responder
        cfg, _ = responder.model._resolve_generation_config(None, dict(responder.generation_kwargs))
        width = max(cfg.num_beams, cfg.num_return_sequences, 1)
        self.engine = DecodeEngine(responder.model, responder.generation_kwargs, slots=requests * width,
                                   group_width=width, steps=steps, max_context=responder.max_context_tokens)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bbsmall-engine", daemon=True)
        self._thread.start()

    def replies(self, contexts: Sequence[list[int]]) -> Future:
        """Submit the contexts (token ids); the future gives [[Reply, ...] per context] in their order, or
        raises the first error of one of them."""
        future: Future = Future()
        results: list = [None] * len(contexts)
        remaining = [len(contexts)]
        if not contexts:
            future.set_result([])
            return future

        def finished(index: int, request: EngineRequest) -> None:  # on the engine's thread
            if future.done():
                return
            if request.error is not None:
                future.set_exception(request.error)
                return
            try:
                results[index] = self.responder.finished_replies(request.result)
            except BaseException as err:  # noqa: BLE001 - the caller's, through the future
                future.set_exception(err)
                return
            remaining[0] -= 1
            if remaining[0] == 0:
                future.set_result(results)

        # Shortest first, as static batches sort a window: the requests decoding together then have contexts of
        # about one length, and the engine's steps read only as many encoder positions as the longest needs.
        for index in sorted(range(len(contexts)), key=lambda i: len(contexts[i])):
            self.engine.submit(contexts[index], on_finish=lambda request, index=index: finished(index, request))
        with self._cond:
            self._cond.notify()
        return future

    def shutdown(self) -> None:
        """Stop the thread after its current cycle; requests still waiting or decoding end cancelled (their
        futures raise CancelledError)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self.engine.busy:
            self.engine.abort(CancelledError("the engine runner was shut down"))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.engine.busy and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.engine.cycle()
            except BaseException as err:  # noqa: BLE001 - every request in the engine gets it, its caller too
                self.engine.abort(err)

