"""Prometheus metrics in the text exposition format: counters, gauges and histograms, thread-safe."""

from __future__ import annotations

import math
import threading
from typing import Iterable, Optional, Sequence

from bbsmall_jax.compilations import CompilationCounter
from bbsmall_jax.errors import UsageError

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    """`{a="x",b="y"}` (escaped), or "" without labels."""
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    """A sample value as Prometheus writes it."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    """A named metric family with fixed label names."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.label_names):
            raise UsageError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        """The family's HELP and TYPE lines."""
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A value that only goes up, per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        """Add `amount` (>= 0) to the counter of these labels."""
        if amount < 0:
            raise UsageError(f"{self.name}: a counter cannot decrease (amount {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        """The family's lines: one sample per label set."""
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self._value = 0.0

    def set(self, value: float) -> None:
        """Set the value."""
        with self._lock:
            self._value = float(value)

    def add(self, amount: float) -> None:
        """Add `amount` (negative to subtract)."""
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        """The current value."""
        return self._value

    def render(self) -> list[str]:
        """The family's lines."""
        return self.header() + [f"{self.name} {_number(self._value)}"]


class Histogram(_Metric):
    """Observations counted into cumulative `le` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        super().__init__(name, help_text)
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        index = next(i for i, bound in enumerate(self.bounds) if value <= bound)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def render(self) -> list[str]:
        """The family's lines: cumulative buckets, then sum and count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = self.header(), 0
        for bound, count in zip(self.bounds, counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        return lines + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]


class ServerMetrics:
    """The server's metrics: requests by path and status, latency, batch sizes, queue depth, tokens."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self):
        self.requests = Counter("bbsmall_requests_total", "HTTP requests by path and status code "
                                "(499: the client disconnected before the reply).", ("path", "status"))
        self.latency = Histogram("bbsmall_request_duration_seconds",
                                 "Latency of answered chat completions, arrival to reply.", LATENCY_BUCKETS)
        self.batch_size = Histogram("bbsmall_batch_size", "Conversations per generate call.", BATCH_BUCKETS)
        self.generate_seconds = Histogram("bbsmall_generate_duration_seconds", "Duration of one generate call.",
                                          LATENCY_BUCKETS)
        self.queue_depth = Gauge("bbsmall_queue_depth", "Requests waiting for a generate call.")
        self.in_flight = Gauge("bbsmall_requests_in_flight", "Chat completions received and not yet answered.")
        self.ready = Gauge("bbsmall_ready", "1 once warm-up compilation is done and until draining starts.")
        self.prompt_tokens = Counter("bbsmall_prompt_tokens_total", "Context tokens of answered requests.")
        self.generated_tokens = Counter("bbsmall_generated_tokens_total", "Tokens generated for answered requests.")
        self.rejected = Counter("bbsmall_queue_rejections_total", "Requests refused with 503 on a full queue.")
        self.time_to_first_token = Histogram(
            "bbsmall_time_to_first_token_seconds", "Arrival to the first decoded token (the decode engine; a beam "
            "search's whole reply).", TOKEN_BUCKETS)
        self.inter_token_latency = Histogram(
            "bbsmall_inter_token_latency_seconds", "Between consecutive decoded tokens of a streamed reply (the "
            "decode engine hands them out after each step call).", TOKEN_BUCKETS)
        self.slots_in_use = Gauge("bbsmall_slots_in_use", "Decode engine slots holding a request.")
        self.compilations = Counter("bbsmall_xla_compilations_since_ready_total",
                                    "XLA compilations in the server process since warm-up ended (0 when warm-up "
                                    "covered every program requests need).")
        self._compiled: Optional[CompilationCounter] = None
        self._compilations_shown = 0

    def count_compilations(self) -> None:
        """Start counting the process's XLA compilations (when warm-up is done)."""
        self._compiled = CompilationCounter().__enter__()

    def render(self) -> str:
        """All metrics in the Prometheus text format."""
        if self._compiled is not None:  # (rendered on the event loop only)
            count = self._compiled.count
            self.compilations.inc(count - self._compilations_shown)
            self._compilations_shown = count
        families = (self.requests, self.latency, self.batch_size, self.generate_seconds, self.queue_depth,
                    self.in_flight, self.ready, self.prompt_tokens, self.generated_tokens, self.rejected,
                    self.time_to_first_token, self.inter_token_latency, self.slots_in_use, self.compilations)
        return "\n".join(line for family in families for line in family.render()) + "\n"
