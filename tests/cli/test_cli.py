"""The `bbsmall` command: chat (once and REPL), batch generate (order, bad lines, kill and resume), convert, errors."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bbsmall_jax as bb
from bbsmall_jax.cli import main as cli
from bbsmall_jax.cli.batch import run_batch
from bbsmall_jax.cli.chat import ChatSession, run_repl
from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
from bbsmall_jax.runtime.responder import Responder, load_chat_model

FAST = ["--num-beams", "1", "--max-length", "8", "--min-length", "0"]


def test_chat_once_on_the_embedded_demo_model(capsys):
    assert os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors"))
    assert cli.main(["chat", "--once", "hello, how are you?"]) == 0
    reply = capsys.readouterr().out.strip()
    assert reply and len(reply.split()) >= 2


def test_console_script_runs(model_dir):
    result = subprocess.run([sys.executable, "-m", "bbsmall_jax", "chat", "--model", model_dir, "--once", "hi",
                             *FAST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_repl_two_turns_reset_quit(responder):
    session = ChatSession(responder)
    stdin = io.StringIO("hello there\nwhat do you like to do?\n\n/reset\nhi again\n/quit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(session, stdin, stdout, stderr) == 0
    lines = stdout.getvalue().splitlines()
    assert [line.startswith("bot> ") for line in lines] == [True, True, False, True]
    assert lines[2] == "(conversation reset)"
    assert len(session.history) == 2 and session.history[0] == "hi again"
    assert "empty message ignored" in stderr.getvalue()


class EchoResponder:
    """Answers at once with the last turn; `hold` makes the first reply wait until it is set."""

    def __init__(self, hold=None):
        self.hold, self.started, self.calls = hold, threading.Event(), 0

    def reply(self, contexts):
        self.calls += 1
        self.started.set()
        if self.hold is not None and self.calls == 1:
            self.hold.wait(30)
        return [f"echo {contexts[0][-1]}"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_repl_help_unknown_commands_and_ctrl_d():
    session = ChatSession(EchoResponder(), compile_ahead=False)
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(session, Terminal("/help\n/nope\n//slash\nhi\n"), stdout, stderr) == 0
    out = stdout.getvalue()
    assert all(command in out for command in ("/help", "/reset", "/quit"))
    assert "unknown command /nope" in stderr.getvalue()
    assert session.history == ["/slash", "echo /slash", "hi", "echo hi"]  # commands never reach the model
    assert out.endswith("you> bot> echo hi\nyou> \n")  # end of input leaves the prompt's line


def ctrl_c_during_a_reply(target: str) -> dict:
    """Two messages; Ctrl-C (sent to the process, or to a thread other than the main one) while the first
    reply is being made. What the session shows, and whether the cancel came while the reply still ran."""
    hold = threading.Event()
    session = ChatSession(EchoResponder(hold), compile_ahead=False)
    cancelled_while_busy = []
    stdout, stderr = io.StringIO(), io.StringIO()

    def interrupt():
        session.responder.started.wait(30)
        if target == "process":
            os.kill(os.getpid(), signal.SIGINT)
        else:  # as the OS may deliver it
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        deadline = time.monotonic() + 20
        while "(reply cancelled)" not in stderr.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        cancelled_while_busy.append("(reply cancelled)" in stderr.getvalue())
        hold.set()

    threading.Thread(target=interrupt, daemon=True).start()
    status = run_repl(session, io.StringIO("first\nsecond\n"), stdout, stderr)
    return {"status": status, "cancelled_while_busy": cancelled_while_busy,
            "stdout": stdout.getvalue().splitlines(), "history": session.history}


@pytest.mark.parametrize("target", ["process", "other thread"])
def test_ctrl_c_cancels_the_reply_and_keeps_the_session(target):
    # In a fresh process with Python's own SIGINT handler, as a terminal starts it: the suite's process may
    # have SIGINT ignored (which a child inherits), and then no Ctrl-C ever arrives.
    script = (f"import json, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_cli; "
              f"print(json.dumps(test_cli.ctrl_c_during_a_reply({target!r})))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "status": 0, "cancelled_while_busy": [True], "stdout": ["bot> echo second"],
        "history": ["second", "echo second"]}


def test_history_is_truncated_from_the_left(responder):
    session = ChatSession(responder)
    long_turn = "tell me about your favourite food and the places you travelled " * 6
    for _ in range(3):
        session.send(long_turn)
    ids = responder.context_ids(session.history + ["and now?"])
    assert 0 < len(ids) <= responder.max_context_tokens == 64


def test_ids_without_a_token_are_never_generated(model_dir):
    """A model vocabulary padded past the tokenizer's: replies decode instead of failing on an unknown id."""
    model, tokenizer = load_chat_model(model_dir)
    padded = bb.BlenderbotSmallForConditionalGeneration(model.config.replace(vocab_size=len(tokenizer) + 8), seed=3)
    padded.params["final_logits_bias"] = padded.params["final_logits_bias"].at[len(tokenizer):].set(20.0)
    responder = Responder(padded, tokenizer, dict(num_beams=1, max_length=8, min_length=0))
    ids = responder.reply_ids([responder.context_ids(["hello there"])])[0]
    assert max(ids) < len(tokenizer) and responder.decode(ids) == responder.reply([["hello there"]])[0]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


INPUT_LINES = [
    json.dumps({"context": ["hi", "hello! how are you?", "good, you?"], "id": 1}),
    json.dumps({"text": "what is your favourite food?", "id": 2}),
    "{this is not json",
    json.dumps({"context": "i like dogs", "id": 4}),
    json.dumps({"context": [], "id": 5}),
    json.dumps({"text": "do you play any sports? i play tennis every weekend with my brother", "id": 6}),
    json.dumps({"context": ["bye"], "id": 7}),
]


def expected_replies(responder):
    turns = {1: ["hi", "hello! how are you?", "good, you?"], 2: ["what is your favourite food?"],
             4: ["i like dogs"], 6: ["do you play any sports? i play tennis every weekend with my brother"],
             7: ["bye"]}
    return {k: responder.reply([v])[0] for k, v in turns.items()}


def test_generate_keeps_order_and_reports_bad_lines(responder, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", INPUT_LINES)
    log = io.StringIO()
    summary = run_batch(responder, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), batch_size=2,
                        log=log, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 4, 6, 7]
    assert summary["replies"] == 5 and summary["skipped"] == 2
    assert "in.jsonl:3: not valid JSON" in log.getvalue() and "in.jsonl:5" in log.getvalue()
    expected = expected_replies(responder)
    assert {r["id"]: r["reply"] for r in rows} == expected
    assert rows[0]["context"] == ["hi", "hello! how are you?", "good, you?"]
    with pytest.raises(FileExistsError, match="--resume"):
        run_batch(responder, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), show_progress=False)


def test_generate_fatal_bad_line(responder, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", INPUT_LINES)
    with pytest.raises(ValueError, match="in.jsonl:3"):
        run_batch(responder, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), on_error="fail",
                  show_progress=False, log=io.StringIO())


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def test_killed_then_resumed_run_writes_everything_exactly_once(responder, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", INPUT_LINES)
    out = tmp_path / "out.jsonl"
    real = Responder.reply_ids
    calls = {"n": 0}

    def dying(self, contexts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(out, "a") as f:
                f.write('{"partial": ')  # a half-written line, as a kill mid-write leaves
            raise Killed()
        return real(self, contexts, **kw)

    monkeypatch.setattr(Responder, "reply_ids", dying)
    with pytest.raises(Killed):
        run_batch(responder, str(tmp_path / "in.jsonl"), str(out), batch_size=1, window=2,
                  show_progress=False, log=io.StringIO(), engine_steps=None)  # static batches: one call a record
    done_before = len(out.read_text().splitlines())
    assert 1 <= done_before < 5
    monkeypatch.setattr(Responder, "reply_ids", real)
    run_batch(responder, str(tmp_path / "in.jsonl"), str(out), batch_size=1, window=2, resume=True,
              show_progress=False, log=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 4, 6, 7]
    assert {r["id"]: r["reply"] for r in rows} == expected_replies(responder)
    assert not os.path.exists(str(out) + ".progress.json")


def test_generate_command_end_to_end(model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", INPUT_LINES[:2])
    code = cli.main(["generate", "--model", model_dir, "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), "--quiet", "--summary-json", *FAST])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["replies"] == 2


def test_demo_names_the_embedded_model(tmp_path, monkeypatch, capsys):
    from bbsmall_jax.runtime.models import model_directory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert model_directory("demo") == model_directory(None) == DEMO_MODEL_DIR
    assert model_directory("./demo") == "./demo"  # a directory named demo
    assert cli.main(["convert", "demo", "copy", "--dtype", "bfloat16"]) == 0
    with open(os.path.join(DEMO_MODEL_DIR, "config.json")) as original, open("copy/config.json") as copy:
        assert json.load(original)["d_model"] == json.load(copy)["d_model"]
    assert os.path.isfile("copy/vocab.json") and "wrote" in capsys.readouterr().out
    assert cli.main(["convert", "demo", "copy"]) == 2  # a directory holding files needs --overwrite
    assert "copy is not empty; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["convert", "demo", "copy", "--overwrite"]) == 0


def test_convert_command_round_trip(model_dir, tmp_path):
    assert cli.main(["convert", model_dir, str(tmp_path / "converted")]) == 0
    a = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(model_dir)
    b = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path / "converted")
    ids = np.array([[5, 6, 7, 2]])
    assert np.array_equal(a(input_ids=ids, decoder_input_ids=[[1, 5]]).logits,
                          b(input_ids=ids, decoder_input_ids=[[1, 5]]).logits)
    assert os.path.isfile(tmp_path / "converted" / "vocab.json")


@pytest.mark.parametrize("argv, message", [
    (["chat", "--model", "/nonexistent/model/dir", "--once", "hi"], "no such directory"),
    (["chat", "--once", "   "], "empty message"),
    (["generate", "--input", "/nonexistent.jsonl", "--output", "/tmp/x.jsonl"], "no such input file"),
    (["chat", "--once", "hi", "--temperature", "0.5"], "only apply with --sample"),
    (["chat", "--once", "hi", "--max-context", "0"], "context limit (--max-context, max_context_tokens) must be an "
                                                     "integer in [1, 32], the model's positions; got 0"),
    (["chat", "--once", "hi", "--max-context", "129"], "got 129"),
    (["generate", "--input", "in.jsonl", "--output", "out.jsonl", "--resume", "--overwrite"], "not both"),
    (["generate", "--input", "in.jsonl", "--output", "out.jsonl", "--window", "0"], "--window must be at least 1"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_turn_separator_has_one_name_and_reads_the_old_spelling(model_dir, capsys):
    args = cli.build_parser().parse_args(["chat", "--turn-separator", "end-start"])
    assert args.turn_separator == "end_start"
    assert cli.main(["chat", "--model", model_dir, "--turn-separator", "end_start", "--once", "hi", *FAST]) == 0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["chat", "--turn-separator", "tab"])
    assert "turn separator 'tab' is not one of newline, end_start" in capsys.readouterr().err


# Each command line answers (help, a usage error, a missing file or model) without importing JAX.
BEFORE_JAX = """
import contextlib, io, json, sys, time
from bbsmall_jax.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    results.append([argv, code, err.getvalue(), time.perf_counter() - start, "jax" in sys.modules])
print(json.dumps(results))
"""


def test_help_and_errors_answer_before_jax_is_imported(tmp_path):
    commands = ["chat", "generate", "serve", "eval", "convert", "info"]
    cases = [["--help"], *([name, "--help"] for name in commands),
             ["generate", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out.jsonl")],
             ["eval", "--data", str(tmp_path / "missing.jsonl")],
             ["chat", "--model", str(tmp_path / "no_model"), "--once", "hi"],
             ["serve", "--model", str(tmp_path / "no_model")], ["serve", "--port", "99999"],
             ["convert", str(tmp_path / "no_model"), str(tmp_path / "out")],
             ["train", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "run")],
             ["chat", "--once", "hi", "--temperature", "0.5"], ["chat", "--no-such-flag"]]
    result = subprocess.run([sys.executable, "-c", BEFORE_JAX, json.dumps(cases)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    for argv, code, err, seconds, jax_loaded in json.loads(result.stdout.splitlines()[-1]):
        assert not jax_loaded, argv
        assert code == (0 if "--help" in argv else 2), (argv, err)
        if "--help" not in argv and argv[-1] != "--no-such-flag" and "--port" not in argv and "0.5" not in argv:
            assert "missing" in err or "no_model" in err, (argv, err)  # names the file


def test_generate_path_errors_name_the_path_before_jax_is_imported(tmp_path):
    source, done = tmp_path / "in.jsonl", tmp_path / "done.jsonl"
    source.write_text('{"context": ["hi"]}\n')
    done.write_text("")
    generate = lambda *paths: ["generate", "--input", *paths[:1], "--output", *paths[1:]]
    cases = {  # message -> argv; each message names the path
        f"--input {tmp_path} is a directory; name a JSONL file": generate(str(tmp_path), str(tmp_path / "o.jsonl")),
        "--output /dev/null is not a regular file": generate(str(source), "/dev/null", "--overwrite"),
        f"no such directory {tmp_path / 'nowhere'}": generate(str(source), str(tmp_path / "nowhere" / "o.jsonl")),
        f"{done} exists; pass --resume": generate(str(source), str(done)),
        f"--output {source} is the input file": generate(str(source), str(source), "--overwrite"),
    }
    result = subprocess.run([sys.executable, "-c", BEFORE_JAX, json.dumps(list(cases.values()))],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    for message, (argv, code, err, seconds, jax_loaded) in zip(cases, json.loads(result.stdout.splitlines()[-1])):
        assert code == 2 and message in err and not jax_loaded, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["done.jsonl", "in.jsonl"]  # no output or progress file left behind


def test_every_flag_has_help():
    import argparse

    from bbsmall_jax.cli.train import build_parser as train_parser

    def actions(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from actions(sub)
            elif not isinstance(action, argparse._HelpAction):
                yield action

    missing = [a.option_strings or a.dest for p in (cli.build_parser(), train_parser()) for a in actions(p)
               if not a.help]
    assert not missing


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
