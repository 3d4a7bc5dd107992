"""`bbsmall info`: the JAX backend and devices, the decoding plan, the CPU kernel, the compile cache, versions."""

from __future__ import annotations

import importlib.metadata
import os

PACKAGES = ("bbsmall_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "safetensors", "tokenizers",
            "huggingface_hub", "numpy")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(dtype: str = "auto") -> list[tuple[str, str]]:
    """(label, value) lines describing this machine as generation sees it."""
    import jax

    from bbsmall_jax.runtime.responder import compilation_cache_dir
    from bbsmall_jax.generation import cpu_kernel, plan

    backend = jax.default_backend()
    resolved = plan.compute_dtype(dtype, backend)
    devices = jax.devices()
    reason = cpu_kernel.unavailable_reason()
    lines = [
        ("backend", backend),
        ("devices", f"{len(devices)}: " + ", ".join(sorted({d.device_kind for d in devices}))),
        ("processes", f"{jax.process_count()} (this is {jax.process_index()})"),
        ("compute dtype", resolved + (" (auto)" if dtype == "auto" else "")),
        ("decoding path", f"{plan.requested_path(backend)}"
                          f"{' (' + plan.PATH_VARIABLE + ')' if os.environ.get(plan.PATH_VARIABLE) else ''}"),
        ("plan, 1 row", plan.choose_plan(backend, resolved, 1).describe()),
        ("plan, several rows", plan.choose_plan(backend, resolved, 10, len(jax.local_devices())).describe()),
        ("CPU kernel", "built and usable" if reason is None else f"not used: {reason}"),
        ("compile cache", compilation_cache_dir()),
    ]
    return lines + [(name, _version(name)) for name in PACKAGES]


def main(dtype: str = "auto") -> int:
    import warnings

    with warnings.catch_warnings():  # the kernel's reason is a line of the report, not a warning
        warnings.simplefilter("ignore")
        lines = report(dtype)
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label:<{width}}  {value}")
    return 0
