"""`bbsmall generate` on every device and every process: 8 forced devices and 2 processes write the bytes of
one device and one process, also after a kill -9 and --resume; the decode engine and static batches, overlapped
or not, write the same bytes."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bbsmall_jax.cli.batch import run_batch
from bbsmall_jax.runtime.responder import Responder
from bbsmall_jax.testing import loopback_coordinator

LINES = ([json.dumps({"id": i, "context": [f"hi {i}", "what do you do on weekends? " * (i % 4 + 1)]})
          for i in range(40)])
LINES[9], LINES[17] = "", "{not json"  # a blank line and a bad one, passed over the same way everywhere
# Runs `bbsmall` with each commit of a window followed by a long pause, so that a test can kill the process
# at a known point: after its first committed window, never after it has finished.
HOLD_AFTER_COMMIT = """
import time
from bbsmall_jax.cli import batch_output
commit = batch_output.Output.commit
def hold(self, *args):
    commit(self, *args)
    time.sleep(600)
batch_output.Output.commit = hold
from bbsmall_jax.cli.main import entry
entry()
"""
FLAGS = ["--scheduler", "engine", "--window", "6", "--batch-size", "4", "--num-beams", "2", "--max-length", "8",
         "--min-length", "0", "--quiet", "--summary-json"]


@pytest.fixture(scope="module")
def job(model_dir, tmp_path_factory):
    """(run(output, *flags, env=...) -> completed process, the one-device one-process reference bytes, the
    directory the outputs go to); one reference run and one compilation cache for the module."""
    tmp_path = tmp_path_factory.mktemp("batch_devices")
    (tmp_path / "in.jsonl").write_text("\n".join(LINES) + "\n")
    env = dict(os.environ, BBSMALL_CACHE_DIR=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")

    def command(output, *flags, hold=False):
        launcher = ["-c", HOLD_AFTER_COMMIT] if hold else ["-m", "bbsmall_jax"]
        return [sys.executable, *launcher, "generate", "--model", model_dir, "--input",
                str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output), *FLAGS, *flags]

    def run(output, *flags, extra_env=None, background=False, hold=False):
        full_env = dict(env, **(extra_env or {}))
        if background:
            return subprocess.Popen(command(output, *flags, hold=hold), env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        done = subprocess.run(command(output, *flags), env=full_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("reference.jsonl")
    return run, (tmp_path / "reference.jsonl").read_bytes(), tmp_path


def summary(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_eight_devices_write_the_one_device_bytes(job):
    run, reference, tmp_path = job
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    done = run("eight.jsonl", extra_env={"XLA_FLAGS": flags})
    assert (tmp_path / "eight.jsonl").read_bytes() == reference
    assert summary(done)["devices"] == 8 and summary(done)["replies"] == 38
    assert [json.loads(line)["id"] for line in reference.splitlines()] == [i for i in range(40) if i not in (9, 17)]


def _processes(run, output, *flags, hold=False):
    coordinator = loopback_coordinator()
    if coordinator is None:
        pytest.skip("the host name does not resolve to a loopback address; CPU collectives would leave loopback")
    return [run(output, "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i), *flags,
                background=True, hold=hold) for i in range(2)]


def _wait(processes, timeout=600):
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]
    return out


def test_two_processes_write_the_one_process_bytes_also_after_a_kill(job):
    run, reference, tmp_path = job
    out = _wait(_processes(run, "two.jsonl"))
    assert (tmp_path / "two.jsonl").read_bytes() == reference
    assert json.loads(out.strip().splitlines()[-1])["processes"] == 2
    assert not list(tmp_path.glob("two.jsonl.part-*"))

    workers = _processes(run, "killed.jsonl", hold=True)
    part = tmp_path / "killed.jsonl.part-00001-of-00002.progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (part.exists() and json.loads(part.read_text())["bytes"] > 0):
        time.sleep(0.05)  # until process 1 has committed a window of its share (then it holds)
    assert workers[1].poll() is None, workers[1].communicate()[1][-3000:]
    os.kill(workers[1].pid, signal.SIGKILL)
    os.kill(workers[0].pid, signal.SIGKILL)  # the job goes down with its process, as a scheduler restarts it
    for worker in workers:
        worker.communicate()
    assert not (tmp_path / "killed.jsonl").exists()
    _wait(_processes(run, "killed.jsonl", "--resume"))
    assert (tmp_path / "killed.jsonl").read_bytes() == reference
    assert not list(tmp_path.glob("killed.jsonl.part-*"))


@pytest.mark.parametrize("beams", [1, 2])
def test_engine_and_static_batches_write_the_same_bytes_overlapped_or_not(responder, tmp_path, beams):
    """The decode engine's slots (the default) and static generate batches, each with and without overlap."""
    (tmp_path / "in.jsonl").write_text("\n".join(LINES) + "\n")
    searching = Responder(responder.model, responder.tokenizer, {**responder.generation_kwargs, "num_beams": beams})
    outputs = {}
    for engine_steps, overlap in ((3, True), (3, False), (None, True), (None, False)):
        output = tmp_path / f"{engine_steps}-{overlap}.jsonl"
        run_batch(searching, str(tmp_path / "in.jsonl"), str(output), batch_size=4, window=5, overlap=overlap,
                  show_progress=False, log=io.StringIO(), engine_steps=engine_steps)
        outputs[engine_steps, overlap] = output.read_bytes()
    assert len(set(outputs.values())) == 1 and len(outputs[3, True].splitlines()) == 38
