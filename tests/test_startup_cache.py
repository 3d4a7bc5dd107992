"""The start-up cache: a generation program compiles once, later processes load it (no tracing), same replies;
the chat loop says it is compiling only when it is."""

import io

import numpy as np

from bbsmall_jax import pretrained, startup_cache
from bbsmall_jax.cli.chat import COMPILING, ChatSession, run_repl
from bbsmall_jax.cli.responder import Responder
from bbsmall_jax.generation.prepare import default_key


def chat(responder, text):
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(ChatSession(responder), io.StringIO(text), stdout, stderr) == 0
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


def test_default_key_is_prng_key_zero():
    import jax

    np.testing.assert_array_equal(default_key(), jax.random.PRNGKey(0))
