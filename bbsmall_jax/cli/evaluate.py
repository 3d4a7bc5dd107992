"""`bbsmall eval`: a model's figures on held-out dialogue (`bbsmall_jax.evaluation`), as a table and as JSON."""

from __future__ import annotations

import argparse
import json
import os
import time

from bbsmall_jax.cli.generation_flags import decode_path
from bbsmall_jax.errors import UsageError
from bbsmall_jax.runtime.models import DEMO_NAME, model_directory

# What `bbsmall eval` assumes when neither a flag nor the run's train_config.yaml says: configs/demo.yaml's
# tokenization and held-out split (its seed is TrainConfig's default).
DEFAULTS = {"max_source_length": 32, "max_target_length": 32, "separator": "newline", "add_end": False,
            "valid_fraction": 0.02, "seed": 0}
FLAGS = {"max_source_length": "max_source_length", "max_target_length": "max_target_length",
         "separator": "turn_separator", "valid_fraction": "valid_fraction", "seed": "seed"}


def check_flags(args: argparse.Namespace) -> None:
    """ValueError or FileNotFoundError for unusable flags, before JAX is imported."""
    for flag, minimum in (("max_examples", 1), ("max_generate", 0), ("candidates", 1), ("hits_examples", 0),
                          ("batch_size", 1),
                          ("max_source_length", 1), ("max_target_length", 1), ("seed", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if args.valid_fraction is not None and not 0 < args.valid_fraction < 1:
        raise UsageError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    if args.data != "chitchat" and not os.path.isfile(args.data):
        raise FileNotFoundError(f"{args.data}: no such data file (pass chitchat or a JSONL file)")


def training_settings(directory: str) -> dict:
    """The tokenization and split of the run that trained the model in `directory`, when it is a train.py
    output's final/ (its train_config.yaml is one level up); else {}."""
    path = os.path.join(os.path.dirname(os.path.normpath(directory)), "train_config.yaml")
    if os.path.basename(os.path.normpath(directory)) != "final" or not os.path.isfile(path):
        return {}
    from bbsmall_jax.train.config import read_yaml

    with open(path, encoding="utf-8") as f:
        config = read_yaml(f) or {}
    return {key: config[key] for key in DEFAULTS if key in config}


def resolve_settings(args: argparse.Namespace, directory: str, positions: int) -> dict:
    """Each setting from its flag, else the training run's, else DEFAULTS; lengths at most the model's positions."""
    settings = {**DEFAULTS, **training_settings(directory)}
    settings.update({key: getattr(args, flag) for key, flag in FLAGS.items() if getattr(args, flag) is not None})
    for key in ("max_source_length", "max_target_length"):
        if settings[key] > positions:
            if getattr(args, key) is not None:
                raise UsageError(f"--{key.replace('_', '-')} {settings[key]} exceeds the model's "
                                 f"{positions} positions")
            settings[key] = positions
    return settings


def load_eval_examples(data: str, valid_fraction: float, seed: int, max_examples=None) -> list:
    """The held-out chitchat examples train.py's split leaves out, or every example of a JSONL file or a
    sharded corpus (a directory or glob of shards)."""
    from bbsmall_jax.train.corpus import read_examples
    from bbsmall_jax.train.data import load_examples

    examples = load_examples("chitchat", None, valid_fraction, seed)[1] if data == "chitchat" else read_examples(data)
    return examples[:max_examples] if max_examples else examples


def format_report(summary: dict) -> str:
    """The figures as an aligned table."""
    hits = summary["hits_at_1"]
    data = (f"chitchat, held-out split (valid_fraction {summary['valid_fraction']}, seed {summary['seed']})"
            if summary["data"] == "chitchat" else summary["data"])
    rows = [
        ("model", summary["model"]),
        ("data", f"{data}: {summary['examples']:,} examples, {summary['tokens']:,} reply tokens"),
        ("tokenization", f"contexts <= {summary['max_source_length']} tokens ({summary['separator']} between turns"
                         f"{', __end__ after' if summary['add_end'] else ''}), replies <= "
                         f"{summary['max_target_length']} tokens with __end__"),
        ("perplexity", f"{summary['perplexity']:.2f}"),
        ("token accuracy", f"{summary['token_accuracy']:.4f}"),
        (f"hits@1/{summary['hits_candidates']}",
         "n/a (a single distinct reply)" if hits is None else f"{hits:.4f} over {summary['hits_examples']:,} examples"
         + (f" (only {summary['hits_candidates']} distinct replies to rank)"
            if summary["hits_candidates"] < summary["candidates"] else "")),
    ]
    if summary["generated"]:
        rows += [
            ("replies generated", f"{summary['generated']} (the model's generation settings)"),
            ("distinct-1 / -2", f"{summary['distinct_1']:.4f} / {summary['distinct_2']:.4f}"),
            ("mean words", f"{summary['mean_words']:.2f}"),
            ("distinct replies", f"{summary['distinct_replies']:.2f} (the most frequent: "
                                 f"{summary['top_reply_share']:.2f} of replies)"),
        ]
    rows.append(("time", f"scoring {summary['score_s']:.1f} s, generation {summary['generate_s']:.1f} s, "
                         f"wall {summary['wall_s']:.1f} s"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def run(args: argparse.Namespace) -> int:
    """Read the data, load the model, evaluate, print the table (and the JSON summary)."""
    began = time.perf_counter()
    from bbsmall_jax.nn.config import BlenderbotSmallConfig

    directory = model_directory(args.model)  # a missing model, data file or bad line fails before JAX loads
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory} has no config.json")
    positions = BlenderbotSmallConfig.from_json_file(config_path).max_position_embeddings
    settings = resolve_settings(args, directory, positions)
    examples = load_eval_examples(args.data, settings["valid_fraction"], settings["seed"], args.max_examples)

    from bbsmall_jax.runtime.responder import enable_compilation_cache, load_chat_model
    from bbsmall_jax.evaluation.run import EvalSettings, evaluate

    enable_compilation_cache()
    model, tokenizer = load_chat_model(directory, args.dtype, decode_path(args))
    report = evaluate(model, tokenizer, examples, EvalSettings(
        max_source_length=settings["max_source_length"], max_target_length=settings["max_target_length"],
        separator=settings["separator"], add_end=settings["add_end"], candidates=args.candidates,
        hits_examples=args.hits_examples, seed=settings["seed"], batch_size=args.batch_size,
        max_generate=args.max_generate), show_progress=not args.quiet)
    summary = {**report.to_dict(), "wall_s": time.perf_counter() - began,
               "model": DEMO_NAME if args.model in (None, DEMO_NAME) else args.model, "data": args.data,
               "candidates": args.candidates, **settings}
    print(format_report(summary))
    if args.summary_json:
        print(json.dumps({key: round(value, 6) if isinstance(value, float) else value
                          for key, value in summary.items()}))
    return 0
