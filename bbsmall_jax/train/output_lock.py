"""One run per output directory: a train.py run holds `flock` on `<output_dir>/.train.lock` while it runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

LOCK_NAME = ".train.lock"


class OutputInUseError(OSError):
    """Another run holds the output directory."""


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold the directory's lock for the block, or raise OutputInUseError naming the run that holds it.

    The kernel drops the lock when the holder exits, however it exits, so a killed run leaves none behind.
    """
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputInUseError(f"{output_dir} is in use by another train.py run (process {holder}), which may "
                                   "still be saving a checkpoint; wait for it to end or pick another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
