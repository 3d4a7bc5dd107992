"""`bbsmall generate`: JSONL in, JSONL out with a "reply" per record, in input order, committed window by window.

The commit protocol, which makes a kill at any moment lose at most the window in progress:

1. the output is locked (`flock`) for the whole run, so a second writer is refused;
2. a window's lines are written after the committed size of the output, flushed and `fsync`ed;
3. only then is the sidecar `OUTPUT.progress.json` replaced atomically: the next input line, the
   committed size, a hash of the input lines consumed so far and the settings the replies depend on;
4. `--resume` first checks the sidecar against both files (the size exists and ends a line, the last
   committed line is a reply record, no more lines than inputs read, the input's consumed lines are
   unchanged) and the settings, touching nothing when a check fails; then it truncates the output to
   the committed size through the descriptor it writes with, so the next window starts exactly there.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Optional, TextIO

from bbsmall_jax.atomic import atomic_file, write_atomic
from bbsmall_jax.jsonfiles import read_json_object
from bbsmall_jax.records import Dialogue, RecordError, decode_line, parse_record, read_lines

if TYPE_CHECKING:  # the model's stack loads only when a run starts, after the paths are checked
    from bbsmall_jax.runtime.responder import Responder


class BatchError(ValueError):
    """A run that cannot start safely; the message names the file, and nothing was changed."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the sidecar records: everything before `next_line` is in the first `size` bytes of the output."""

    next_line: int
    size: int
    input_sha256: str  # of the raw input lines before next_line
    settings: dict  # what the replies depend on (`Responder.settings`): a resume must use the same

    def to_json(self) -> str:
        return json.dumps({"next_line": self.next_line, "bytes": self.size, "input_sha256": self.input_sha256,
                           "settings": self.settings})

    @classmethod
    def from_json_data(cls, data) -> Optional["Progress"]:
        """The progress a sidecar's JSON holds, None when it holds something else."""
        if not isinstance(data, dict) or set(data) != {"next_line", "bytes", "input_sha256", "settings"}:
            return None
        next_line, size = data["next_line"], data["bytes"]
        if type(next_line) is not int or type(size) is not int or next_line < 1 or size < 0:
            return None
        if not isinstance(data["input_sha256"], str) or not isinstance(data["settings"], dict):
            return None
        return cls(next_line, size, data["input_sha256"], data["settings"])


def _scan(path: str, size: Optional[int] = None) -> tuple[int, bytes]:
    """(newline count, last line) of the first `size` bytes of a file (all of it by default)."""
    count, tail = 0, b""
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size if size is None else size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            count += chunk.count(b"\n")
            tail += chunk
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                tail = tail[cut + 1:]
    return count, tail


def count_lines(path: str) -> int:
    """Lines of a file, a last line without a newline included."""
    count, tail = _scan(path)
    return count + (1 if tail and not tail.endswith(b"\n") else 0)


class _Output:
    """The output file, locked by this run, and its sidecar."""

    def __init__(self, path: str, create_only: bool, settings: dict):
        self.path, self.sidecar, self.settings = path, path + ".progress.json", settings
        flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if create_only else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; pass --resume to continue it or --overwrite to replace it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchError(f"{path} is being written by another `bbsmall generate` run, which holds its lock; "
                             "wait for that run to end") from None
        self.file = os.fdopen(fd, "r+b")

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # releases the lock

    def damaged(self, why: str) -> BatchError:
        return BatchError(f"{self.sidecar}: damaged progress file ({why}); {self.path} is left untouched. "
                          "Fix or delete the progress file, or pass --overwrite instead of --resume to start over")

    def read_progress(self, first: int) -> Progress:
        """The sidecar's progress, checked against the output file (this run reads input lines from `first`)."""
        try:
            data = read_json_object(self.sidecar)
        except ValueError as err:
            raise self.damaged(str(err).removeprefix(f"{self.sidecar}").lstrip(":, ")) from None
        progress = Progress.from_json_data(data)
        if progress is None:
            raise self.damaged(f"expected {{\"next_line\": >= 1, \"bytes\": >= 0, \"input_sha256\": ..., "
                               f"\"settings\": {{...}}}}, got {json.dumps(data)[:120]}")
        size = os.fstat(self.file.fileno()).st_size
        if progress.size > size:
            raise self.damaged(f"it records {progress.size} committed bytes, but {self.path} holds {size}")
        lines, last = _scan(self.path, progress.size)
        if progress.size and not last.endswith(b"\n"):
            raise self.damaged(f"byte {progress.size} of {self.path} is not the end of a line")
        if progress.next_line < first:
            raise self.damaged(f"it resumes at input line {progress.next_line}, before line {first} where this "
                               "run's share of the input starts (same --window and process count as before?)")
        if lines > progress.next_line - first:
            raise self.damaged(f"{self.path} holds {lines} committed lines, but only {progress.next_line - first} "
                               "input lines were read")
        if progress.size and not _is_reply(last):
            raise self.damaged(f"the last committed line of {self.path}, line {lines}, is not a reply record")
        return progress

    def rewind(self, size: int) -> None:
        """Drop everything after `size` bytes and write from there."""
        self.file.truncate(size)
        self.file.seek(size)
        os.fsync(self.file.fileno())

    def commit(self, data: bytes, next_line: int, input_sha256: str) -> None:
        """Append `data`, make it durable, then record the new committed size."""
        self.file.write(data)
        self.file.flush()
        os.fsync(self.file.fileno())
        write_atomic(self.sidecar, Progress(next_line, self.file.tell(), input_sha256, self.settings).to_json())


def _is_reply(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and isinstance(record.get("reply"), str)


def _skip_consumed(lines: Iterator[tuple[int, bytes]], progress: Progress, first: int, input_path: str,
                   output: _Output):
    """Hash the input lines the sidecar says were consumed; the running hash, or BatchError if they changed."""
    hasher, seen = hashlib.sha256(), 0
    while seen < progress.next_line - first:
        item = next(lines, None)
        if item is None:
            raise output.damaged(f"it says input lines {first} to {progress.next_line - 1} were read, but "
                                 f"{input_path} has {first - 1 + seen}")
        hasher.update(item[1])
        seen += 1
    if hasher.hexdigest() != progress.input_sha256:
        raise BatchError(f"{input_path} changed since {output.path} was started: its first {seen} lines differ "
                         "from the ones already answered; pass --overwrite instead of --resume to start over")
    return hasher


def _check_settings(before: dict, output: _Output) -> None:
    """Refuse to resume with settings that change the replies (another model, other generation flags)."""
    changed = sorted(k for k in set(before) | set(output.settings) if before.get(k) != output.settings.get(k))
    if changed:
        described = "; ".join(f"{k}: {json.dumps(before.get(k))[:80]} then, {json.dumps(output.settings.get(k))[:80]} "
                              "now" for k in changed)
        raise BatchError(f"{output.path} was started with other settings ({described}); resume with the same "
                         "model and flags, or pass --overwrite instead of --resume to start over")


def check_paths(input_path: str, output_path: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse paths that cannot work, naming them; cheap, so `bbsmall generate` runs it before the model loads."""
    if resume and overwrite:
        raise BatchError("pass --resume or --overwrite, not both")
    if os.path.isdir(input_path):
        raise BatchError(f"--input {input_path} is a directory; name a JSONL file")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    if os.path.isdir(output_path):
        raise BatchError(f"--output {output_path} is a directory; name a file to write")
    exists = os.path.exists(output_path)
    if exists and not os.path.isfile(output_path):
        raise BatchError(f"--output {output_path} is not a regular file (a device, pipe or socket); name a file "
                         "to write, which its progress file can sit beside")
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {output_path}: no such directory {folder}")
    if os.path.realpath(input_path) == os.path.realpath(output_path) or (
            exists and os.path.samefile(input_path, output_path)):
        raise BatchError(f"--output {output_path} is the input file {input_path}; write the replies elsewhere")
    if exists and not (resume or overwrite):
        raise FileExistsError(f"{output_path} exists; pass --resume to continue it or --overwrite to replace it")


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


def _start(output: _Output, lines: Iterator[tuple[int, bytes]], input_path: str, resume: bool, first: int):
    """(progress, running input hash) to continue from, the output rewound to it; None if already complete."""
    if resume and os.path.exists(output.sidecar):
        progress = output.read_progress(first)
        _check_settings(progress.settings, output)
        hasher = _skip_consumed(lines, progress, first, input_path, output)
        output.rewind(progress.size)
        return progress, hasher
    if resume and os.fstat(output.file.fileno()).st_size:
        return None
    hasher = hashlib.sha256()
    progress = Progress(first, 0, hasher.hexdigest(), output.settings)
    write_atomic(output.sidecar, progress.to_json())  # before truncating: a kill in between resumes at the start
    output.rewind(0)
    return progress, hasher


class _Run:
    """Windows of input lines, read and tokenized here, generated on a device thread, committed in order.

    With `overlap`, window k+1 is read, tokenized and queued while the device decodes window k, and window
    k-1 is decoded to text and committed meanwhile; without it each window is finished before the next.
    """

    def __init__(self, responder: Responder, output: _Output, reporter: _Reporter, hasher, batch_size: int,
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


def shares(total_lines: int, window: int, processes: int) -> list[tuple[int, int]]:
    """Each process's input lines [first, end): whole windows, contiguous, in process order."""
    windows = -(-total_lines // window)
    bounds = [p * windows // processes * window + 1 for p in range(processes + 1)]
    return [(bounds[p], min(bounds[p + 1], total_lines + 1)) for p in range(processes)]


def part_path(output_path: str, process: int, processes: int) -> str:
    """Where process `process` of `processes` writes its share of the output."""
    return f"{output_path}.part-{process:05d}-of-{processes:05d}"


def _answer(responder: Responder, input_path: str, output_path: str, first: int, end: int, batch_size: int,
            resume: bool, overwrite: bool, on_error: str, window: int, log: TextIO, show_progress: bool,
            overlap: bool) -> Optional[dict]:
    """Reply to input lines [first, end) into `output_path` under the commit protocol; None if already done."""
    with _Output(output_path, not (resume or overwrite), responder.settings()) as output:
        lines = ((n, raw) for n, raw in read_lines(input_path) if first <= n < end)
        started = _start(output, lines, input_path, resume, first)
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
              processes: int = 1, process_index: int = 0, barrier=None) -> dict:
    """Reply to every record of `input_path`, writing `output_path` in input order; returns a summary.

    Blank lines are passed over; a bad line is reported with its number and skipped, or ends the run
    under `on_error="fail"` after committing the replies before it. With several processes each answers
    its share of whole windows into its own part file; after `barrier()` process 0 joins the parts into
    `output_path` (the same bytes as one process writes), so the output must be on a filesystem they all see.
    """
    check_paths(input_path, output_path, resume, overwrite)
    began, compiled = time.perf_counter(), COMPILE_CLOCK.read()
    first, end = shares(count_lines(input_path), window, processes)[process_index]
    target = output_path if processes == 1 else part_path(output_path, process_index, processes)
    if processes > 1 and resume and os.path.exists(output_path) and not os.path.exists(target):
        done = None  # joined by an earlier run
    else:
        done = _answer(responder, input_path, target, first, end, batch_size, resume, overwrite, on_error, window,
                       log, show_progress, overlap)
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

    from bbsmall_jax.generation.plan import requested_path

    summary = {"replies": done["replies"], "skipped": done["skipped"], "seconds": round(seconds, 2),
               "replies_per_s": round(done["replies"] / seconds, 2) if seconds > 0 else None,
               "tokens_per_s": round(done["tokens"] / seconds, 1) if seconds > 0 else None,
               "devices": jax.local_device_count(), "processes": processes,
               "dtype": jax.numpy.dtype(responder.model.dtype).name,
               "decode_path": requested_path(jax.default_backend()), "compile_s": round(compile_s, 2)}
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
