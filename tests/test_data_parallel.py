"""Data-parallel `generate` over 8 forced CPU devices equals a one-device run (in a subprocess, so the rest
of the suite keeps one device)."""

import json
import os
import subprocess
import sys

import pytest


def run_sharded(*args: str) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "bbsmall_jax.testing.sharded_generation", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("paths, strategies", [("portable", "greedy,beam,sample"), ("cpu", "beam")])
def test_eight_devices_give_the_one_device_output(paths, strategies):
    rows = run_sharded("--batches", "3,8,21", "--paths", paths, "--strategies", strategies)
    assert len(rows) == 3 * len(strategies.split(","))
    for row in rows:
        assert row["devices"] == 8, row
        assert row["same_tokens"] and row["same_filtered"], row
        # differently shaped matmuls round differently in the last bits; the tokens never differ
        assert row["max_score_difference"] < 1e-4, row
    assert any(row["sharded"] == 8 for row in rows)  # the batch really was spread over the devices
