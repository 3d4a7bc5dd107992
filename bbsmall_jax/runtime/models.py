"""The model names the commands take: `demo` (the embedded model), a directory, or a hub id (no JAX here)."""

from __future__ import annotations

import os
from typing import Optional

from bbsmall_jax.hub import resolve_directory

DEMO_NAME = "demo"  # the embedded model; a directory of that name is `./demo`
NAMES_HELP = ("a model directory (ours or transformers'), a hub id such as facebook/blenderbot_small-90M, or demo, "
              "the embedded demo model (a directory named demo is ./demo)")
DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_model")


def model_directory(name: Optional[str]) -> str:
    """The local directory of a `--model` value: None or `demo` is the embedded model, a directory is itself,
    a hub id is downloaded (or found in huggingface_hub's cache)."""
    if name is None or name == DEMO_NAME:
        return DEMO_MODEL_DIR
    return resolve_directory(name)
