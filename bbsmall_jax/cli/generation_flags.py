"""The generation flags that chat, generate, serve and compile share, and the `generate` arguments they set."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from bbsmall_jax.errors import UsageError

DECODE_PATH_VARIABLE = "BBSMALL_DECODE_PATH"  # the decoding path for every command that does not pass the flag


def add_decode_path_flag(parser: argparse.ArgumentParser) -> None:
    """`--decode-path`: which of generation's decoding paths the command's model decodes on."""
    parser.add_argument("--decode-path", choices=("portable", "cpu"), default=None,
                        help=f"decoding path (default: ${DECODE_PATH_VARIABLE}, else cpu on the CPU backend and "
                             "portable on GPU and TPU); both give the same tokens")


def decode_path(args: argparse.Namespace) -> Optional[str]:
    """The decoding path asked for: `--decode-path`, else `BBSMALL_DECODE_PATH` (read here, once per command),
    else None (the backend's own); ValueError naming the variable for a value that is not a path."""
    from bbsmall_jax.generation.plan import checked_path

    flag = getattr(args, "decode_path", None)
    return flag if flag else checked_path(os.environ.get(DECODE_PATH_VARIABLE), DECODE_PATH_VARIABLE)


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `generate`'s settings, in their own group of `parser`'s help."""
    group = parser.add_argument_group("generation (defaults: the model's generation_config.json)")
    group.add_argument("--num-beams", type=int, help="beam width (1 = greedy)")
    group.add_argument("--max-length", type=int, help="longest reply in tokens, start token included")
    group.add_argument("--min-length", type=int, help="shortest reply in tokens, start token included")
    group.add_argument("--sample", action="store_true", help="sample instead of beam/greedy search")
    group.add_argument("--temperature", type=float, help="sampling temperature")
    group.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    group.add_argument("--top-p", type=float, help="sample within the top-p probability mass")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The `generate` keyword arguments that the flags set (unset flags keep the model's defaults)."""
    kwargs = {name: getattr(args, name) for name in ("num_beams", "max_length", "min_length", "temperature",
                                                     "top_k", "top_p") if getattr(args, name) is not None}
    if args.sample:
        import jax

        kwargs.update(do_sample=True, prng_key=jax.random.PRNGKey(args.seed))
        kwargs.setdefault("num_beams", 1)
    elif any(name in kwargs for name in ("temperature", "top_k", "top_p")):
        raise UsageError("--temperature/--top-k/--top-p only apply with --sample")
    return kwargs
