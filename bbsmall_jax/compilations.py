"""Counting XLA compilations in this process, from JAX's public monitoring events.

    with CompilationCounter() as compiled:
        engine.cycle()
    assert compiled.count == 0

Every backend compilation counts: jitted programs and the small programs of eager operations alike, but not
an executable loaded from a cache.
"""

from __future__ import annotations

import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompilationCounter:
    """Counts the compilations (on any thread) while it is entered; `count` stays readable after."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1

    def __enter__(self) -> "CompilationCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
