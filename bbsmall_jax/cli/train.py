"""The training command line (`python train.py ...`, reused by `bbsmall train`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from bbsmall_jax.cli import distributed
from bbsmall_jax.cli.compile import TOPOLOGY_HELP
from bbsmall_jax.errors import COMMAND_ERRORS

# flag -> config key; each flag overrides the YAML value
FLAG_KEYS = {"max_steps": "max_steps", "save_every": "save_every", "log_every": "log_every",
             "eval_every": "eval_every", "seed": "seed", "init": "init", "data": "data"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 143


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The argument parser (bad flags exit with status 2 and a usage message)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train or fine-tune BlenderbotSmall; rerunning the same command resumes.",
        epilog="Overrides: key=value for any config key, model.FIELD=value for a model field "
               "(e.g. learning_rate=3e-4 model.dropout=0.0).")
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("--output-dir", help="checkpoints, metrics.jsonl and the final model go here (required "
                                             "unless --compile-only)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train for (the config's max_steps)")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps")
    parser.add_argument("--log-every", type=int, help="write metrics.jsonl (and the progress bar's loss) every N steps")
    parser.add_argument("--eval-every", type=int, help="evaluate on the validation split every N steps")
    parser.add_argument("--seed", type=int, help="the seed of initialisation, data order, split and dropout")
    parser.add_argument("--init", help="pretrained model directory or hub id to start from")
    parser.add_argument("--data", help="'chitchat' or a JSONL file of dialogue examples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_flags(parser)
    group = parser.add_argument_group("compile only (no data, no output directory; see `bbsmall compile`)")
    group.add_argument("--compile-only", action="store_true",
                       help="compile the train step for --topology and report on it instead of training")
    group.add_argument("--topology", metavar="T", help=TOPOLOGY_HELP)
    group.add_argument("--devices", type=int, metavar="N", help="the first N devices of the topology (default all)")
    group.add_argument("--json", action="store_true", help="print the report as one JSON object")
    group.add_argument("--dump", metavar="DIR", help="write the optimized HLO as DIR/train.hlo.txt")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, model.FIELD=value for a model field")
    return parser


def parse_config(args: argparse.Namespace):
    """The TrainConfig of parsed arguments: YAML, then key=value overrides, then flags."""
    from bbsmall_jax.train.config import load_config, parse_override

    overrides = dict(parse_override(item) for item in args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.no_progress:
        overrides["progress"] = False
    return load_config(args.config, overrides)


def check_data_paths(cfg) -> None:
    """DataError before anything starts when `data` or `valid_data` names no file and no shards."""
    from bbsmall_jax.train.corpus import find_shards, is_sharded
    from bbsmall_jax.train.data import DataError

    for path in (cfg.data, cfg.valid_data):
        if path is None or path == "chitchat":
            continue
        if is_sharded(path):
            find_shards(path)
        elif not os.path.isfile(path):
            raise DataError(f"cannot read data file {path}: no such file")


def main(argv: Optional[Sequence[str]] = None, prog: str = "train.py") -> int:
    """Run the command; returns the exit status (0 done, 1 failed, 2 bad usage/config/data, 143 stopped)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from bbsmall_jax.train.data import DataError
    from bbsmall_jax.train.config import ConfigError

    if args.compile_only != (args.topology is not None):
        parser.error("--compile-only and --topology go together")
    if not args.compile_only and args.output_dir is None:
        parser.error("the following arguments are required: --output-dir")
    try:
        cfg = parse_config(args)
        if args.compile_only:
            return _compile_only(cfg, args, prog)
        check_data_paths(cfg)
    except (ConfigError, DataError) as err:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    distributed.initialize(args)
    from bbsmall_jax.train.loop import TrainingError, train

    try:
        result = train(cfg, args.output_dir)
    except COMMAND_ERRORS as err:  # bad config, data or files
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if result.status == "completed" else EXIT_STOPPED


def _compile_only(cfg, args: argparse.Namespace, prog: str) -> int:
    from bbsmall_jax.cli.compile import run_train_config

    try:
        return run_train_config(cfg, args)
    except COMMAND_ERRORS as err:  # a bad topology, an unreadable init, a batch the devices do not divide
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
