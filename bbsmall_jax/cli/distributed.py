"""The multi-process flags shared by `bbsmall generate` and `train.py`, and JAX's distributed runtime."""

from __future__ import annotations

import argparse

from bbsmall_jax.errors import UsageError


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator, --num-processes, --process-id."""
    group = parser.add_argument_group("multi-process (one process per host; see README)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")


def check_flags(args: argparse.Namespace) -> None:
    """Raise ValueError for an inconsistent set of flags (before JAX is imported)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in explicit) and any(value is None for value in explicit):
        raise UsageError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")


def initialize(args: argparse.Namespace) -> None:
    """Join the distributed runtime when the flags ask for it."""
    import jax

    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
