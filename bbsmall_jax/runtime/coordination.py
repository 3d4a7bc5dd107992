"""Several processes of one run: printing once, and waiting for each other."""

from __future__ import annotations

import sys

import jax


def say(message: str) -> None:
    """Print on process 0 (through tqdm, so progress bars stay intact)."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def barrier(name: str) -> None:
    """Wait for every process (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
