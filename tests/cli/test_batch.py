"""Batch inference never loses or corrupts data: kills and resumes, a second writer, a damaged sidecar,
the input as output, undecodable lines, and the progress bar against messages."""

import fcntl
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from bbsmall_jax.cli.batch import run_batch
from bbsmall_jax.cli.batch_output import BatchError
from bbsmall_jax.records import RecordError
from bbsmall_jax.runtime.responder import Responder

LINES = [json.dumps({"id": i, "text": f"hello there number {i}, how are you today?"}) for i in range(12)]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))


def batch(responder, tmp_path, output="out.jsonl", **kwargs):
    """A run over in.jsonl; on static batches of 2 unless `engine_steps` is given, so that the kills below fall
    at known windows (the commit protocol is the same for the decode engine: see the last test)."""
    kwargs = {"batch_size": 2, "window": 3, "show_progress": False, "log": io.StringIO(), "engine_steps": None,
              **kwargs}
    return run_batch(responder, str(tmp_path / "in.jsonl"), str(tmp_path / output), **kwargs)


@pytest.fixture
def reference(responder, tmp_path):
    """The bytes of an uninterrupted run over LINES."""
    write_lines(tmp_path / "in.jsonl", LINES)
    batch(responder, tmp_path, "reference.jsonl")
    return (tmp_path / "reference.jsonl").read_bytes()


def killed_at(monkeypatch, call: int):
    """Make the `call`-th finishing of generated replies from now on die (a static batch's, or one record's in
    the decode engine); returns a function that undoes it."""
    real, calls = Responder.finished_replies, {"n": 0}

    def dying(self, rows, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed()
        return real(self, rows, **kw)

    monkeypatch.setattr(Responder, "finished_replies", dying)
    return lambda: monkeypatch.setattr(Responder, "finished_replies", real)


def test_a_second_kill_during_resume_leaves_no_nul_bytes(responder, reference, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    killed_at(monkeypatch, 3)  # window 1 (calls 1, 2) is committed, window 2 dies
    with pytest.raises(Killed):
        batch(responder, tmp_path)
    with open(out, "ab") as f:
        f.write(b'{"id": 3, "text": "half a li')  # bytes a kill mid-write leaves after the commit
    restore = killed_at(monkeypatch, 1)  # the resume dies before its first commit
    with pytest.raises(Killed):
        batch(responder, tmp_path, resume=True)
    restore()
    batch(responder, tmp_path, resume=True)
    assert b"\x00" not in out.read_bytes()
    assert out.read_bytes() == reference
    assert not os.path.exists(f"{out}.progress.json")


def test_a_second_writer_is_refused(responder, tmp_path, monkeypatch):
    write_lines(tmp_path / "in.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    killed_at(monkeypatch, 3)
    with pytest.raises(Killed):
        batch(responder, tmp_path)
    before = out.read_bytes(), (tmp_path / "out.jsonl.progress.json").read_bytes()
    holder = os.open(out, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # what the first `--resume` run holds while it writes
    try:
        with pytest.raises(BatchError, match=r"out\.jsonl is being written by another"):
            batch(responder, tmp_path, resume=True)
    finally:
        os.close(holder)
    assert (out.read_bytes(), (tmp_path / "out.jsonl.progress.json").read_bytes()) == before


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
def test_input_as_output_is_refused_even_with_overwrite(responder, tmp_path, link):
    write_lines(tmp_path / "in.jsonl", LINES)
    original = (tmp_path / "in.jsonl").read_bytes()
    if link == "symlink":
        os.symlink(tmp_path / "in.jsonl", tmp_path / "alias.jsonl")
    elif link == "hard link":
        os.link(tmp_path / "in.jsonl", tmp_path / "alias.jsonl")
    output = "in.jsonl" if link == "same path" else "alias.jsonl"
    with pytest.raises(BatchError, match=f"--output .*{output} is the input file"):
        batch(responder, tmp_path, output, overwrite=True)
    assert (tmp_path / "in.jsonl").read_bytes() == original


def test_a_directory_as_output_is_refused(responder, tmp_path):
    write_lines(tmp_path / "in.jsonl", LINES)
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(BatchError, match=r"--output .*out\.jsonl is a directory"):
        batch(responder, tmp_path, overwrite=True)


def _interrupted(responder, tmp_path, monkeypatch):
    """An output with one committed window and a dying second one; returns (output, sidecar) paths."""
    write_lines(tmp_path / "in.jsonl", LINES)
    restore = killed_at(monkeypatch, 3)
    with pytest.raises(Killed):
        batch(responder, tmp_path)
    restore()
    return tmp_path / "out.jsonl", tmp_path / "out.jsonl.progress.json"


@pytest.mark.parametrize("damage, message", [
    (lambda p, size: {"next_line": 99999, "bytes": 999999}, r"expected \{"),
    (lambda p, size: dict(p, bytes=size + 10), r"records \d+ committed bytes, but .*out\.jsonl holds"),
    (lambda p, size: dict(p, bytes=size - 3), r"is not the end of a line"),
    (lambda p, size: dict(p, next_line=1), r"holds 3 committed lines, but only 0 input lines were read"),
    (lambda p, size: dict(p, next_line=100), r"input lines 1 to 99 were read, but .*in\.jsonl has 12"),
    (lambda p, size: "{not json", r"not valid JSON"),
])
def test_damaged_sidecar_is_refused_and_nothing_is_touched(responder, tmp_path, monkeypatch, damage, message):
    out, sidecar = _interrupted(responder, tmp_path, monkeypatch)
    progress = json.loads(sidecar.read_text())
    assert progress["bytes"] == out.stat().st_size and progress["next_line"] == 4
    damaged = damage(progress, progress["bytes"])
    sidecar.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    before = out.read_bytes(), sidecar.read_bytes()
    with pytest.raises(BatchError, match=r"out\.jsonl\.progress\.json: damaged progress file \(.*" + message):
        batch(responder, tmp_path, resume=True)
    assert (out.read_bytes(), sidecar.read_bytes()) == before


def test_resume_refuses_a_changed_input(responder, tmp_path, monkeypatch):
    out, sidecar = _interrupted(responder, tmp_path, monkeypatch)
    write_lines(tmp_path / "in.jsonl", [LINES[1]] + LINES[1:])
    before = out.read_bytes()
    with pytest.raises(BatchError, match=r"in\.jsonl changed since .*out\.jsonl was started: its first 3 lines"):
        batch(responder, tmp_path, resume=True)
    assert out.read_bytes() == before


def test_resume_refuses_other_settings(responder, tmp_path, monkeypatch):
    out, sidecar = _interrupted(responder, tmp_path, monkeypatch)
    before = out.read_bytes(), sidecar.read_bytes()
    other = Responder(responder.model, responder.tokenizer, dict(num_beams=1, max_length=6, min_length=0))
    with pytest.raises(BatchError, match=r"out\.jsonl was started with other settings \(generation: "
                                         r'\{"max_length": 8, .* then, \{"max_length": 6, .* now\)'):
        batch(other, tmp_path, resume=True)
    assert (out.read_bytes(), sidecar.read_bytes()) == before


def test_undecodable_line_is_reported_with_its_number_and_skipped(responder, tmp_path):
    write_lines(tmp_path / "in.jsonl", [LINES[0], b'{"text": "caf\xe9 au lait"}', LINES[2]])
    log = io.StringIO()
    summary = batch(responder, tmp_path, log=log)
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 2]
    assert summary["skipped"] == 1
    assert "skipped " + str(tmp_path / "in.jsonl") + ":2: not valid UTF-8 (byte 0xe9 at byte 14 " in log.getvalue()


def test_undecodable_line_fails_the_run_keeping_what_was_done(responder, reference, tmp_path):
    write_lines(tmp_path / "in.jsonl", LINES[:5] + [b'{"text": "\xff"}'] + LINES[6:])
    with pytest.raises(RecordError, match=r"in\.jsonl:6: not valid UTF-8 .*replies before it are committed"):
        batch(responder, tmp_path, on_error="fail")
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(reference.splitlines(keepends=True)[:5])
    write_lines(tmp_path / "in.jsonl", LINES)  # line 6 fixed; the five lines answered are unchanged
    batch(responder, tmp_path, resume=True, on_error="fail")
    assert (tmp_path / "out.jsonl").read_bytes() == reference


@pytest.mark.parametrize("line, field", [(r'{"id": 1, "text": "bad \ud800"}', "text"),
                                         (r'{"id": "\udfff", "text": "fine"}', "id"),
                                         (r'{"context": ["ok", "x\ud800y"]}', "context.1")])
def test_lone_surrogate_record_is_skipped(responder, tmp_path, line, field):
    write_lines(tmp_path / "in.jsonl", [LINES[0], line, LINES[2]])
    log = io.StringIO()
    batch(responder, tmp_path, log=log)
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 2]
    assert f'in.jsonl:2: "{field}" holds an escaped lone surrogate' in log.getvalue()


@pytest.mark.parametrize("line", ['{"text": 5}', '{"context": []}', '[1]', '{"context": ["a"], "text": "b"}',
                                  b'{"text": "\xc3"}', r'{"text": "\ud800"}', '{"text": "a", '])
def test_training_and_batch_inference_read_records_by_one_rule(responder, tmp_path, line):
    from bbsmall_jax.train.data import DataError, read_jsonl

    write_lines(tmp_path / "in.jsonl", [line])
    with pytest.raises(DataError) as training:
        read_jsonl(tmp_path / "in.jsonl")
    with pytest.raises(RecordError) as inference:
        batch(responder, tmp_path, on_error="fail")
    assert str(inference.value).startswith(str(training.value))
    assert str(training.value).startswith(f"{tmp_path / 'in.jsonl'}:1: ")


def test_byte_order_mark_before_the_first_line_is_dropped(responder, tmp_path):
    write_lines(tmp_path / "in.jsonl", [b"\xef\xbb\xbf" + LINES[0].encode(), LINES[1]])
    assert batch(responder, tmp_path)["replies"] == 2


def test_messages_never_overwrite_the_progress_bar(responder, tmp_path):
    write_lines(tmp_path / "in.jsonl", [LINES[0], "{broken", LINES[2], "[]", LINES[4]])
    log = io.StringIO()
    batch(responder, tmp_path, log=log, show_progress=True, window=1, batch_size=1)
    messages = [line for line in log.getvalue().split("\n") if "in.jsonl:" in line]
    assert len(messages) == 2
    for line in messages:  # the bar was cleared ("\r...\r") and the message starts its own line
        assert line.split("\r")[-1].startswith("skipped "), repr(line)


FAST = ["--num-beams", "1", "--max-length", "8", "--min-length", "0"]


def _committed_line(sidecar) -> int:
    """The next input line the sidecar records (0 while there is none)."""
    try:
        return json.loads(sidecar.read_text())["next_line"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_when(process, sidecar, line: Optional[int], delay: float) -> bool:
    """SIGKILL `process` `delay` seconds after its sidecar reaches input line `line` (after its start when
    `line` is None); False if it ended first."""
    while line is not None and process.poll() is None and _committed_line(sidecar) < line:
        time.sleep(0.002)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    return True


def test_twenty_kills_at_random_moments_lose_and_repeat_nothing(model_dir, tmp_path):
    """`kill -9` of `bbsmall generate --resume` at 20 random moments of a 24-window run, each followed by a
    resume: the committed bytes are always a prefix of an uninterrupted run's, and every completed output
    equals it (each input line exactly once, in order, no NUL byte). One kill in five lands at a random time
    of start-up; the others a random 0-30 ms after the run commits one of the next 12 lines: while it
    generates, writes or syncs the next window, or replaces the sidecar."""
    lines = [json.dumps({"id": i, "text": f"line {i}: what do you like to do on weekends?"}) for i in range(96)]
    write_lines(tmp_path / "in.jsonl", lines)
    env = dict(os.environ, BBSMALL_CACHE_DIR=str(tmp_path / "xla"))

    def command(output: str) -> list[str]:
        return [sys.executable, "-m", "bbsmall_jax", "generate", "--model", model_dir, "--input",
                str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output), "--window", "4", "--batch-size",
                "2", "--quiet", "--resume", "--scheduler", "engine", *FAST]

    subprocess.run(command("reference.jsonl"), env=env, check=True, capture_output=True, timeout=600)  # compiles
    reference = (tmp_path / "reference.jsonl").read_bytes()
    assert [json.loads(line)["id"] for line in reference.splitlines()] == list(range(96))

    out, sidecar = tmp_path / "out.jsonl", tmp_path / "out.jsonl.progress.json"
    rng, kills, mid_run, completed = random.Random(14), 0, 0, 0
    while kills < 20:
        process = subprocess.Popen(command("out.jsonl"), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        done = max(_committed_line(sidecar), 1)
        if done > len(lines):  # all committed: let the run remove its sidecar and end
            kills += _kill_when(process, sidecar, len(lines) + 2, 0.0)
        elif rng.random() < 0.2:
            kills += _kill_when(process, sidecar, None, rng.uniform(0.0, 3.0))
        else:
            line = min(done + rng.randint(1, 12), len(lines))  # one to three windows on: kills spread over the run
            kills += _kill_when(process, sidecar, line, rng.uniform(0.0, 0.03))
        code = process.wait()
        data = out.read_bytes() if out.exists() else b""
        assert b"\x00" not in data
        if code == 0:  # it finished first: complete and exact; start over to kill again
            assert data == reference and not sidecar.exists()
            out.unlink()
            completed += 1
            continue
        if sidecar.exists():
            committed = json.loads(sidecar.read_text())["bytes"]
            assert data[:committed] == reference[:committed]
            mid_run += 0 < committed < len(reference)
    final = subprocess.run(command("out.jsonl"), env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert out.read_bytes() == reference
    print(f"20 kills: {mid_run} between the first commit and the last, {completed} runs ended before their kill")
    assert mid_run >= 5


def test_a_kill_in_the_decode_engine_stops_the_run_and_resume_completes_it(responder, reference, tmp_path,
                                                                          monkeypatch):
    """A record dying in the engine's thread ends the run with its error (the windows before it committed, the
    engine's other requests cancelled); --resume then writes the uninterrupted run's bytes."""
    out = tmp_path / "out.jsonl"
    restore = killed_at(monkeypatch, 8)  # a record of the third window
    with pytest.raises(Killed):
        batch(responder, tmp_path, engine_steps=3)
    restore()
    assert reference.startswith(out.read_bytes()) and len(out.read_bytes().splitlines()) in (3, 6)
    batch(responder, tmp_path, resume=True, engine_steps=3)
    assert out.read_bytes() == reference
