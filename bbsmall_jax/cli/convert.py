"""`convert_weights.py` / `bbsmall convert`: any HF BlenderbotSmall checkpoint -> our (HF-format) safetensors directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import TYPE_CHECKING

from bbsmall_jax.errors import COMMAND_ERRORS
from bbsmall_jax.runtime.models import NAMES_HELP, model_directory

if TYPE_CHECKING:
    from bbsmall_jax.nn.config import BlenderbotSmallConfig

# The heads a checkpoint can hold, by transformers' class name (ours have the same names).
HEADS = ("BlenderbotSmallForConditionalGeneration", "BlenderbotSmallModel", "BlenderbotSmallForCausalLM")
# Files carried over unchanged next to the weights (tokenizer and generation defaults).
_SIDE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def model_class_for(config: BlenderbotSmallConfig):
    """The head a checkpoint was saved from, by its `architectures` entry (default: with LM head)."""
    from bbsmall_jax import pretrained

    name = next((name for name in config.extra.get("architectures") or [] if name in HEADS), HEADS[0])
    return getattr(pretrained, name)


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an output that is a file, or a directory holding files unless `overwrite` (before any loading)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output} exists and is not a directory; name a directory to write")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass --overwrite to write the converted model into it")


def convert(source: str, output: str, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert `source` (directory, hub id, or `demo`, the embedded model; safetensors, pytorch_model.bin or
    flax_model.msgpack) into `output` (a new or empty directory, or any with `overwrite`)."""
    check_output(output, overwrite)
    directory = model_directory(source)
    import jax
    import numpy as np

    from bbsmall_jax.nn.config import BlenderbotSmallConfig

    config = BlenderbotSmallConfig.from_pretrained(directory)
    cls = model_class_for(config)
    model = cls.from_pretrained(directory, param_dtype=dtype)
    model.save_pretrained(output)
    for name in _SIDE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(os.path.join(output, name)):
            shutil.copyfile(path, os.path.join(output, name))
    reloaded = cls.from_pretrained(output, param_dtype=dtype)  # the written file reads back to the same params
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                  model.params, reloaded.params)
    if not all(jax.tree_util.tree_leaves(same)):
        raise RuntimeError(f"{output}: the written weights do not read back identically")
    return cls.__name__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """SOURCE, OUTPUT and --dtype (for convert_weights.py and `bbsmall convert`)."""
    parser.add_argument("source", help=f"what to convert: {NAMES_HELP}")
    parser.add_argument("output", help="directory to write config.json + model.safetensors (+ tokenizer files)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="write into OUTPUT although it holds files")


def run(args: argparse.Namespace) -> int:
    """Convert as the parsed arguments say; 2 on an error in what was given (printed on one line), as the other
    commands exit on bad input."""
    try:
        head = convert(args.source, args.output, args.dtype, args.overwrite)
    except COMMAND_ERRORS as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {head} ({args.dtype}) to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert a BlenderbotSmall checkpoint (HF directory or hub id: model.safetensors, "
                    "pytorch_model.bin or flax_model.msgpack) into an HF-format directory with "
                    "model.safetensors, loadable by bbsmall_jax and by transformers.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
