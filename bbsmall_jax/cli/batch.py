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

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from typing import Iterator, Optional, TextIO

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.cli.responder import Responder
from bbsmall_jax.records import Dialogue, RecordError, decode_line, parse_record, read_lines


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

    def read_progress(self) -> Progress:
        """The sidecar's progress, checked against the output file."""
        try:
            with open(self.sidecar, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self.damaged(f"not valid JSON: {err}") from None
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
        if lines > progress.next_line - 1:
            raise self.damaged(f"{self.path} holds {lines} committed lines, but only {progress.next_line - 1} "
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


def _skip_consumed(lines: Iterator[tuple[int, bytes]], progress: Progress, input_path: str, output: _Output):
    """Hash the input lines the sidecar says were consumed; the running hash, or BatchError if they changed."""
    hasher, seen = hashlib.sha256(), 0
    while seen < progress.next_line - 1:
        item = next(lines, None)
        if item is None:
            raise output.damaged(f"it says {progress.next_line - 1} input lines were read, but {input_path} "
                                 f"has {seen}")
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


def _check_paths(input_path: str, output_path: str) -> None:
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    if os.path.isdir(output_path):
        raise BatchError(f"--output {output_path} is a directory; name a file to write")
    same = os.path.realpath(input_path) == os.path.realpath(output_path) or (
        os.path.exists(output_path) and os.path.samefile(input_path, output_path))
    if same:
        raise BatchError(f"--output {output_path} is the input file {input_path}; write the replies elsewhere")


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


def _reply_lines(responder: Responder, records: list[Dialogue], batch_size: int, reporter: _Reporter) -> bytes:
    """The output lines of records, in input order; replies generated in batches of similar context length."""
    ids = {r.line: responder.context_ids(r.turns) for r in records}
    ordered = sorted(records, key=lambda r: len(ids[r.line]))
    texts: dict[int, str] = {}
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        for record, row in zip(chunk, responder.reply_ids([ids[r.line] for r in chunk])):
            texts[record.line] = responder.decode(row)
        reporter.advance(len(chunk), len(chunk))
    return b"".join((json.dumps({**r.data, "reply": texts[r.line]}, ensure_ascii=False) + "\n").encode("utf-8")
                    for r in records)


def _start(output: _Output, lines: Iterator[tuple[int, bytes]], input_path: str, resume: bool):
    """(progress, running input hash) to continue from, the output rewound to it; None if already complete."""
    if resume and os.path.exists(output.sidecar):
        progress = output.read_progress()
        _check_settings(progress.settings, output)
        hasher = _skip_consumed(lines, progress, input_path, output)
        output.rewind(progress.size)
        return progress, hasher
    if resume and os.fstat(output.file.fileno()).st_size:
        return None
    hasher = hashlib.sha256()
    progress = Progress(1, 0, hasher.hexdigest(), output.settings)
    write_atomic(output.sidecar, progress.to_json())  # before truncating: a kill in between resumes at line 1
    output.rewind(0)
    return progress, hasher


class _Run:
    """The records of the current window, answered and committed together."""

    def __init__(self, responder: Responder, output: _Output, reporter: _Reporter, hasher, batch_size: int):
        self.responder, self.output, self.reporter = responder, output, reporter
        self.hasher, self.batch_size = hasher, batch_size
        self.pending: list[Dialogue] = []
        self.skipped = 0

    def commit(self, next_line: int) -> None:
        """Answer and write the pending records; the input is consumed up to `next_line`."""
        data = _reply_lines(self.responder, self.pending, self.batch_size, self.reporter)
        self.output.commit(data, next_line, self.hasher.hexdigest())
        self.pending.clear()

    def read(self, lines, input_path: str, on_error: str, window: int, next_line: int) -> int:
        """Answer the remaining input lines, a window at a time; returns the line after the last."""
        for number, raw in lines:
            try:
                text = decode_line(raw, f"{input_path}:{number}", first=number == 1)
                record = parse_record(text, number, input_path) if text.strip() else None
            except RecordError as err:
                if on_error == "fail":
                    self.commit(number)
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
            if len(self.pending) >= window:
                self.commit(next_line)
        self.commit(next_line)
        return next_line


def run_batch(responder: Responder, input_path: str, output_path: str, batch_size: int = 32,
              resume: bool = False, overwrite: bool = False, on_error: str = "skip", window: int = 512,
              log: TextIO = sys.stderr, show_progress: bool = True) -> dict:
    """Reply to every record of `input_path`, writing `output_path` in input order; returns a summary.

    Blank lines are passed over; a bad line is reported with its number and skipped, or ends the run
    under `on_error="fail"` after committing the replies before it.
    """
    if resume and overwrite:
        raise BatchError("pass --resume or --overwrite, not both")
    _check_paths(input_path, output_path)
    began = time.perf_counter()
    with _Output(output_path, not (resume or overwrite), responder.settings()) as output:
        lines = read_lines(input_path)
        started = _start(output, lines, input_path, resume)
        if started is None:
            print(f"{output_path} is complete (no unfinished run to resume)", file=log)
            return {"replies": 0, "skipped": 0, "seconds": 0.0, "replies_per_s": None}
        progress, hasher = started
        reporter = _Reporter(log, count_lines(input_path), progress.next_line - 1, show_progress)
        run = _Run(responder, output, reporter, hasher, batch_size)
        try:
            if progress.next_line > 1:
                reporter.say(f"resuming at input line {progress.next_line}")
            run.read(lines, input_path, on_error, window, progress.next_line)
        finally:
            reporter.close()
        os.remove(output.sidecar)
    seconds = time.perf_counter() - began
    replies = reporter.replies
    summary = {"replies": replies, "skipped": run.skipped, "seconds": round(seconds, 2),
               "replies_per_s": round(replies / seconds, 2) if seconds > 0 else None}
    print(f"{replies} replies in {seconds:.1f} s ({summary['replies_per_s']} replies/s), "
          f"{run.skipped} bad lines skipped -> {output_path}", file=log)
    return summary
