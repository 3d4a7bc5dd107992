"""The `bbsmall` command: chat, generate (batch inference), serve, eval, convert, compile, train, info, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from bbsmall_jax import startup_cache
from bbsmall_jax.cli import distributed
from bbsmall_jax.cli.compile import add_arguments as add_compile_arguments
from bbsmall_jax.cli.convert import add_arguments as add_convert_arguments
from bbsmall_jax.cli.generation_flags import add_decode_path_flag, add_generation_flags, decode_path, generation_kwargs
from bbsmall_jax.errors import COMMAND_ERRORS, UsageError
from bbsmall_jax.runtime.models import NAMES_HELP
from bbsmall_jax.serve import flags as serve_flags



def _add_model_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=f"{NAMES_HELP}; default: demo")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    add_decode_path_flag(parser)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    _add_model_choice(parser)
    parser.add_argument("--turn-separator", type=_separator, default="newline", metavar="{newline,end_start}",
                        help="how turns are joined: a newline (ParlAI, default) or '__end__ __start__'")
    parser.add_argument("--max-context", type=int, default=None,
                        help="context tokens kept (oldest turns dropped first), at most the model's "
                             "positions; default: all of them")


def _separator(value: str) -> str:
    from bbsmall_jax.records import separator_name

    try:
        return separator_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _responder(args: argparse.Namespace):
    from bbsmall_jax.runtime.models import model_directory
    from bbsmall_jax.records import SEPARATORS

    directory = model_directory(args.model)  # a missing model and flag errors show before JAX loads
    kwargs = generation_kwargs(args)
    from bbsmall_jax.runtime.responder import Responder, enable_compilation_cache, load_chat_model

    enable_compilation_cache()
    model, tokenizer = load_chat_model(directory, args.dtype, decode_path(args))
    return Responder(model, tokenizer, kwargs, args.max_context, SEPARATORS[args.turn_separator])


def cmd_chat(args: argparse.Namespace) -> int:
    if args.once is not None and not args.once.strip():
        raise UsageError("empty message: --once needs some text")
    responder = _responder(args)
    from bbsmall_jax.cli.chat import ChatSession, run_repl

    session = ChatSession(responder)
    if args.once is not None:
        print(session.send(args.once))
        return 0
    return run_repl(session)


def cmd_generate(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "window", "engine_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    from bbsmall_jax.cli.batch import check_paths, run_batch

    check_paths(args.input, args.output, args.resume, args.overwrite)  # before the model loads
    distributed.check_flags(args)
    distributed.initialize(args)
    import jax

    from bbsmall_jax.runtime.coordination import barrier
    from bbsmall_jax.runtime.engine_runner import resolve_scheduler

    summary = run_batch(_responder(args), args.input, args.output, batch_size=args.batch_size,
                        resume=args.resume, overwrite=args.overwrite, on_error=args.on_error,
                        window=args.window, show_progress=not args.quiet and jax.process_index() == 0,
                        overlap=not args.no_overlap, processes=jax.process_count(),
                        process_index=jax.process_index(), barrier=barrier,
                        engine_steps=args.engine_steps if resolve_scheduler(args.scheduler) == "engine" else None)
    if args.summary_json:
        print(json.dumps(summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bbsmall_jax.runtime.models import model_directory

    serve_flags.check_flags(args)
    model_directory(args.model)  # a missing model and flag errors show before JAX loads
    generation_kwargs(args)
    from bbsmall_jax.serve.server import serve

    return serve(args, lambda: _responder(args))


def cmd_eval(args: argparse.Namespace) -> int:
    from bbsmall_jax.cli import evaluate

    evaluate.check_flags(args)
    return evaluate.run(args)


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    _add_model_choice(parser)
    parser.add_argument("--data", required=True, metavar="chitchat|PATH.jsonl",
                        help="chitchat: the held-out split that train.py makes of the chitchat corpus (see "
                             "--valid-fraction, --seed); or a JSONL file of dialogue records, all of them used")
    parser.add_argument("--max-examples", type=int, help="evaluate the first N examples only (default: all)")
    parser.add_argument("--max-generate", type=int, default=100,
                        help="replies generated, with the model's generation_config.json, for distinct-n and "
                             "length (the first N examples; 0 skips generation; default 100)")
    parser.add_argument("--candidates", type=int, default=20,
                        help="hits@1 ranks each true reply among this many: itself and random other replies "
                             "(default 20)")
    parser.add_argument("--hits-examples", type=int, default=500,
                        help="examples ranked for hits@1, a sample drawn with --seed (0: all; each scores "
                             "--candidates replies, 20 times the work of perplexity; default 500)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="contexts per hits@1 batch (times --candidates decoder rows; perplexity batches take "
                             "that many rows too) and per generate call (default 8)")
    group = parser.add_argument_group("as training tokenizes and splits (default: the run's train_config.yaml "
                                      "beside a train.py final/ model, else configs/demo.yaml's values)")
    group.add_argument("--max-source-length", type=int,
                       help="context tokens kept, oldest turns dropped first (else 64; at most the model's positions)")
    group.add_argument("--max-target-length", type=int,
                       help="reply tokens scored, __end__ included (else 32; at most the model's positions)")
    group.add_argument("--turn-separator", type=_separator, default=None, metavar="{newline,end_start}",
                       help="how context turns are joined (else newline)")
    group.add_argument("--valid-fraction", type=float,
                       help="--data chitchat: the share of conversations held out (else 0.02)")
    group.add_argument("--seed", type=int, help="--data chitchat: the split's seed; also the draw of the hits@1 "
                                                "sample and its distractors (else 0)")
    parser.add_argument("--summary-json", action="store_true", help="print the figures as JSON on the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_convert(args: argparse.Namespace) -> int:
    from bbsmall_jax.cli.convert import run

    return run(args)


def cmd_compile(args: argparse.Namespace) -> int:
    from bbsmall_jax.cli import compile as compile_cli

    return compile_cli.run(args)


def cmd_info(args: argparse.Namespace) -> int:
    from bbsmall_jax.cli.info import main as info_main

    return info_main(args.dtype, decode_path(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbsmall", description="BlenderbotSmall in JAX: chat, batch "
                                     "inference, serving, evaluation, conversion, training, benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_model_flags(chat)
    add_generation_flags(chat)
    chat.add_argument("--once", metavar="TEXT", help="answer one message and exit")
    chat.set_defaults(run=cmd_chat)

    generate = commands.add_parser("generate", help="batch inference over a JSONL file")
    _add_model_flags(generate)
    add_generation_flags(generate)
    generate.add_argument("--input", required=True, help='JSONL, one {"context": [...]} or {"text": ...} per line')
    generate.add_argument("--output", required=True, help='JSONL written in input order, "reply" added')
    generate.add_argument("--scheduler", choices=("auto", "engine", "batch"), default="auto",
                          help="engine: records flow through decode slots, each starting when one is free; batch: "
                               "whole generate calls of similar-length records; auto (default): engine on GPU and "
                               "TPU, batch on the CPU")
    generate.add_argument("--batch-size", type=int, default=32,
                          help="engine: its slots; batch: conversations per generate call, padded to a power of "
                               "two and to a multiple of the devices (default 32)")
    generate.add_argument("--engine-steps", type=int, default=8,
                          help="engine: decoding steps per program call (default 8)")
    generate.add_argument("--window", type=int, default=512,
                          help="input lines sorted by length and committed together (default 512): a kill "
                               "loses at most one window")
    generate.add_argument("--resume", action="store_true",
                          help="continue an interrupted run (checked against OUTPUT.progress.json)")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    generate.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                          help="a malformed line is reported and skipped (default) or stops the run")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.add_argument("--no-overlap", action="store_true",
                          help="finish each window before reading the next (by default the host reads, tokenizes "
                               "and writes while the device decodes)")
    generate.add_argument("--summary-json", action="store_true", help="print the throughput summary as JSON")
    distributed.add_flags(generate)
    generate.set_defaults(run=cmd_generate)

    serve = commands.add_parser("serve", help="OpenAI-compatible chat server with dynamic batching, metrics and "
                                "a web chat page")
    _add_model_flags(serve)
    add_generation_flags(serve)
    serve_flags.add_flags(serve)
    serve.set_defaults(run=cmd_serve)

    evaluation = commands.add_parser("eval", help="perplexity, token accuracy, hits@1/20 and distinct-n of a model "
                                     "on held-out dialogue (ParlAI's eval_model)")
    _add_eval_flags(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    convert = commands.add_parser("convert", help="convert a checkpoint (same as convert_weights.py)")
    add_convert_arguments(convert)
    convert.set_defaults(run=cmd_convert)

    compile_parser = commands.add_parser(
        "compile", help="compile train or generate for a TPU topology on any machine: memory, FLOPs, HBM "
                        "traffic, roofline, collectives (compiler estimates)")
    add_compile_arguments(compile_parser)
    compile_parser.set_defaults(run=cmd_compile)

    info = commands.add_parser("info", help="backend, devices, decoding path, CPU kernel, compile cache, versions")
    info.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="the compute dtype whose decoding plans are shown (auto: bfloat16 on GPU/TPU, "
                           "float32 on CPU)")
    add_decode_path_flag(info)
    info.set_defaults(run=cmd_info)

    commands.add_parser("train", help="train or fine-tune (same as train.py; see `bbsmall train --help`)",
                        add_help=False)
    commands.add_parser("bench", help="generation benchmark against transformers (see `bbsmall bench --help`)",
                        add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from bbsmall_jax.cli.train import main as train_main

        return train_main(argv[1:], prog="bbsmall train")
    if argv and argv[0] == "bench":
        import runpy

        script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "generate.py")
        if not os.path.isfile(script):
            print("bbsmall bench: error: needs a source checkout (bench/generate.py) with the test extra",
                  file=sys.stderr)
            return 2
        sys.argv = [script, *argv[1:]]
        runpy.run_path(script, run_name="__main__")
        return 0
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `compile train`'s key=value overrides may follow its flags (argparse takes positionals once)
        if args.command != "compile" or any(item.startswith("-") or "=" not in item for item in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with startup_cache.enabled():  # compiled programs kept on disk for the next run (BBSMALL_CACHE_DIR)
            return args.run(args)
    except KeyboardInterrupt:
        return 130
    except COMMAND_ERRORS as err:
        print(f"bbsmall {args.command}: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `bbsmall` program: run the command, then end the process without tearing JAX down, which takes up
    to a second of CPU after a reply (the commands have written, synced and closed their files by then;
    training, whose checkpointing threads may still hold files, exits the ordinary way)."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in ("train", "bench"):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

