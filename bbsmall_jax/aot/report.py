"""Compile a lowered program and report what the TPU compiler says of it: memory, FLOPs, HBM traffic, roofline.

Every figure is an estimate from the compiler, not a measurement on a chip:
- memory: XLA's `memory_analysis()` of the executable (per device);
- FLOPs: XLA's `cost_analysis()` (loop bodies counted once) and, for a train step, the model FLOPs that MFU
  is computed from (`train/flops.py`);
- HBM traffic: our own estimate from the optimized HLO (`hlo_analysis.py`), per step for a train step and
  per decoding step (one iteration of the decoding loop) for generation;
- roofline: the larger of traffic / HBM bandwidth and FLOPs / peak, from the chip's published figures.
"""

from __future__ import annotations

import dataclasses
import time
from importlib import metadata
from typing import Optional

from bbsmall_jax.aot import hlo_analysis
from bbsmall_jax.aot.programs import LoweredProgram

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """One compiled program's figures (per device) and where they come from."""

    program: str  # "train" or "generate"
    topology: str
    device_kind: str
    devices: int  # devices the program runs on
    hosts: int
    description: str
    plan: str
    versions: dict  # jax and libtpu
    lower_seconds: float
    compile_seconds: float
    memory: dict  # bytes per device: arguments, outputs, aliased, temporaries, code, total, hbm; fits
    xla_flops: float  # XLA's cost analysis, per device, loop bodies once
    model_flops: Optional[float]  # train: model FLOPs per device and step (what MFU counts)
    step: str  # what `step_bytes` covers
    step_bytes: int  # HBM traffic estimate of one step (train step, or decoding step), per device
    step_padded_bytes: int  # the same with arrays padded to the TPU's tiles
    roofline_seconds: float
    memory_seconds: float
    compute_seconds: Optional[float]
    mfu_bound: Optional[float]
    hlo: hlo_analysis.HloReport
    hlo_text: str = dataclasses.field(repr=False)

    def to_dict(self) -> dict:
        """The report as one JSON-able object (without the HLO text)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("hlo", "hlo_text")}
        out["hlo"] = self.hlo.to_dict()
        out["estimates"] = "compiler estimates, not measurements"
        return out

    def format(self) -> str:
        """The report as text, every figure labelled an estimate."""
        m = self.memory
        lines = [
            f"bbsmall compile {self.program}: {self.topology} ({self.device_kind}, {self.hosts} host"
            f"{'s' if self.hosts > 1 else ''}), {self.devices} device{'s' if self.devices > 1 else ''}",
            f"  {self.description}",
            f"  plan: {self.plan}",
            "All figures are estimates from the TPU compiler, per device, not measurements on a chip "
            f"(jax {self.versions.get('jax')}, libtpu {self.versions.get('libtpu')}).",
            f"compile time       {self.compile_seconds:.1f} s (tracing and lowering {self.lower_seconds:.1f} s)",
            f"memory             arguments {m['arguments'] / GIB:.3f} GiB, temporaries {m['temporaries'] / GIB:.3f} GiB, "
            f"outputs {m['outputs'] / GIB:.3f} GiB ({m['aliased'] / GIB:.3f} aliased to arguments), code "
            f"{m['code'] / GIB:.3f} GiB",
            f"                   total {m['total'] / GIB:.3f} GiB of {m['hbm'] / GIB:.1f} GiB HBM: "
            + ("fits" if m["fits"] else "DOES NOT FIT"),
            f"FLOPs              {self.xla_flops:.3e} (XLA's count; loop bodies once)"
            + (f", model FLOPs {self.model_flops:.3e} per step" if self.model_flops else ""),
            f"HBM traffic        {self.step_bytes / GB:.3f} GB per {self.step} ({self.step_padded_bytes / GB:.3f} GB "
            "padded to tiles); our estimate from the optimized HLO: operands read and results written by each "
            "op, on-chip (VMEM) buffers excluded, loops by their trip counts",
            f"roofline           {self.roofline_seconds * 1e3:.3f} ms per {self.step} (HBM {self.memory_seconds * 1e3:.3f} "
            "ms" + (f", compute {self.compute_seconds * 1e3:.3f} ms" if self.compute_seconds is not None else "")
            + ")" + (f"; MFU at most {self.mfu_bound:.0%}" if self.mfu_bound is not None else ""),
            "collectives        " + (", ".join(f"{kind} {c.count} x, {c.bytes / 1e6:.1f} MB" for kind, c in
                                              sorted(self.hlo.collectives.items())) or "none"),
            "custom calls       " + (", ".join(f"{t} x{n}" for t, n in sorted(self.hlo.custom_calls.items()))
                                     or "none") + (f" (TPU-internal: {', '.join(sorted(self.hlo.tpu_custom_calls))})"
                                                   if self.hlo.tpu_custom_calls else ""),
            "host transfers     " + (", ".join(f"{t.kind} {t.name} in loop {t.loop}" for t in self._loop_transfers())
                                     or "none inside loops"),
        ]
        return "\n".join(lines)

    def _loop_transfers(self) -> list:
        return [t for t in self.hlo.host_transfers if t.loop is not None]


def _versions() -> dict:
    found = {}
    for package in ("jax", "libtpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _memory(compiled, hbm: int) -> dict:
    stats = compiled.memory_analysis()
    memory = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                  aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                  code=stats.generated_code_size_in_bytes)
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["code"])
    return dict(memory, hbm=hbm, fits=memory["total"] <= hbm)


def _decoding_loop(hlo: hlo_analysis.HloReport) -> Optional[hlo_analysis.LoopBytes]:
    """The generation program's decoding loop: its outermost loop whose trip count is decided at run time."""
    return next((loop for loop in hlo.loops if loop.parent is None and loop.trip_count is None), None)


def compile_and_report(program: LoweredProgram) -> CompileReport:
    """Compile `program` and gather its figures."""
    from bbsmall_jax.train.flops import peak_flops

    start = time.perf_counter()
    compiled = program.lowered.compile()
    compile_seconds = time.perf_counter() - start
    text = compiled.as_text()
    hlo = hlo_analysis.analyze(text)
    step, step_bytes, padded = "train step", hlo.per_step_bytes, hlo.per_step_padded_bytes
    if program.name == "engine-step":  # one call: `steps` decoding steps of every slot
        step = "engine step call"
    if program.name == "generate":
        loop = _decoding_loop(hlo)
        if loop is not None:
            step, step_bytes, padded = "decoding step", loop.iteration_bytes, loop.iteration_padded_bytes
    costs = compiled.cost_analysis() or {}
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    topology = program.topology
    peak, _ = peak_flops(topology.device_kind)
    per_device_flops = None if program.model_flops is None else program.model_flops / program.devices
    memory_seconds = step_bytes / topology.hbm_bandwidth
    compute_seconds = None if per_device_flops is None or peak is None else per_device_flops / peak
    roofline = max(memory_seconds, compute_seconds or 0.0)
    return CompileReport(
        program=program.name, topology=topology.name, device_kind=topology.device_kind, devices=program.devices,
        hosts=program.hosts, description=program.description,
        plan=program.plan, versions=_versions(), lower_seconds=program.lower_seconds,
        compile_seconds=compile_seconds, memory=_memory(compiled, topology.hbm_bytes),
        xla_flops=float(costs.get("flops", 0.0)), model_flops=per_device_flops, step=step, step_bytes=step_bytes,
        step_padded_bytes=padded, roofline_seconds=roofline, memory_seconds=memory_seconds,
        compute_seconds=compute_seconds,
        mfu_bound=None if compute_seconds is None or roofline == 0 else compute_seconds / roofline,
        hlo=hlo, hlo_text=text)
