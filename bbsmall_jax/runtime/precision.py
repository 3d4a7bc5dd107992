"""The compute dtype a run gets on a backend: one rule for chat, batch inference, serving, training and the
compile reports."""

from __future__ import annotations

from bbsmall_jax.errors import UsageError


def compute_dtype(name: str, backend: str) -> str:
    """A compute dtype name, with "auto" resolved: bfloat16 on GPU and TPU, float32 on the CPU."""
    if name == "auto":
        return "float32" if backend == "cpu" else "bfloat16"
    if name not in ("float32", "bfloat16"):
        raise UsageError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return name
