"""`bbsmall info`: the JAX backend and devices, the decoding plan, the CPU kernel, the compile cache, versions."""

from __future__ import annotations

import importlib.metadata
from typing import Optional

PACKAGES = ("bbsmall_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "safetensors", "tokenizers",
            "huggingface_hub", "numpy")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(dtype: str = "auto", decode_path: Optional[str] = None) -> list[tuple[str, str]]:
    """(label, value) lines describing this machine as generation sees it."""
    import jax

    from bbsmall_jax.runtime.responder import compilation_cache_dir
    from bbsmall_jax.generation import cpu_kernel, plan
    from bbsmall_jax.runtime.precision import compute_dtype

    backend = jax.default_backend()
    resolved = compute_dtype(dtype, backend)
    devices = jax.devices()
    reason = cpu_kernel.unavailable_reason()
    lines = [
        ("backend", backend),
        ("devices", f"{len(devices)}: " + ", ".join(sorted({d.device_kind for d in devices}))),
        ("processes", f"{jax.process_count()} (this is {jax.process_index()})"),
        ("compute dtype", resolved + (" (auto)" if dtype == "auto" else "")),
        ("decoding path", decode_path or f"{plan.default_path(backend)} (the backend's)"),
        ("plan, 1 row", plan.choose_plan(backend, resolved, 1, path=decode_path).describe()),
        ("plan, several rows", plan.choose_plan(backend, resolved, 10, len(jax.local_devices()),
                                                path=decode_path).describe()),
        ("CPU kernel", "built and usable" if reason is None else f"not used: {reason}"),
        ("compile cache", compilation_cache_dir()),
    ]
    return lines + [(name, _version(name)) for name in PACKAGES]


def main(dtype: str = "auto", decode_path: Optional[str] = None) -> int:
    import warnings

    with warnings.catch_warnings():  # the kernel's reason is a line of the report, not a warning
        warnings.simplefilter("ignore")
        lines = report(dtype, decode_path)
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:<{width}}  {value}")
    return 0
