"""`convert_weights.py` / `bbsmall convert`: any HF BlenderbotSmall checkpoint -> our (HF-format) safetensors directory."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax
import numpy as np

from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.checkpoint.hub import ModelNotFoundError, resolve_directory
from bbsmall_jax.pretrained import BlenderbotSmallForCausalLM, BlenderbotSmallForConditionalGeneration, BlenderbotSmallModel

_CLASSES = {
    "BlenderbotSmallForConditionalGeneration": BlenderbotSmallForConditionalGeneration,
    "BlenderbotSmallModel": BlenderbotSmallModel,
    "BlenderbotSmallForCausalLM": BlenderbotSmallForCausalLM,
}
# Files carried over unchanged next to the weights (tokenizer and generation defaults).
_SIDE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def model_class_for(config: BlenderbotSmallConfig):
    """The head a checkpoint was saved from, by its `architectures` entry (default: with LM head)."""
    for name in config.extra.get("architectures") or []:
        if name in _CLASSES:
            return _CLASSES[name]
    return BlenderbotSmallForConditionalGeneration


def convert(source: str, output: str, dtype: str = "float32") -> str:
    """Convert `source` (directory, hub id; safetensors, pytorch_model.bin or flax_model.msgpack) into `output`."""
    directory = resolve_directory(source)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert a BlenderbotSmall checkpoint (HF directory or hub id: model.safetensors, "
                    "pytorch_model.bin or flax_model.msgpack) into an HF-format directory with "
                    "model.safetensors, loadable by bbsmall_jax and by transformers.")
    parser.add_argument("source", help="HF model directory or hub id, e.g. facebook/blenderbot_small-90M")
    parser.add_argument("output", help="directory to write config.json + model.safetensors (+ tokenizer files)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default float32)")
    args = parser.parse_args(argv)
    try:
        head = convert(args.source, args.output, args.dtype)
    except (ModelNotFoundError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {head} ({args.dtype}) to {args.output}")
    return 0
