"""Resolve a local directory or a Hugging Face hub id to files on disk: the one hub download of the project
(models, tokenizers, configs), with one error type."""

from __future__ import annotations

import os

# The files of a model repository that loading needs: configs, weights in every supported format, tokenizer.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.msgpack", "*.txt")


class ModelNotFoundError(OSError):
    """A model directory, file or hub id could not be resolved to local files."""


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def resolve_directory(path_or_hub_id: str | os.PathLike, allow_patterns=HUB_PATTERNS) -> str:
    """A local directory as is, or a hub id downloaded (or found in the cache) with huggingface_hub."""
    name = os.fspath(path_or_hub_id)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ModelNotFoundError(f"{name} is a file; expected a model directory or a hub id")
    if not _looks_like_hub_id(name):
        raise ModelNotFoundError(f"{name}: no such directory, and not a hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=list(allow_patterns))
    except Exception as err:  # huggingface_hub raises many types: offline, 404, gated, ...
        raise ModelNotFoundError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without network access, download it once elsewhere (`hf download "
            f"{name}`) and copy the cache, or pass a local directory.") from err


def resolve_file(path_or_hub_id: str | os.PathLike, filename: str) -> str:
    """Path of `filename` inside a directory or hub repo, or the path itself if it is a file."""
    name = os.fspath(path_or_hub_id)
    if os.path.isfile(name):
        return name
    directory = resolve_directory(name, allow_patterns=[filename])
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{name} has no {filename}")
    return path
