"""`bbsmall generate`: JSONL in, JSONL out with a "reply" per record, in input order, committed window by window
(the protocol: `batch_output.py`; the pipeline: `batch_pipeline.py`), by one process or several.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Optional, TextIO

from bbsmall_jax.atomic import atomic_file
from bbsmall_jax.cli.batch_output import check_paths, count_lines
from bbsmall_jax.cli.batch_pipeline import answer

if TYPE_CHECKING:  # the model's stack loads only when a run starts, after the paths are checked
    from bbsmall_jax.runtime.responder import Responder


def shares(total_lines: int, window: int, processes: int) -> list[tuple[int, int]]:
    """Each process's input lines [first, end): whole windows, contiguous, in process order."""
    windows = -(-total_lines // window)
    bounds = [p * windows // processes * window + 1 for p in range(processes + 1)]
    return [(bounds[p], min(bounds[p + 1], total_lines + 1)) for p in range(processes)]


def part_path(output_path: str, process: int, processes: int) -> str:
    """Where process `process` of `processes` writes its share of the output."""
    return f"{output_path}.part-{process:05d}-of-{processes:05d}"


def _merge(parts: list[str], output_path: str) -> None:
    """Concatenate the finished parts into the output atomically, then remove them."""
    with atomic_file(output_path) as tmp, open(tmp, "wb") as joined:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, joined, 1 << 20)
    for part in parts:
        os.remove(part)


def run_batch(responder: Responder, input_path: str, output_path: str, batch_size: int = 32,
              resume: bool = False, overwrite: bool = False, on_error: str = "skip", window: int = 512,
              log: TextIO = sys.stderr, show_progress: bool = True, overlap: bool = True,
              processes: int = 1, process_index: int = 0, barrier=None, engine_steps: Optional[int] = 8) -> dict:
    """Reply to every record of `input_path`, writing `output_path` in input order; returns a summary.

    Blank lines are passed over; a bad line is reported with its number and skipped, or ends the run
    under `on_error="fail"` after committing the replies before it. With several processes each answers
    its share of whole windows into its own part file; after `barrier()` process 0 joins the parts into
    `output_path` (the same bytes as one process writes), so the output must be on a filesystem they all see.
    With `engine_steps` (default) the records flow through the decode engine's `batch_size` slots, `engine_steps`
    decoding steps per call; with None, through static `generate` batches of `batch_size`.
    """
    check_paths(input_path, output_path, resume, overwrite)
    began, compiled = time.perf_counter(), COMPILE_CLOCK.read()
    first, end = shares(count_lines(input_path), window, processes)[process_index]
    target = output_path if processes == 1 else part_path(output_path, process_index, processes)
    if processes > 1 and resume and os.path.exists(output_path) and not os.path.exists(target):
        done = None  # joined by an earlier run
    else:
        done = answer(responder, input_path, target, first, end, batch_size, resume, overwrite, on_error, window,
                      log, show_progress, overlap, engine_steps)
    if processes > 1:
        barrier("bbsmall-generate-parts")
        parts = [part_path(output_path, p, processes) for p in range(processes)]
        if process_index == 0 and all(os.path.exists(p) for p in parts):
            _merge(parts, output_path)
        barrier("bbsmall-generate-joined")
    if done is None:
        print(f"{target} is complete (no unfinished run to resume)", file=log)
        done = {"replies": 0, "skipped": 0, "tokens": 0}
    return _summary(responder, done, time.perf_counter() - began, COMPILE_CLOCK.read() - compiled, processes,
                    output_path, log)


def _summary(responder: Responder, done: dict, seconds: float, compile_s: float, processes: int, output_path: str,
             log: TextIO) -> dict:
    """The run's figures (this process's share), printed as one line."""
    import jax

    from bbsmall_jax.generation.plan import default_path

    summary = {"replies": done["replies"], "skipped": done["skipped"], "seconds": round(seconds, 2),
               "replies_per_s": round(done["replies"] / seconds, 2) if seconds > 0 else None,
               "tokens_per_s": round(done["tokens"] / seconds, 1) if seconds > 0 else None,
               "devices": jax.local_device_count(), "processes": processes,
               "dtype": jax.numpy.dtype(responder.model.dtype).name,
               "decode_path": responder.model.decode_path or default_path(jax.default_backend()),
               "compile_s": round(compile_s, 2)}
    print(f"{summary['replies']} replies in {seconds:.1f} s ({summary['replies_per_s']} replies/s, "
          f"{summary['tokens_per_s']} tokens/s, compile {summary['compile_s']} s) on {summary['devices']} "
          f"device(s), {summary['skipped']} bad lines skipped -> {output_path}", file=log)
    return summary


class _CompileClock:
    """Seconds this process has spent tracing, lowering and compiling JAX programs, from JAX's monitoring
    events (the listener is registered on the first reading, once per process)."""

    def __init__(self):
        self.seconds = 0.0
        self._listening = False

    def _listen(self, name: str, seconds: float, **_) -> None:
        if name.startswith("/jax/core/compile/"):
            self.seconds += seconds

    def read(self) -> float:
        if not self._listening:
            import jax

            jax.monitoring.register_event_duration_secs_listener(self._listen)
            self._listening = True
        return self.seconds


COMPILE_CLOCK = _CompileClock()  # one per process: JAX's listeners cannot be removed
