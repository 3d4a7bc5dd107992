"""One line describing the machine a benchmark ran on: CPU model, its vector extensions, cores, load."""

from __future__ import annotations

import os
import platform

VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")


def describe() -> str:
    """CPU model (vector extensions), cores, load average."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = ",".join(f for f in VECTOR_FLAGS if f in flags) or "no AVX2"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model} ({vector}), {os.cpu_count()} cores, load average {load}"
