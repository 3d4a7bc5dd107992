"""TPU topologies as devices on any machine: names, the chips' figures, libtpu loaded quietly.

`jax.experimental.topologies.get_topology_desc` asks libtpu for the devices of a slice that is not here;
programs lowered over a mesh of them compile into real TPU executables. libtpu prints its initialization
errors on stderr when no TPU is attached: they are held back, and shown only when loading fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from typing import Optional

from bbsmall_jax.errors import UsageError
from bbsmall_jax.platforms import libtpu_installed

# Per chip: HBM capacity and bandwidth (the vendors' published figures). Peak FLOP/s: train/flops.py.
CHIPS = {"v4": (32 * 2**30, 1228e9), "v5e": (16 * 2**30, 819e9),
         "v5p": (95 * 2**30, 2765e9), "v6e": (32 * 2**30, 1640e9)}
CORES_PER_CHIP_IN_SLICE_NAMES = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # v4-32 counts cores
THREE_D = ("v4", "v5p")  # generations whose slices are a 3-D torus
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
INSTALL_HINT = ('pip install "jax[tpu]" (the libtpu matching the installed jax); or the test extra: '
                'pip install -e ".[test]"')


class TopologyError(UsageError):
    """A topology that cannot be had here; the message says what to pass or install."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice's devices as libtpu describes them, and one chip's figures."""

    name: str  # as libtpu spells it, e.g. "v5e:2x2"
    generation: str  # "v5e"
    devices: tuple  # every device of the slice, ordered by (process, id)
    hbm_bytes: int  # per device
    hbm_bandwidth: float  # bytes/s per device
    default_devices: int  # the devices a program uses unless told: all, or the pod slice's (`v5e-1`: one)

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    def first(self, count: Optional[int]) -> tuple:
        """The first `count` devices (`default_devices` when None)."""
        if count is None:
            return self.devices[:self.default_devices]
        if not 1 <= count <= len(self.devices):
            raise TopologyError(f"--devices must be in [1, {len(self.devices)}] for {self.name}, got {count}")
        return self.devices[:count]


def _split(chips: int, dims: int) -> str:
    """A power-of-two chip count as the most even power-of-two grid as libtpu names slices: smallest side
    first, sides of 1 last (16 -> 4x4 or 2x2x4, 8 -> 2x4, 4 -> 2x2x1)."""
    sides = [1] * dims
    for _ in range(chips.bit_length() - 1):
        sides[sides.index(min(sides))] *= 2
    return "x".join(map(str, sorted(sides, key=lambda side: (side == 1, side))))


def canonical_name(name: str) -> tuple[str, str, Optional[int]]:
    """(libtpu's topology name, generation, chips of a pod-slice name or None) of `v5e:2x2`-style names and
    pod-slice names (`v5e-16`, `v4-32`)."""
    text = name.strip().lower()
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if match:
        generation = ALIASES.get(match.group(1), match.group(1))
        return f"{generation}:{match.group(2)}", generation, None
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
        raise TopologyError(f"topology {name!r}: expected a libtpu name such as v5e:2x2, v5e:4x4, v4:2x2x2, "
                            "v6e:2x2, or a pod slice such as v5e-16, v4-32")
    generation = ALIASES.get(match.group(1), match.group(1))
    if generation not in CORES_PER_CHIP_IN_SLICE_NAMES:
        raise TopologyError(f"topology {name!r}: unknown TPU generation {match.group(1)!r} (known: "
                            f"{', '.join(sorted(CORES_PER_CHIP_IN_SLICE_NAMES))})")
    chips = int(match.group(2)) // CORES_PER_CHIP_IN_SLICE_NAMES[generation]
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"topology {name!r}: {match.group(2)} is not a power-of-two slice size")
    dims = 3 if generation in THREE_D else 2
    return f"{generation}:{_split(max(chips, 4), dims)}", generation, chips  # libtpu has no slice under 4 chips


@contextlib.contextmanager
def _stderr_held_back():
    """Collect what native code writes on file descriptor 2; yields a function returning it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lambda: (held.seek(0), held.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _chips_per_device(devices) -> float:
    coords = {(d.process_index, tuple(getattr(d, "coords", (d.id,)))) for d in devices}
    return len(coords) / len(devices)


def load(name: str) -> Topology:
    """The devices of topology `name` from this install's libtpu (TopologyError saying what to fix)."""
    topology_name, generation, chips = canonical_name(name)
    if not libtpu_installed():
        raise TopologyError(f"compiling for TPU {topology_name} needs libtpu, which is not installed: "
                            f"{INSTALL_HINT}")
    from jax.experimental import topologies

    # Only compiling here: several processes may load libtpu at once (its lock file is for a TPU's owner).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _stderr_held_back() as held:
        try:
            description = topologies.get_topology_desc(topology_name=topology_name, platform="tpu")
        except Exception as err:  # libtpu's own error type and text
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TopologyError(f"libtpu does not know topology {topology_name!r} ({reason}); try e.g. v5e:2x2, "
                                f"v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x2{_held_hint(held())}") from None
    devices = tuple(sorted(description.devices, key=lambda d: (d.process_index, d.id)))
    if generation not in CHIPS:
        raise TopologyError(f"topology {topology_name!r}: no chip figures for {generation!r} (known: "
                            f"{', '.join(sorted(CHIPS))})")
    hbm, bandwidth = CHIPS[generation]
    share = _chips_per_device(devices)  # where a chip shows as two devices (v4 here), each has half its HBM
    default = len(devices) if chips is None else min(len(devices), round(chips / share))
    return Topology(topology_name, generation, devices, int(hbm * share), bandwidth * share, default)


def _held_hint(text: str) -> str:
    errors = [line for line in text.splitlines() if "error" in line.lower() and "TPU_" not in line]
    return f"; libtpu said: {errors[-1][:300]}" if errors else ""
