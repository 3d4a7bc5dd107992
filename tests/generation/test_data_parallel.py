"""Data-parallel `generate` over 8 forced CPU devices equals a one-device run (in a subprocess, so the rest
of the suite keeps one device)."""

import json
import os
import subprocess
import sys



def run_sharded(*args: str) -> list[dict]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "bbsmall_jax.testing.sharded_generation", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_eight_devices_give_the_one_device_output():
    """On the portable path, which accelerators run; 21 rows spread over 8 devices need padding rows
    (test_batch_devices runs the CPU path on 8 devices, with batches of 4 prompts)."""
    rows = run_sharded("--batches", "21", "--paths", "portable", "--strategies", "greedy,beam,sample")
    assert len(rows) == 3
    for row in rows:
        assert row["devices"] == 8, row
        assert row["same_tokens"] and row["same_filtered"], row
        # differently shaped matmuls round differently in the last bits; the tokens never differ
        assert row["max_score_difference"] < 1e-4, row
    assert any(row.get("sharded") == 8 for row in rows)  # the batch really was spread over the devices
