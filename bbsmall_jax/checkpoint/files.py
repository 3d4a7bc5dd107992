"""Read and write HF weight files: safetensors (single or sharded), pytorch_model.bin, flax_model.msgpack."""

from __future__ import annotations

import os

import numpy as np

from bbsmall_jax.atomic import atomic_file
from bbsmall_jax.checkpoint.names import flax_msgpack_to_state_dict
from bbsmall_jax.errors import UsageError
from bbsmall_jax.jsonfiles import read_json_object

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
FLAX_MSGPACK = "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, FLAX_MSGPACK)


def find_weights_file(directory: str) -> str:
    """The weights file of an HF directory, preferring safetensors (no torch needed)."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as err:
        raise UsageError(f"{path}: not a readable safetensors file ({err})") from err


def _load_sharded_safetensors(index_path: str) -> dict[str, np.ndarray]:
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UsageError(f"{index_path}: not a safetensors index (no weight_map object)")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_load_safetensors(os.path.join(os.path.dirname(index_path), shard)))
    return tensors


def _load_pytorch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle and reading it needs torch: `pip install torch` (a CPU build "
            "is enough), or convert it to model.safetensors on a machine that has torch.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path}: not a readable PyTorch state dict ({err})") from err
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _load_flax_msgpack(path: str) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    try:
        with open(path, "rb") as f:
            tree = msgpack_restore(f.read())
    except Exception as err:
        raise UsageError(f"{path}: not a readable Flax msgpack file ({err})") from err
    return flax_msgpack_to_state_dict(tree)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a weights file (or of the weights file inside a directory), by checkpoint name."""
    if os.path.isdir(path):
        path = find_weights_file(path)
    name = os.path.basename(path)
    if name.endswith(".index.json"):
        return _load_sharded_safetensors(path)
    if name.endswith(".safetensors"):
        return _load_safetensors(path)
    if name.endswith(".msgpack"):
        return _load_flax_msgpack(path)
    if name.endswith((".bin", ".pt", ".pth")):
        return _load_pytorch_bin(path)
    raise UsageError(f"{path}: unknown weights format (expected one of {', '.join(WEIGHT_FILES)})")


def save_safetensors(state_dict: dict[str, np.ndarray], directory: str) -> str:
    """Write `model.safetensors` atomically (tmp file then rename); returns its path."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SAFETENSORS)
    with atomic_file(path) as tmp:
        save_file(state_dict, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
    return path
