"""Atomic writes: a file or a directory is written beside its destination and renamed over it when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator, Union


def _fsync_directory(directory: str) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a new temporary file's path beside `path` (a unique name, so concurrent writers of one path do not
    meet); when the block succeeds it is synced and renamed onto `path`."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # the writer creates it: umask modes
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(os.path.dirname(path))


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes]) -> str:
    """Write text (UTF-8) or bytes to `path` so that readers see the old content or all of the new; returns it."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return os.fspath(path)


@contextlib.contextmanager
def atomic_directory(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield an empty temporary directory beside `path`; when the block succeeds it replaces `path`.

    An existing `path` is moved aside first and deleted only once the new directory is in place.
    """
    path = os.fspath(path).rstrip(os.sep)
    tmp, old = f"{path}.tmp", f"{path}.old"
    if os.path.isdir(old) and not os.path.exists(path):  # a run killed between the two renames below
        os.replace(old, path)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(os.path.dirname(path))
