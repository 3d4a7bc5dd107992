"""The "Before you get a TPU" table: `bbsmall compile` over shapes, batch sizes and topologies, one process each.

    python bench/tpu_compile.py --cases train16,train64,greedy,beam --topologies v5e:2x2,v5e:4x4,v6e:2x2 \
        --out bench-tpu.jsonl [--yardstick PATH/hlo_hbm_bytes.py]

Every figure is the TPU compiler's estimate (nothing runs on a TPU). Each case compiles in a fresh process, one
at a time, so compile times do not share a machine with one another. The 90M shape (vocabulary 54,944, d_model
512, 8+8 layers, 16 heads) in bfloat16: training from `configs/blenderbot_small_90m_shape.yaml` (global batch
= rows per chip x chips, source 128, target 64), generation from that config's model over sources of 64 tokens
with 32 new tokens. With --yardstick, another HBM estimate (a script that reads an HLO dump) runs on each dump
and its first line is kept beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "blenderbot_small_90m_shape.yaml")
MODEL_DIR = os.path.join(ROOT, "configs", "blenderbot_small_90m_shape")  # config.json alone
CASES = {
    "train16": ["train", "--config", TRAIN_CONFIG], "train64": ["train", "--config", TRAIN_CONFIG],
    "greedy": ["generate", "--model", MODEL_DIR, "--batch-size", "256", "--source-length", "64",
               "--max-new-tokens", "32", "--num-beams", "1", "--devices", "1"],
    "beam": ["generate", "--model", MODEL_DIR, "--batch-size", "64", "--source-length", "64",
             "--max-new-tokens", "32", "--num-beams", "4", "--devices", "1"],
}
ROWS_PER_CHIP = {"train16": 16, "train64": 64}


def chips(topology: str) -> int:
    """Devices of a topology, asked of libtpu in this process."""
    from bbsmall_jax.aot.topology import load

    return len(load(topology).devices)


def run_case(case: str, topology: str, extra: list[str], dump: str) -> dict:
    """One `bbsmall compile` in a fresh process; its JSON report."""
    command = [sys.executable, "-c", "import sys; from bbsmall_jax.cli.main import main; sys.exit(main())",
               "compile", *CASES[case], "--topology", topology, "--json", "--dump", dump, *extra]
    if case in ROWS_PER_CHIP:
        command.append(f"batch_size={ROWS_PER_CHIP[case] * chips(topology)}")
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(case: str, topology: str, report: dict, yardstick_line: str) -> dict:
    """The table's figures of one report."""
    return {"case": case, "topology": topology, "devices": report["devices"], "description": report["description"],
            "compile_s": round(report["compile_seconds"], 1),
            "memory_gib": round(report["memory"]["total"] / 2**30, 3), "fits": report["memory"]["fits"],
            "step": report["step"], "hbm_gb": round(report["step_bytes"] / 1e9, 3),
            "roofline_ms": round(report["roofline_seconds"] * 1e3, 3),
            "mfu_bound": None if report["mfu_bound"] is None else round(report["mfu_bound"], 3),
            "yardstick": yardstick_line}


def yardstick(script: str, dump: str, program: str) -> str:
    """The first line (and, for generation, the decoding loop's line) of another estimate over the dump."""
    out = subprocess.run([sys.executable, script, os.path.join(dump, f"{program}.hlo.txt")], capture_output=True,
                         text=True).stdout.splitlines()
    loop = [line.strip() for line in out if line.strip().startswith("while") and "x?" in line.split()[0]]
    return out[0] if program == "train" or not loop else f"{out[0]} | {loop[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="train16,train64,greedy,beam")
    parser.add_argument("--topologies", default="v5e:2x2,v5e:4x4,v6e:2x2")
    parser.add_argument("--fsdp", choices=("auto", "both"), default="both",
                        help="training: the default (auto: FSDP on TPU) and, with both, data-parallel too")
    parser.add_argument("--out", default="bench-tpu.jsonl")
    parser.add_argument("--yardstick", help="a script that estimates HBM bytes from an HLO dump")
    args = parser.parse_args()
    for topology in args.topologies.split(","):
        for case in args.cases.split(","):
            variants = [[]]
            if case in ROWS_PER_CHIP and args.fsdp == "both":
                variants = [[], ["fsdp=false"]]
            elif case not in ROWS_PER_CHIP and topology != args.topologies.split(",")[0]:
                continue  # generation runs on one chip: once
            for extra in variants:
                with tempfile.TemporaryDirectory() as dump:
                    report = run_case(case, topology, extra, dump)
                    line = yardstick(args.yardstick, dump, report["program"]) if args.yardstick else ""
                result = row(case + ("-dp" if extra else ""), topology, report, line)
                print(json.dumps(result), flush=True)
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
