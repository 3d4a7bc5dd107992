"""Which JAX platforms a process starts: an installed libtpu stays silent on a machine without a TPU.

JAX tries every backend it finds. With libtpu installed (jax's `tpu` extra, which `bbsmall compile` needs)
and no TPU attached, the TPU backend fails to start and libtpu prints its initialization errors
(`TPU_ACCELERATOR_TYPE`, `TPU_WORKER_HOSTNAMES`, `InitGoogle`) on stderr at every start. So unless the user
chose `JAX_PLATFORMS`, a process without a TPU chip on its PCI bus starts only the platforms it has; libtpu
is then loaded only to compile for a topology (`bbsmall_jax.aot.topology`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # what a TPU chip's PCI vendor file holds
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0")
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def tpu_attached() -> bool:
    """Whether a Google PCI device (a TPU chip) is on this machine's bus."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def libtpu_installed() -> bool:
    """Whether the libtpu package is importable (found without importing it)."""
    return importlib.util.find_spec("libtpu") is not None


def _has_cuda() -> bool:
    return any(os.path.exists(p) for p in NVIDIA_DEVICE_FILES) and any(
        importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def skip_absent_tpu() -> None:
    """Set `JAX_PLATFORMS` to the platforms present when libtpu is installed but no TPU is attached.

    Does nothing when the user set `JAX_PLATFORMS`, when libtpu is not installed, or on a TPU machine. Call
    it before JAX starts a backend (importing `bbsmall_jax` does).
    """
    if "JAX_PLATFORMS" in os.environ or not libtpu_installed() or tpu_attached():
        return
    platforms = os.environ["JAX_PLATFORMS"] = "cuda,cpu" if _has_cuda() else "cpu"
    if "jax" in sys.modules:  # imported first: its config read the environment already
        sys.modules["jax"].config.update("jax_platforms", platforms)
