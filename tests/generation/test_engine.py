"""The decode engine: every request gets exactly what `generate` gives it alone, whatever joins beside it and
whenever it joins; no compilation after warm-up; cancelled and finished requests free their slots."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bbsmall_jax.compilations import CompilationCounter
from bbsmall_jax.generation.engine import DecodeEngine

both_paths = pytest.mark.usefixtures("decode_path")
EOS = 2
CHAT = dict(max_length=20, no_repeat_ngram_size=3, min_length=4)  # the engine's settings in most tests


def key(seed: int) -> np.ndarray:
    """A raw threefry key (`jax.random.PRNGKey(seed)` for small seeds), made without running a program."""
    return np.array([0, seed], np.uint32)


def trimmed(row) -> list[int]:
    """A generated row up to and including its first EOS after the start token (padding dropped)."""
    row = [int(t) for t in row]
    end = next((i for i, token in enumerate(row[1:], 1) if token == EOS), len(row) - 1)
    return row[:end + 1]


def run_interleaved(engine: DecodeEngine, requests: list[tuple[list[int], dict]], joins: list[int]):
    """Submit request i before cycle `joins[i]`, cycle until idle; the submitted EngineRequests."""
    submitted, cycle = [], 0
    while len(submitted) < len(requests) or engine.busy:
        for i, (ids, kwargs) in enumerate(requests):
            if joins[i] == cycle:
                submitted.append(engine.submit(ids, **kwargs))
        engine.cycle()
        cycle += 1
    return submitted


def assert_as_alone(model, engine_kwargs: dict, requests, submitted) -> None:
    for (ids, kwargs), request in zip(requests, submitted):
        alone = model.generate(np.asarray([ids]), **{**engine_kwargs, **kwargs})
        assert [trimmed(row) for row in request.result] == [trimmed(row) for row in np.asarray(alone)], kwargs


def contexts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 101, rng.integers(2, 14)).tolist() for _ in range(count)]


MIX = [dict(), dict(num_beams=4, length_penalty=0.65),
       dict(do_sample=True, temperature=0.7, top_p=0.9, prng_key=key(5)), dict(max_length=9),
       dict(num_beams=3, num_return_sequences=2, early_stopping=False),
       dict(do_sample=True, num_return_sequences=3, prng_key=key(7)), dict(min_length=15),
       dict(num_beams=2, length_penalty=-0.5, max_length=14), dict(do_sample=True, prng_key=key(11), temperature=1.3),
       dict(), dict(num_beams=4, num_return_sequences=4, min_length=8)]


@both_paths
def test_interleaved_requests_equal_generate_alone(models):
    _, ours = models
    engine = DecodeEngine(ours, CHAT, slots=8, group_width=4, steps=3)
    requests = list(zip(contexts(len(MIX), 0), MIX))
    submitted = run_interleaved(engine, requests, joins=[0, 0, 1, 1, 2, 4, 4, 5, 7, 9, 12])
    assert_as_alone(ours, CHAT, requests, submitted)
    assert engine.slots_in_use == 0 and not engine.busy


def test_checkpoint_beam_settings_beside_greedy_and_sampling(models):
    """The 90M checkpoint's search (beam 10, min_length 20, length penalty 0.65, no repeated trigrams, early
    stopping) in groups of 10 slots, with single-slot requests in the lanes' other slots."""
    _, ours = models
    settings = dict(num_beams=10, max_length=28, min_length=20, length_penalty=0.65, no_repeat_ngram_size=3,
                    early_stopping=True)
    engine = DecodeEngine(ours, settings, slots=20, group_width=10, steps=4)
    mix = [dict(), dict(num_beams=1), dict(), dict(do_sample=True, num_beams=1, prng_key=key(3)),
           dict(num_return_sequences=3), dict(num_beams=1, min_length=5)]
    requests = list(zip(contexts(len(mix), 1), mix))
    submitted = run_interleaved(engine, requests, joins=[0, 0, 2, 3, 3, 6])
    assert_as_alone(ours, settings, requests, submitted)


def test_tokens_stream_per_row_and_make_up_the_result(models):
    _, ours = models
    engine = DecodeEngine(ours, CHAT, slots=4, group_width=4, steps=2)
    streamed, finished = [[], [], []], []
    request = engine.submit(contexts(1, 2)[0], do_sample=True, num_return_sequences=3, prng_key=key(1),
                            on_token=lambda row, token: streamed[row].append(token), on_finish=finished.append)
    calls = 0
    while engine.busy:
        engine.cycle()
        calls += 1
    assert finished == [request] and calls > 1
    assert [[1] + tokens for tokens in streamed] == request.result


def test_warm_up_then_any_request_mix_compiles_nothing(models):
    _, ours = models
    engine = DecodeEngine(ours, CHAT, slots=8, group_width=4, steps=3, max_context=40)
    engine.warm_up()
    rng = np.random.default_rng(3)
    with CompilationCounter() as compiled:
        for i in range(14):
            kind = rng.integers(3)
            kwargs = dict(max_length=int(rng.integers(3, 21)), min_length=int(rng.integers(0, 3)))
            if kind == 1:
                kwargs.update(num_beams=int(rng.integers(2, 5)), length_penalty=float(rng.normal()))
            elif kind == 2:
                kwargs.update(do_sample=True, num_return_sequences=int(rng.integers(1, 4)), prng_key=key(i),
                              temperature=float(rng.uniform(0.5, 1.5)), top_p=float(rng.uniform(0.5, 1.0)))
            ids = rng.integers(3, 101, rng.integers(1, 41)).tolist()
            engine.submit(ids, **kwargs)
            if i % 3 == 0:
                engine.cycle()
        while engine.busy:
            engine.cycle()
    assert compiled.count == 0


def test_cancelled_requests_free_their_slots_and_the_rest_are_unchanged(models):
    _, ours = models
    engine = DecodeEngine(ours, {**CHAT, "min_length": 18}, slots=4, group_width=2, steps=2)
    requests = list(zip(contexts(5, 4), [dict(), dict(num_beams=2), dict(), dict(), dict(num_beams=2)]))
    submitted = [engine.submit(ids, **kwargs) for ids, kwargs in requests]
    engine.cycle()
    assert engine.slots_in_use == 4
    engine.cancel(submitted[1])  # decoding: its lane is freed
    engine.cancel(submitted[4])  # still waiting: never starts
    while engine.busy:
        engine.cycle()
    assert engine.slots_in_use == 0
    assert submitted[1].result is None and submitted[4].result is None and submitted[4].slots == ()
    kept = [0, 2, 3]
    assert_as_alone(ours, {**CHAT, "min_length": 18}, [requests[i] for i in kept], [submitted[i] for i in kept])


def test_requests_the_engine_cannot_decode_are_refused_by_name(models):
    _, ours = models
    engine = DecodeEngine(ours, CHAT, slots=4, group_width=2, steps=2, max_context=16)
    with pytest.raises(ValueError, match="no_repeat_ngram_size: 3 here, 2 asked"):
        engine.submit([5, 6], no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="num_beams=4 is more than this engine's group_width"):
        engine.submit([5, 6], num_beams=4)
    with pytest.raises(ValueError, match="17 tokens, more than this engine's 16"):
        engine.submit(list(range(3, 20)))
    with pytest.raises(ValueError, match="max_length 30 is more than this engine's 24 positions"):
        engine.submit([5, 6], max_length=30)
    with pytest.raises(ValueError, match="beam sampling"):
        engine.submit([5, 6], num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="id 600 .* outside the vocabulary"):
        engine.submit([5, 600])
    assert DecodeEngine(ours, CHAT, slots=5, group_width=2).spec.slots == 6  # whole lanes
    assert not engine.busy


EIGHT_DEVICES = """
import json, numpy as np, jax
from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from bbsmall_jax.generation.engine import DecodeEngine
from bbsmall_jax.testing.shapes import TINY

model = BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**TINY), seed=4)
settings = dict(max_length=14, no_repeat_ngram_size=2)
engine = DecodeEngine(model, settings, slots=8, group_width=3, steps=2)
mix = [dict(), dict(num_beams=3), dict(do_sample=True, prng_key=np.array([0, 3], np.uint32)),
       dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3,
       prng_key=np.array([0, 9], np.uint32))] * 2
rng = np.random.default_rng(0)
contexts = [rng.integers(3, 101, rng.integers(2, 12)).tolist() for _ in mix]
requests = [engine.submit(ids, **kwargs) for ids, kwargs in zip(contexts, mix)]
while engine.busy:
    engine.cycle()
one = [jax.devices()[0]]
alone = [np.asarray(model.generate(np.asarray([ids]), devices=one, **settings, **kwargs)).tolist()
         for ids, kwargs in zip(contexts, mix)]
print(json.dumps({"slots": engine.spec.slots, "devices": len(engine.state.tokens.sharding.device_set),
                  "engine": [r.result for r in requests], "alone": alone}))
"""


def test_slots_split_over_eight_devices_give_the_one_device_tokens():
    """In a subprocess with 8 forced CPU devices: whole lanes per device (8 slots of lanes of 3 become 24)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["slots"] == 24 and out["devices"] == 8
    for engine_rows, alone_rows in zip(out["engine"], out["alone"]):
        assert [trimmed(row) for row in engine_rows] == [trimmed(row) for row in alone_rows]
