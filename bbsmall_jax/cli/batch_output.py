"""`bbsmall generate`'s commit protocol: the output file, its progress sidecar, and resuming.

The protocol, which makes a kill at any moment lose at most the window in progress:

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
from typing import Iterator, Optional

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.errors import UsageError
from bbsmall_jax.jsonfiles import read_json_object


class BatchError(UsageError):
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


class Output:
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

    def __enter__(self) -> "Output":
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
                   output: Output):
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


def _check_settings(before: dict, output: Output) -> None:
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


def start(output: Output, lines: Iterator[tuple[int, bytes]], input_path: str, resume: bool, first: int):
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


