"""The start-up cache: a generation program compiles once, later processes load it (no tracing), same replies;
the chat loop says it is compiling only when it is, and compiles the next message's programs while the user types."""

import io
import threading

import numpy as np

from bbsmall_jax import pretrained, startup_cache
from bbsmall_jax.cli.chat import COMPILING, FINISHING, ChatSession, run_repl
from bbsmall_jax.generation.prepare import bucket_length, default_key
from bbsmall_jax.runtime.responder import Responder


def chat(responder, text):
    """(stdout, stderr) of a chat session reading `text` at once, nothing compiled ahead."""
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(ChatSession(responder, compile_ahead=False), io.StringIO(text), stdout, stderr) == 0
    return stdout.getvalue(), stderr.getvalue()


def test_programs_compile_once_then_load_from_disk(responder, tmp_path):
    expected = responder.reply([["hi"]])[0], responder.reply([["hello there"]])[0]  # jit, no cache
    with startup_cache.enabled(str(tmp_path)):
        out, err = chat(responder, "hi\n/reset\nhello there\n")  # one length bucket: one program
    assert err.count(COMPILING) == 1
    assert out.splitlines() == [f"bot> {expected[0]}", "(conversation reset)", f"bot> {expected[1]}"]
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "startup").iterdir())
    assert stored == ["program"]

    model = responder.model
    pretrained._param_shapes.cache_clear()  # as a new process: nothing in memory, the disk has it
    with startup_cache.enabled(str(tmp_path)):
        fresh = Responder(type(model).from_pretrained(model._loaded_from), responder.tokenizer,
                          responder.generation_kwargs)
        out, err = chat(fresh, "hi\n")
    assert COMPILING not in err and out.splitlines() == [f"bot> {expected[0]}"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "startup").iterdir()) == ["param_shapes", "program"]


class Typist(io.StringIO):
    """A terminal where each line after the first is typed once the session's background compile is over (a
    user slower than the compiler)."""

    def __init__(self, text: str, session: "WatchedSession"):
        super().__init__(text)
        self.session, self.lines = session, 0

    def isatty(self):
        return True

    def readline(self, *args):
        if self.lines:
            assert self.session.prepared.acquire(timeout=300), "no background compile after a reply"
        self.lines += 1
        return super().readline(*args)


class WatchedSession(ChatSession):
    """A session that counts its finished background compiles."""

    def __init__(self, responder):
        super().__init__(responder)
        self.prepared = threading.Semaphore(0)

    def prepare_next(self):
        try:
            super().prepare_next()
        finally:
            self.prepared.release()


def test_chat_compiles_the_next_buckets_in_the_background(responder, tmp_path):
    """Six turns whose contexts grow through three length buckets on a cold cache: only the first turn waits
    for a compile; the others were compiled while the user typed, and the replies are unchanged."""
    messages = ["hi", "how are you?", "do you have a dog?", "what food do you like?", "where did you travel?",
                "and what did you eat there?"]
    plain = ChatSession(responder, compile_ahead=False)
    expected = [f"bot> {plain.send(message)}" for message in messages]
    buckets = [session_bucket(responder, plain.history[:2 * n] + [m]) for n, m in enumerate(messages)]
    assert len(set(buckets)) >= 3, buckets
    compiles = []
    with startup_cache.enabled(str(tmp_path)), startup_cache.compile_listener(lambda: compiles.append(1)):
        session = WatchedSession(responder)
        stdout, stderr = io.StringIO(), io.StringIO()
        assert run_repl(session, Typist("\n".join(messages) + "\n", session), stdout, stderr) == 0
    assert [line for line in stdout.getvalue().replace("you> ", "").splitlines() if line] == expected
    assert stderr.getvalue().count(COMPILING) == 1 and FINISHING not in stderr.getvalue()
    assert len(compiles) >= len(set(buckets)) and set(buckets) <= session.compiled_buckets


def test_piped_chat_compiles_nothing_ahead(responder, tmp_path):
    """Input from a pipe has no typing to hide a compile behind: nothing is compiled beyond the replies."""
    compiles = []
    with startup_cache.enabled(str(tmp_path)), startup_cache.compile_listener(lambda: compiles.append(1)):
        session = ChatSession(responder)
        assert run_repl(session, io.StringIO("hi\n"), io.StringIO(), io.StringIO()) == 0
    assert len(compiles) == 1 and len(session.compiled_buckets) == 1


def session_bucket(responder, turns) -> int:
    """The context bucket of a reply to these turns."""
    return bucket_length(len(responder.context_ids(turns)), responder.model.config.max_position_embeddings)


def test_default_key_is_prng_key_zero():
    import jax

    np.testing.assert_array_equal(default_key(), jax.random.PRNGKey(0))
