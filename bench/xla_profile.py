"""Where an XLA:CPU program's time goes: a jax.profiler trace's per-thunk times joined with the HLO dump.

    python bench/xla_profile.py TRACE_DIR HLO_AFTER_OPTIMIZATIONS.txt [--top 25]

(`bench/train.py --profile DIR` writes both and prints this summary.) Thunks are grouped by the JAX
operation they come from (`op_name` metadata, layer numbers folded), forward or backward, and matmul or
not; a matmul group shows its GFLOP/s. Thunks of a `while` loop are counted inside it, not again as the
loop; on several threads, thunks that run at the same time each count their own wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \(?(\w+)\[([\d,]*)\]")


def thunk_times(trace_dir: str) -> dict[str, list]:
    """[milliseconds, executions] per thunk name over the trace (the newest one under `trace_dir`)."""
    paths = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    events = json.load(gzip.open(paths[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    times: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and re.fullmatch(r"[\w.\-]+", name) and not name.startswith("ThunkExecutor"):
            times[name][0] += event.get("dur", 0) / 1e3
            times[name][1] += 1
    return times


class Hlo:
    """Instructions of an HLO text dump: shape, line, and the computations fusions call."""

    def __init__(self, path: str):
        self.shapes, self.lines, self.computations = {}, {}, {}
        current = None
        with open(path, encoding="utf-8") as f:
            for line in f:
                header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
                if header:
                    current = self.computations.setdefault(header.group(1), [])
                    continue
                match = _INSTRUCTION.match(line)
                if match:
                    name = match.group(1)
                    self.shapes[name] = [int(d) for d in match.group(3).split(",") if d]
                    self.lines[name] = line
                    if current is not None:
                        current.append(name)

    def _dot_flops(self, name: str) -> float:
        line = self.lines[name]
        operands = re.search(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if not operands or not contracting or operands.group(1) not in self.shapes:
            return 0.0
        k = 1
        for dim in contracting.group(1).split(","):
            k *= self.shapes[operands.group(1)][int(dim)]
        out = 1
        for dim in self.shapes[name]:
            out *= dim
        return 2.0 * out * k

    def flops(self, name: str) -> float:
        """Matmul FLOPs of one execution of an instruction (a dot, or a fusion around dots)."""
        line = self.lines.get(name, "")
        if " dot(" in line:
            return self._dot_flops(name)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        inner = self.computations.get(called.group(1), []) if called else []
        return sum(self._dot_flops(n) for n in inner if " dot(" in self.lines[n])

    def group(self, name: str) -> str:
        """`fwd|bwd op/name/tail` of an instruction, layer numbers folded."""
        line = self.lines.get(name, "")
        if " while(" in line:
            return "while"
        op = re.search(r'op_name="([^"]*)"', line)
        op = op.group(1) if op else "?"
        side = "bwd" if "transpose(" in op else "fwd"
        op = re.sub(r"layers_\d+", "layers_N", op.split(";")[0])
        return f"{side} {'/'.join(op.split('/')[-3:])}"


def summarize(trace_dir: str, hlo_path: str, top: int = 25) -> str:
    """The table of the heaviest groups, matmuls and the rest, as text."""
    times, hlo = thunk_times(trace_dir), Hlo(hlo_path)
    groups: dict[tuple[str, bool], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, (ms, executions) in times.items():
        if name not in hlo.lines:
            continue
        key = hlo.group(name)
        if key == "while":
            continue
        flops = hlo.flops(name) * executions
        entry = groups[(key, flops > 0)]
        entry[0] += ms
        entry[1] += flops
        entry[2] += 1
    total = sum(v[0] for v in groups.values())
    matmul = sum(v[0] for (_, is_dot), v in groups.items() if is_dot)
    flops = sum(v[1] for (_, is_dot), v in groups.items() if is_dot)
    out = [f"thunk time {total:,.0f} ms: matmuls {matmul:,.0f} ms ({100 * matmul / total:.0f}%, {flops / 1e9:,.0f} GFLOP,"
           f" {flops / 1e9 / (matmul / 1e3):.0f} GFLOP/s), the rest {total - matmul:,.0f} ms",
           "| ms | % | kind | GFLOP/s | thunks | operation |", "|---|---|---|---|---|---|"]
    for (key, is_dot), (ms, fl, count) in sorted(groups.items(), key=lambda item: -item[1][0])[:top]:
        rate = f"{fl / 1e9 / (ms / 1e3):.0f}" if is_dot and ms else "-"
        out.append(f"| {ms:,.0f} | {100 * ms / total:.1f} | {'matmul' if is_dot else 'other'} | {rate} | {count} "
                   f"| {key} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir")
    parser.add_argument("hlo", help="the *.cpu_after_optimizations.txt of the program")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.trace_dir, args.hlo, args.top))


if __name__ == "__main__":
    main()
