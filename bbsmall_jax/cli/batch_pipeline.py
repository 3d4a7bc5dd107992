"""`bbsmall generate`'s pipeline: windows of input lines read and tokenized on the main thread, generated on a
device thread, decoded and committed in input order (`batch_output.py`'s protocol), with progress reports."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional, TextIO

from bbsmall_jax.cli.batch_output import Output, start
from bbsmall_jax.records import Dialogue, RecordError, decode_line, parse_record, read_lines

if TYPE_CHECKING:  # the model's stack loads only when a run starts, after the paths are checked
    from bbsmall_jax.runtime.responder import Responder


class _Reporter:
    """The progress bar (optional) and messages that never overwrite it."""

    def __init__(self, log: TextIO, total: int, done: int, show: bool):
        self.log, self.bar, self.began, self.replies = log, None, time.perf_counter(), 0
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="line", file=log, dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.log)
        else:
            print(message, file=self.log)

    def advance(self, lines: int, replies: int = 0) -> None:
        self.replies += replies
        if self.bar is not None:
            self.bar.update(lines)
            if replies:
                self.bar.set_postfix(replies_per_s=f"{self.replies / (time.perf_counter() - self.began):.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class _Window:
    """A window's records on their way: chunks being generated on the device thread, then committed."""

    records: list[Dialogue]
    next_line: int  # the input line after the window
    input_sha256: str  # of the input lines consumed through the window
    chunks: list[tuple[list[Dialogue], Future]]

    def output(self, responder: Responder, reporter: _Reporter) -> tuple[bytes, int]:
        """(the window's output lines in input order, tokens generated), once its chunks are done."""
        texts, tokens = {}, 0
        for chunk, future in self.chunks:
            for record, replies in zip(chunk, future.result()):  # the first (best) reply of each record
                texts[record.line] = replies[0].text
                tokens += len(replies[0].token_ids)
            reporter.advance(len(chunk), len(chunk))
        data = b"".join((json.dumps({**r.data, "reply": texts[r.line]}, ensure_ascii=False) + "\n").encode("utf-8")
                        for r in self.records)
        return data, tokens


class _Run:
    """Windows of input lines, read and tokenized here, generated on a device thread, committed in order.

    With `overlap`, window k+1 is read, tokenized and queued while the device decodes window k, and window
    k-1 is decoded to text and committed meanwhile; without it each window is finished before the next.
    """

    def __init__(self, responder: Responder, output: Output, reporter: _Reporter, hasher, batch_size: int,
                 overlap: bool):
        self.responder, self.output, self.reporter = responder, output, reporter
        self.hasher, self.batch_size, self.overlap = hasher, batch_size, overlap
        self.device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.pending: list[Dialogue] = []
        self.in_flight: collections.deque[_Window] = collections.deque()
        self.skipped = self.tokens = 0

    def submit(self, next_line: int) -> None:
        """Queue the pending records for generation, in batches of similar context length."""
        ids = {r.line: self.responder.context_ids(r.turns) for r in self.pending}
        ordered = sorted(self.pending, key=lambda r: len(ids[r.line]))
        chunks = [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        self.in_flight.append(_Window(self.pending, next_line, self.hasher.hexdigest(), [
            (chunk, self.device.submit(self.responder.replies, [ids[r.line] for r in chunk])) for chunk in chunks]))
        self.pending = []
        self.finish(keep=1 if self.overlap else 0)

    def finish(self, keep: int = 0) -> None:
        """Commit the oldest windows in flight until at most `keep` remain."""
        while len(self.in_flight) > keep:
            window = self.in_flight.popleft()
            data, tokens = window.output(self.responder, self.reporter)
            self.output.commit(data, window.next_line, window.input_sha256)
            self.tokens += tokens

    def read(self, lines, input_path: str, on_error: str, window: int, next_line: int) -> int:
        """Answer the remaining input lines, `window` lines at a time; returns the line after the last."""
        window_end = next_line + window
        try:
            for number, raw in lines:
                try:
                    text = decode_line(raw, f"{input_path}:{number}", first=number == 1)
                    record = parse_record(text, number, input_path) if text.strip() else None
                except RecordError as err:
                    if on_error == "fail":
                        self.submit(number)
                        self.finish()
                        raise RecordError(f"{err} (the replies before it are committed: fix the line and rerun "
                                          "with --resume)") from None
                    self.skipped += 1
                    self.reporter.say(f"skipped {err}")
                    record = None
                self.hasher.update(raw)
                next_line = number + 1
                if record is None:
                    self.reporter.advance(1)
                else:
                    self.pending.append(record)
                if next_line >= window_end:
                    self.submit(next_line)
                    window_end = next_line + window
            self.submit(next_line)
            self.finish()
        finally:
            self.device.shutdown(wait=True, cancel_futures=True)
        return next_line


def answer(responder: Responder, input_path: str, output_path: str, first: int, end: int, batch_size: int,
            resume: bool, overwrite: bool, on_error: str, window: int, log: TextIO, show_progress: bool,
            overlap: bool) -> Optional[dict]:
    """Reply to input lines [first, end) into `output_path` under the commit protocol; None if already done."""
    with Output(output_path, not (resume or overwrite), responder.settings()) as output:
        lines = ((n, raw) for n, raw in read_lines(input_path) if first <= n < end)
        started = start(output, lines, input_path, resume, first)
        if started is None:
            return None
        progress, hasher = started
        reporter = _Reporter(log, end - first, progress.next_line - first, show_progress)
        run = _Run(responder, output, reporter, hasher, batch_size, overlap)
        try:
            if progress.next_line > first:
                reporter.say(f"resuming at input line {progress.next_line}")
            run.read(lines, input_path, on_error, window, progress.next_line)
        finally:
            reporter.close()
        os.remove(output.sidecar)
    return {"replies": reporter.replies, "skipped": run.skipped, "tokens": run.tokens}


