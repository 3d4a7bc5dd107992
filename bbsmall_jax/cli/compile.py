"""`bbsmall compile` and `train.py --compile-only`: compile a program for a TPU topology and report on it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from bbsmall_jax.cli.generation_flags import add_generation_flags, generation_kwargs
from bbsmall_jax.errors import UsageError

TOPOLOGY_HELP = ("a TPU topology as libtpu names it (v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x2) or a pod "
                 "slice (v5e-16, v4-32)")


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """--topology, --devices, --json, --dump (shared with train.py)."""
    parser.add_argument("--topology", required=True, metavar="T", help=TOPOLOGY_HELP)
    parser.add_argument("--devices", type=int, metavar="N",
                        help="compile for the first N devices of the topology (default: all of them; for "
                             "generate, one host's, as each process of `bbsmall generate` runs its own)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--dump", metavar="DIR", help="write the optimized HLO as DIR/PROGRAM.hlo.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bbsmall compile` flags, the generation settings `generate` takes among them."""
    parser.add_argument("program", choices=("train", "generate", "engine-step"),
                        help="train: the train step of --config's largest bucket; generate: batch inference; "
                             "engine-step: the decode engine's decoding step (bbsmall serve), --batch-size slots")
    add_report_flags(parser)
    group = parser.add_argument_group("train")
    group.add_argument("--config", help="training config YAML (as train.py takes)")
    group.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides as train.py takes them (model.FIELD=value for a model field)")
    group = parser.add_argument_group("generate (only the model's config.json is read)")
    group.add_argument("--model", default=None, help="a model directory, a hub id (its configs alone are "
                                                     "fetched or read from the cache), or demo (default)")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="compute dtype (auto: bfloat16 on TPU)")
    group.add_argument("--batch-size", type=int, default=32,
                       help="contexts per generate call, or the engine's slots (default 32)")
    group.add_argument("--engine-steps", type=int, default=8, help="engine-step: decoding steps per call (default 8)")
    group.add_argument("--source-length", type=int, default=64, help="context tokens (default 64)")
    group.add_argument("--max-new-tokens", type=int, help="reply tokens (default: the model's max_length)")
    add_generation_flags(parser)


def run(args: argparse.Namespace) -> int:
    """`bbsmall compile PROGRAM ...`."""
    from bbsmall_jax.aot import programs
    from bbsmall_jax.aot.topology import load

    if args.program == "train":
        if not args.config:
            raise UsageError("compile train needs --config YAML (the training config to compile)")
        cfg = _train_config(args.config, args.overrides)
        return _report(lambda: programs.lower_train(cfg, load(args.topology), args.devices), args)
    if args.overrides or args.config:
        raise UsageError("--config and key=value overrides are for `compile train`")
    kwargs = _generation_settings(args)
    topology = load(args.topology)
    if args.program == "engine-step":
        return _report(lambda: programs.lower_engine_step(args.model, topology, args.devices, args.batch_size,
                                                          args.source_length, args.engine_steps, args.dtype,
                                                          **kwargs), args)
    return _report(lambda: programs.lower_generate(args.model, topology, args.devices, args.batch_size,
                                                   args.source_length, args.dtype, **kwargs), args)


def run_train_config(cfg, args: argparse.Namespace) -> int:
    """`train.py --compile-only --topology T`: the run's train step, compiled and reported."""
    from bbsmall_jax.aot import programs
    from bbsmall_jax.aot.topology import load

    return _report(lambda: programs.lower_train(cfg, load(args.topology), args.devices), args)


def _train_config(path: str, overrides: list[str]):
    from bbsmall_jax.train.config import load_config, parse_override

    return load_config(path, dict(parse_override(item) for item in overrides))


def _generation_settings(args: argparse.Namespace) -> dict:
    """The generation keyword arguments the flags set (the sampling seed does not change the program)."""

    kwargs = generation_kwargs(args)
    kwargs.pop("prng_key", None)
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        kwargs["max_new_tokens"] = args.max_new_tokens
    return kwargs


def _report(lower, args: argparse.Namespace) -> int:
    from bbsmall_jax.aot.report import compile_and_report

    report = compile_and_report(lower())
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        path = os.path.join(args.dump, f"{report.program}.hlo.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(report.hlo_text)
        print(f"wrote the optimized HLO to {path}", file=sys.stderr)
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0
