"""`bbsmall serve` on a free loopback port with the embedded demo model, driven by the official `openai` client:
completions, personas, streaming, 32 concurrent requests batched and equal to `generate` alone, every bad
request's 4xx, disconnects, a full queue, the SIGTERM drain, and the chat page in headless Chromium."""

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time

import threading
import types

import httpx
import numpy as np
import openai
import pytest

from bbsmall_jax.cli import main as cli
from bbsmall_jax.runtime.responder import Reply, Responder, enable_compilation_cache, load_chat_model
from bbsmall_jax.serve.batcher import RequestBatcher, QueueFull
from bbsmall_jax.serve.metrics import ServerMetrics
from bbsmall_jax.serve.schemas import ApiError, parse_request, turns_of
from bbsmall_jax.serve.settings import Defaults, Settings
from bbsmall_jax.testing.server import ServeProcess, ServerFailed

MODEL = "bbsmall-demo"
# Few shapes to compile: batches padded to 1 or 32, contexts of at most 32 tokens (the demo tokenizer spells
# a turn separator in 6 tokens), replies of at most 15.
FLAGS = ["--scheduler", "engine", "--num-beams", "1", "--max-length", "16", "--batch-buckets", "1,32",
         "--max-context", "32", "--max-body-bytes", "65536"]
GENERATION = dict(num_beams=1, max_length=16)  # the same, as `generate` kwargs
MAX_CONTEXT = 32
TOPICS = ["dogs", "cats", "pizza", "music", "football", "rain", "books", "movies", "school", "work", "coffee",
          "travel", "summer", "games", "cars", "cooking"]
CONVERSATIONS = [[f"hi! do you like {topic}?"] for topic in TOPICS] + [
    [f"what do you think about {topic}?"] for topic in TOPICS]  # 32, in the warm-up's context bucket (16)


class Server(ServeProcess):
    """The server under test, with the official client and parsed metrics."""

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="not-needed", max_retries=0, timeout=300)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)

    def wait_ready(self, timeout: float = 420) -> None:
        try:
            super().wait_ready(timeout)
        except ServerFailed as err:
            pytest.fail(str(err))


def parse_metrics(text: str) -> dict:
    """{(name, ((label, value), ...)): value} from the Prometheus text format."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)', line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or "")))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server every test below shares: greedy, 16 tokens, batches of up to 32 padded to 1 or 32."""
    enable_compilation_cache()  # the server's compilations serve this process's `generate` calls too
    log = str(tmp_path_factory.mktemp("serve") / "server.log")
    process = Server(FLAGS + ["--warmup-lengths", "16"], log)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def responder():
    model, tokenizer = load_chat_model(None)
    return Responder(model, tokenizer, GENERATION, max_context_tokens=MAX_CONTEXT)


@pytest.fixture(scope="module")
def alone(responder):
    """The reply `generate` gives each conversation alone (batch of one), memoised."""
    cache = {}

    def reply(turns, **overrides):
        if "prng_key" in overrides:  # a key is not hashable: sampled replies are not memoised
            return responder.replies([responder.context_ids(turns)], **overrides)[0][0]
        key = (tuple(turns), tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = responder.replies([responder.context_ids(turns)], **overrides)[0][0]
        return cache[key]

    return reply


def messages_of(turns, persona=None):
    roles = ["user", "assistant"] * len(turns)
    start = len(turns) % 2 == 0  # the last turn is the user's
    messages = [{"role": roles[i + start], "content": text} for i, text in enumerate(turns)]
    return ([{"role": "system", "content": persona}] if persona else []) + messages


# ---- without a server: the request mapping and the batcher, on a stub responder


def test_messages_become_persona_lines_and_turns():
    request = parse_request(json.dumps({"model": MODEL, "messages": [
        {"role": "system", "content": "i have two dogs.\n\nyour persona: i love hiking."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hey"}]},
        {"role": "user", "content": "  "}, {"role": "user", "content": "pets?"}]}).encode())
    assert turns_of(request) == ["your persona: i have two dogs.", "your persona: i love hiking.", "hi", "hey",
                                 "pets?"]


def settings_for(defaults, **fields):
    """(Settings, copies) the server gives a request with `fields`."""
    return defaults.for_request(parse_request(json.dumps(good(**fields)).encode()))


def test_request_settings():
    defaults = Defaults(do_sample=False, num_beams=4, temperature=1.0, top_p=1.0, max_length=32, max_positions=128)
    settings = functools.partial(settings_for, defaults)

    assert settings() == (defaults.default_settings(), 1)
    assert settings() == (Settings(False, 4, None, None, 32, 1, None), 1)  # the server's beam search
    assert settings(n=3, max_tokens=9) == (Settings(False, 4, None, None, 10, 3, None), 1)  # the 3 best beams
    assert settings(temperature=0, n=2) == (Settings(False, 1, None, None, 32, 1, None), 2)  # greedy, copied
    assert settings(top_p=0) == (Settings(False, 1, None, None, 32, 1, None), 1)
    assert settings(temperature=0.7, seed=3) == (Settings(True, 1, 0.7, 1.0, 32, 1, 3), 1)
    assert settings(top_p=0.9, n=2) == (Settings(True, 1, 1.0, 0.9, 32, 2, None), 1)
    assert not settings(temperature=0.7, seed=3)[0].batchable and settings(temperature=0.7)[0].batchable
    with pytest.raises(ApiError, match="more than the 4 beams"):
        settings(n=5)
    assert settings(max_tokens=1024) == (Settings(False, 4, None, None, 128, 1, None), 1)  # capped to the limit
    strict = dataclasses.replace(defaults, strict_max_tokens=True)  # --strict-max-tokens
    with pytest.raises(ApiError, match="limit of 127 tokens"):
        settings_for(strict, max_tokens=128)


def test_max_tokens_below_the_models_min_length_lowers_it():
    defaults = Defaults(do_sample=False, num_beams=4, temperature=1.0, top_p=1.0, max_length=32, max_positions=128,
                        min_length=9)

    def settings(**fields):
        return settings_for(defaults, **fields)[0]

    assert settings().min_length is None and "min_length" not in settings().generate_kwargs()  # the model's 9
    assert settings(max_tokens=8).min_length is None  # 9 positions, start token included: min_length fits
    assert settings(max_tokens=3).generate_kwargs()["min_length"] == 4
    assert settings(max_tokens=3, temperature=0.5).min_length == 4 and settings(max_tokens=1, top_p=0).min_length == 2
    assert dataclasses.replace(defaults, max_length=6).default_settings().min_length == 6


class StubResponder:
    """Stands in for the model: records each call's batch; the first call waits until released."""

    def __init__(self):
        self.calls, self.release = [], threading.Event()
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=128))

    def replies(self, contexts, **kwargs):
        if not self.calls:
            self.release.wait(30)
        self.calls.append(([len(c) for c in contexts], kwargs["max_length"]))
        return [[Reply(f"{len(c)} tokens", (9, 2), "stop")] * kwargs["num_return_sequences"] for c in contexts]


def test_batcher_groups_by_settings_and_length_bucket():
    responder = StubResponder()
    batcher = RequestBatcher(responder, ServerMetrics(), max_batch=4, max_wait_ms=50, batch_buckets=(1, 2, 4))
    short, other = Settings(False, 1, None, None, 16, 1, None), Settings(False, 1, None, None, 20, 1, None)

    async def scenario():
        blocker = batcher.submit([1] * 3, short)  # runs first, alone, and holds the worker
        began = time.monotonic()
        await asyncio.sleep(0.2)
        assert time.monotonic() - began < 5  # the event loop runs while the worker is held (for up to 30 s)
        # while the worker is busy: short contexts (bucket 16), long ones (bucket 32), other settings
        jobs = [batcher.submit([1] * n, s) for n, s in ((5, short), (20, short), (6, short), (30, short),
                                                        (7, short), (8, other), (9, short), (10, short))]
        gone = batcher.submit([1] * 11, short)
        batcher.cancel(gone)  # a client that left before its batch: never generated
        responder.release.set()
        results = await asyncio.gather(blocker.future, *(job.future for job in jobs))
        return [replies[0].text for replies in results]

    batcher.start()
    try:
        texts = asyncio.run(scenario())
    finally:
        batcher.stop(10)
    assert texts == [f"{n} tokens" for n in (3, 5, 20, 6, 30, 7, 8, 9, 10)]  # each request gets its own reply
    assert responder.calls == [
        ([3], 16),  # the blocker
        ([5, 6, 7, 9], 16),  # the oldest group, full at max_batch
        ([20, 30], 16),  # the next oldest: same settings, longer bucket
        ([8], 20),  # other settings
        ([10], 16)]  # the rest of the first group
    metrics = parse_metrics(batcher.metrics.render())
    assert metrics[("bbsmall_batch_size_count", ())] == 5 and metrics[("bbsmall_batch_size_sum", ())] == 9
    assert metrics[("bbsmall_queue_depth", ())] == 0


def test_batcher_pads_to_buckets_and_refuses_a_full_queue():
    responder = StubResponder()
    batcher = RequestBatcher(responder, ServerMetrics(), max_batch=8, max_wait_ms=30, max_queue=3, batch_buckets=(1, 8))
    settings = Settings(False, 1, None, None, 16, 1, None)

    async def scenario():
        jobs = [batcher.submit([1] * 4, settings) for _ in range(3)]
        with pytest.raises(QueueFull) as refused:
            batcher.submit([1] * 4, settings)
        responder.release.set()
        await asyncio.gather(*(job.future for job in jobs))
        return refused.value

    batcher.start()
    try:
        refused = asyncio.run(scenario())
    finally:
        batcher.stop(10)
    assert refused.retry_after >= 1 and "full (3 waiting)" in str(refused)
    assert responder.calls == [([4] * 8, 16)]  # 3 conversations padded to the batch bucket of 8
    assert parse_metrics(batcher.metrics.render())[("bbsmall_queue_rejections_total", ())] == 1


# ---- the real server


def test_completion_with_the_openai_client(server, alone, responder):
    turns = ["hello, how are you?"]
    completion = server.client().chat.completions.create(model=MODEL, messages=messages_of(turns))
    expected = alone(turns)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.id.startswith("chatcmpl-") and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text != ""
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage.prompt_tokens == len(responder.context_ids(turns))
    assert completion.usage.completion_tokens == len(expected.token_ids)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_what_real_clients_send(server, alone):
    """Values people configure and fields agent frameworks always attach."""
    client = server.client()
    messages = [{"role": "user", "content": "hi! do you like dogs?"}]
    capped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1024,
                                            extra_body={"top_k": 5, "service_tier": "auto"}, temperature=0)
    assert capped.choices[0].message.content == alone(["hi! do you like dogs?"]).text
    with_tools = client.chat.completions.create(
        model=MODEL, temperature=0, tools=[TOOL], tool_choice="none",
        messages=[*messages, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "it is sunny."}])
    assert with_tools.choices[0].message.content == alone(["hi! do you like dogs?", "it is sunny."]).text
    assert "ignored request fields this server does not use: 'service_tier', 'top_k'" in server.log()


def test_multi_turn_with_a_system_persona(server, alone, responder):
    turns = ["hi", "hello", "any pets?"]
    completion = server.client().chat.completions.create(model=MODEL, messages=messages_of(turns, "i love dogs."))
    context = ["your persona: i love dogs.", *turns]
    assert completion.choices[0].message.content == alone(context).text
    assert completion.usage.prompt_tokens == len(responder.context_ids(context)) == 31  # nothing dropped
    long = ["tell me everything about your favourite places to travel and why you like them so much"] * 3
    truncated = server.client().chat.completions.create(model=MODEL, messages=messages_of(long, "i love dogs."))
    assert truncated.usage.prompt_tokens <= MAX_CONTEXT  # the oldest turns, persona first, were dropped
    assert truncated.choices[0].message.content == alone(["your persona: i love dogs.", *long]).text


def test_stream_in_openai_chunks(server, alone):
    turns = ["what do you like to do for fun?"]
    stream = server.client().chat.completions.create(model=MODEL, messages=messages_of(turns), stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone(turns).text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [alone(turns).finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone(turns).token_ids)
    raw = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                     json={"model": MODEL, "messages": messages_of(turns), "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


@pytest.fixture(scope="module")
def demo_reference():
    """transformers' PyTorch class on the demo weights in float32, its decoder embeddings scaled as ours."""
    import torch
    import transformers

    from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
    from bbsmall_jax.testing.reference_models import scale_reference_decoder_embeddings

    model = transformers.BlenderbotSmallForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    scale_reference_decoder_embeddings(model.eval())
    return model


def reference_log_probs(reference, context: list[int], reply: list[int]):
    """[len(reply), V] log_softmax of the reference's logits, teacher-forced on the reply."""
    import torch

    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([context]), decoder_input_ids=torch.tensor([[1, *reply[:-1]]])).logits
    return torch.log_softmax(logits[0].double(), -1).numpy()


def token_ids_of(entries, tokenizer) -> list[int]:
    """The token ids a `logprobs.content` spells: a piece followed by one without a leading space goes on
    (its `@@` mark), as the server writes them."""
    vocab = tokenizer.get_vocab()
    return [vocab[entry.token.strip() + ("@@" if n + 1 < len(entries) and not entries[n + 1].token.startswith(" ")
                                         else "")] for n, entry in enumerate(entries)]


def assert_model_log_probs(entries, context, reference, tokenizer, top: int):
    """Each logprob is the reference's log-softmax at its token, each alternative list its `top` best."""
    ids = token_ids_of(entries, tokenizer)
    expected = reference_log_probs(reference, context, ids + [2])
    for n, (entry, token) in enumerate(zip(entries, ids)):
        assert abs(entry.logprob - expected[n, token]) <= 1e-4, (n, entry.token)
        assert entry.bytes == list(entry.token.encode())
        best = np.sort(expected[n])[::-1][:top]
        assert len(entry.top_logprobs) == top
        assert np.abs(np.array([alt.logprob for alt in entry.top_logprobs]) - best).max() <= 1e-4


def test_logprobs_are_the_models_log_softmax(server, alone, responder, demo_reference):
    """Greedy, seeded sampling and a stream: every token's logprob and top alternatives, against transformers."""
    turns = ["hi! do you like dogs?"]
    context, client = responder.context_ids(turns), server.client()
    greedy = client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0, logprobs=True,
                                            top_logprobs=3)
    entries = greedy.choices[0].logprobs.content
    assert token_ids_of(entries, responder.tokenizer) == [t for t in alone(turns).token_ids if t != 2]
    assert "".join(e.token for e in entries).replace(" .", ".").replace(" !", "!") == greedy.choices[0].message.content
    assert_model_log_probs(entries, context, demo_reference, responder.tokenizer, 3)
    sampled = client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0.9, seed=5,
                                             logprobs=True, top_logprobs=2)
    assert_model_log_probs(sampled.choices[0].logprobs.content, context, demo_reference, responder.tokenizer, 2)
    plain = client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0)
    assert plain.choices[0].logprobs is None
    stream = client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0, logprobs=True,
                                            stream=True, stop=["smell"])
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries][:len(streamed)]
    assert streamed and streamed[-1].token == " the" and all(e.top_logprobs == [] for e in streamed)
    for body in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        answer = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                            json={"model": MODEL, "messages": messages_of(turns), **body})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "top_logprobs"


def test_responses_api(server, alone, responder):
    """`responses.create` plain, streamed and cut by max_output_tokens; bad inputs name their field."""
    client, turns = server.client(), ["hi! do you like dogs?"]
    response = client.responses.create(model=MODEL, input=turns[0], instructions="i love cats.")
    context = ["your persona: i love cats.", *turns]
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text == alone(context).text
    assert response.usage.input_tokens == len(responder.context_ids(context))
    assert response.usage.output_tokens == len(alone(context).token_ids)
    history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": [
        {"type": "output_text", "text": "yes"}]}, {"role": "user", "content": [{"type": "input_text", "text": "why?"}]}]
    short = client.responses.create(model=MODEL, input=history, max_output_tokens=4)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.output_text == alone([turns[0], "yes", "why?"], max_length=5, min_length=5).text
    with client.responses.stream(model=MODEL, input=turns[0]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_text == alone(turns).text
    for body, param in [({"input": []}, "input"), ({"input": [{"role": "robot", "content": "a"}]}, "input[0]"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
                        ({"input": " "}, "input"),
                        ({"input": "hi", "previous_response_id": "r"}, "previous_response_id"),
                        ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "text.format")]:
        answer = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, body


def test_langchain_and_litellm(server, alone, monkeypatch):
    """LangChain's ChatOpenAI (chat completions and the Responses API) and LiteLLM, plain and streamed."""
    langchain_openai = pytest.importorskip("langchain_openai")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of prices at import
    litellm = pytest.importorskip("litellm")
    text = alone(["hi! do you like dogs?"]).text
    for responses in (False, True):
        chat = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", temperature=0,
                                           max_retries=0, use_responses_api=responses)
        assert chat.invoke("hi! do you like dogs?").text == text
        assert "".join(chunk.text for chunk in chat.stream("hi! do you like dogs?")) == text
    options = dict(model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="none", temperature=0,
                   messages=[{"role": "user", "content": "hi! do you like dogs?"}])
    assert litellm.completion(**options).choices[0].message.content == text
    assert "".join(c.choices[0].delta.content or "" for c in litellm.completion(**options, stream=True)) == text


def test_n_stop_and_max_tokens(server, alone):
    client, turns = server.client(), ["do you like music?"]
    expected = alone(turns)
    two = client.chat.completions.create(model=MODEL, messages=messages_of(turns), n=2, temperature=0)
    assert [c.message.content for c in two.choices] == [expected.text] * 2 and [c.index for c in two.choices] == [0, 1]
    word = expected.text.split()[1]
    stopped = client.chat.completions.create(model=MODEL, messages=messages_of(turns), stop=[word, "zzz"])
    assert stopped.choices[0].message.content == expected.text[:expected.text.find(word)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=messages_of(turns), max_tokens=4)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    assert short.choices[0].message.content == alone(turns, max_length=5, min_length=5).text
    # Shorter than the demo model's min_length of 8 (start token included): max_tokens wins.
    shorter = client.chat.completions.create(model=MODEL, messages=messages_of(turns), max_tokens=2)
    assert shorter.choices[0].finish_reason == "length" and shorter.usage.completion_tokens == 2
    assert shorter.choices[0].message.content == alone(turns, max_length=3, min_length=3).text


def test_seeded_sampling_is_reproducible(server, alone):
    client, turns = server.client(), ["tell me about your family"]
    replies = [client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0.9,
                                              seed=11).choices[0].message.content for _ in range(2)]
    import jax

    expected = alone(turns, do_sample=True, temperature=0.9, top_p=1.0, num_return_sequences=1,
                     prng_key=jax.random.PRNGKey(11))
    assert replies == [expected.text] * 2


def test_32_concurrent_requests_share_the_slots_and_equal_generate_alone(server, alone):
    """Greedy, sampled and default requests at once, after warm-up: each reply is the one `generate` gives it
    alone, nothing compiles, and every slot is free again."""
    before = server.metrics()
    client = server.client()

    def ask(i):
        settings = dict(temperature=0) if i % 3 == 1 else dict(temperature=0.8, seed=i) if i % 3 == 2 else {}
        reply = client.chat.completions.create(model=MODEL, messages=messages_of(CONVERSATIONS[i]), **settings)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
        replies = list(pool.map(ask, range(len(CONVERSATIONS))))
    import jax

    expected = [alone(turns, do_sample=True, temperature=0.8, top_p=1.0, num_return_sequences=1,
                      prng_key=jax.random.PRNGKey(i)).text if i % 3 == 2 else alone(turns).text
                for i, turns in enumerate(CONVERSATIONS)]
    assert replies == expected
    after = server.metrics()
    answered = ("bbsmall_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))
    assert after[answered] - before[answered] == len(CONVERSATIONS)
    first_tokens = ("bbsmall_time_to_first_token_seconds_count", ())
    assert after[first_tokens] - before[first_tokens] == len(CONVERSATIONS)
    between_tokens = ("bbsmall_inter_token_latency_seconds_count", ())
    assert after[between_tokens] > before[between_tokens]
    compiled = ("bbsmall_xla_compilations_since_ready_total", ())
    assert after[compiled] == before[compiled]  # (earlier tests' log-probabilities compile a scoring program)
    assert after[("bbsmall_slots_in_use", ())] == 0 and after[("bbsmall_requests_in_flight", ())] == 0
    assert after[("bbsmall_ready", ())] == 1
    assert after[("bbsmall_generated_tokens_total", ())] > before[("bbsmall_generated_tokens_total", ())]


def test_greedy_stream_arrives_in_several_chunks_that_join_to_the_reply(server, alone):
    client = server.client()
    for turns in CONVERSATIONS[:6]:
        stream = client.chat.completions.create(model=MODEL, messages=messages_of(turns), stream=True, temperature=0)
        chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        whole = client.chat.completions.create(model=MODEL, messages=messages_of(turns), temperature=0)
        assert "".join(chunks) == whole.choices[0].message.content == alone(turns).text
        assert len(chunks) >= 2, chunks


def test_64_streaming_clients_with_disconnects_leave_no_slot_taken(server, alone):
    """64 concurrent streams; every fourth client hangs up after its first chunk. The others get their whole
    replies, the server stays healthy, and the slots and requests in flight return to 0."""
    def stream(i):
        turns = [f"tell me more about {TOPICS[i % len(TOPICS)]}, please"]
        body = good(messages=messages_of(turns), stream=True, temperature=0)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as response:
            if i % 4 == 3:
                next(response.iter_lines())
                return None  # closes the connection mid-stream
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        return turns, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))
    for result in results:
        if result is not None:
            assert result[1] == alone(result[0]).text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics[("bbsmall_slots_in_use", ())] == 0 and metrics[("bbsmall_requests_in_flight", ())] == 0:
            break
        time.sleep(0.2)
    assert metrics[("bbsmall_slots_in_use", ())] == 0 and metrics[("bbsmall_requests_in_flight", ())] == 0
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


def test_unknown_fields_are_ignored_unless_strict():
    body = json.dumps(good(colour="blue", service_tier="auto", top_k=5)).encode()
    ignored = []
    assert parse_request(body, strict_fields=False, ignored=ignored).model == MODEL
    assert ignored == ["colour", "service_tier", "top_k"]
    with pytest.raises(ApiError, match="Unrecognized request argument supplied: colour") as err:
        parse_request(body)  # --strict-fields
    assert (err.value.param, err.value.code) == ("colour", "unknown_parameter")


def good(**changes):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **changes}


BAD_REQUESTS = [
    ("not json", b"{this is not json", 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_json"),
    ("lone surrogate in the model", good(model="\udfff"), 400, "model", "invalid_value"),
    ("lone surrogate as a field name", good(**{"\udfff": 1}), 400, "\\udfff", "invalid_value"),
    ("lone surrogate in a message", good(messages=[{"role": "user", "content": "hi \ud800"}]), 400,
     "messages.0.content", "invalid_value"),
    ("NUL in a message", good(messages=[{"role": "user", "content": "hi \x00 there"}]), 400,
     "messages.0.content", "invalid_value"),
    ("NaN is not JSON", b'{"model": "bbsmall-demo", "messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    ("nested too deeply", b"[" * 30000 + b"]" * 30000, 400, None, "invalid_json"),
    ("messages not a list", good(messages="hi"), 400, "messages", "invalid_value"),
    ("temperature a string", good(temperature="hot"), 400, "temperature", "invalid_value"),
    ("max_tokens a float", good(max_tokens=1.5), 400, "max_tokens", "invalid_value"),
    ("n a boolean", good(n=True), 400, "n", "invalid_value"),
    ("stream a string", good(stream="yes"), 400, "stream", "invalid_value"),
    ("content a number", good(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "invalid_value"),
    ("image content", good(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content[0]", "invalid_value"),
    ("role missing", good(messages=[{"content": "hi"}]), 400, "messages[0].role", "missing_required_parameter"),
    ("empty messages", good(messages=[]), 400, "messages", "invalid_value"),
    ("unknown role", good(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "invalid_value"),
    ("only a system message", good(messages=[{"role": "system", "content": "i like tea"}]), 400, "messages",
     "invalid_value"),
    ("only blank turns", good(messages=[{"role": "user", "content": "   "}]), 400, "messages", "invalid_value"),
    ("model missing", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing_required_parameter"),
    ("unknown model", good(model="gpt-4o"), 404, "model", "model_not_found"),
    ("max_tokens 0", good(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("temperature too high", good(temperature=2.5), 400, "temperature", "invalid_value"),
    ("temperature negative", good(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("top_p above 1", good(top_p=1.5), 400, "top_p", "invalid_value"),
    ("n 0", good(n=0), 400, "n", "invalid_value"),
    ("n too large", good(n=1000), 400, "n", "invalid_value"),
    ("seed beyond 64 bits", good(seed=2 ** 64), 400, "seed", "invalid_value"),
    ("too many stop strings", good(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("tools for the model to call", good(tools=[TOOL]), 400, "tool_choice", "unsupported_parameter"),
    ("a forced tool call", good(tool_choice="required"), 400, "tool_choice", "unsupported_parameter"),
    ("unsupported penalty", good(presence_penalty=1.0), 400, "presence_penalty", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(server, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:  # one kept-alive connection for both requests
        response = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code)
        assert client.get("/health").status_code == 200


def test_body_over_the_limit_is_413_and_unknown_urls_are_openai_errors(server):
    big = good(messages=[{"role": "user", "content": "hello " * 20000}])
    response = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert "65536" in response.json()["error"]["message"]
    missing = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    wrong_method = httpx.get(server.url + "/v1/chat/completions", timeout=30)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"


def test_models_health_metrics_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/v1/models/other", timeout=30).status_code == 404
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["ready"] is True
    assert httpx.get(server.url + "/health/live", timeout=30).json() == {"status": "alive"}
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.headers["content-type"].startswith("text/plain")
    for name in ("bbsmall_requests_total", "bbsmall_request_duration_seconds", "bbsmall_batch_size",
                 "bbsmall_queue_depth", "bbsmall_generated_tokens_total"):
        assert f"# TYPE {name} " in response.text
    page = httpx.get(server.url + "/", timeout=30)
    assert page.headers["content-type"].startswith("text/html") and 'id="reset"' in page.text


def test_disconnected_clients_do_not_disturb_the_batch(server, alone):
    before = server.metrics()
    request = json.dumps(good(messages=[{"role": "user", "content": "are you still there?"}])).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(request)}\r\n\r\n").encode()
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(lambda t=turns: client.chat.completions.create(
            model=MODEL, messages=messages_of(t)).choices[0].message.content) for turns in CONVERSATIONS[:8]]
        for _ in range(4):  # clients that send a request and hang up at once
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head + request)
        replies = [answer.result() for answer in answers]
    assert replies == [alone(turns).text for turns in CONVERSATIONS[:8]]
    closed = ("bbsmall_requests_total", (("path", "/v1/chat/completions"), ("status", "499")))
    deadline = time.monotonic() + 30
    while server.metrics().get(closed, 0) - before.get(closed, 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.metrics()
    assert after.get(closed, 0) - before.get(closed, 0) == 4
    assert after[("bbsmall_requests_in_flight", ())] == 0 and after[("bbsmall_queue_depth", ())] == 0
    assert client.chat.completions.create(model=MODEL, messages=messages_of(["hi"])).choices[0].message.content


def test_full_queue_503_then_sigterm_drains(server, tmp_path):
    """A second server, on static batches: one conversation per call, two may wait; a full queue answers 503,
    SIGTERM drains."""
    small = Server(FLAGS + ["--scheduler", "batch", "--max-batch", "2", "--max-queue", "2", "--max-wait-ms", "1000",
                            "--warmup-lengths", "16"], str(tmp_path / "small.log"))
    try:
        small.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: httpx.post(small.url + "/v1/chat/completions", timeout=300,
                                                           json=good()), range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "queue_full" and busy.json()["error"]["type"] == "server_error"
        assert httpx.get(small.url + "/health", timeout=30).status_code == 200

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, small.url + "/v1/chat/completions", json=good(), timeout=300)
            in_flight = ("bbsmall_requests_in_flight", ())
            deadline = time.monotonic() + 30
            while small.metrics()[in_flight] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            small.process.send_signal(signal.SIGTERM)  # the request waits for a partner up to 1 s: in flight
            drained = pending.result()
        assert drained.status_code == 200 and drained.json()["choices"][0]["message"]["content"]
        assert small.process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(small.url + "/health", timeout=5)
        assert "draining" in small.log()
    finally:
        small.stop()


def _outcome(url: str, index: int) -> str:
    """One request during a shutdown: '200', '503' (JSON, Retry-After), 'stream' (complete) or 'stream cut'
    (an error event, then [DONE]; for the Responses API, every fifth request, an `error` event ending it);
    anything else fails the test."""
    text, stream = f"tell me about {TOPICS[index % len(TOPICS)]}", index % 3 == 0
    responses = index % 5 == 4
    body = (dict(model=MODEL, input=text, stream=stream) if responses else
            good(messages=[{"role": "user", "content": text}], stream=stream))
    path = "/v1/responses" if responses else "/v1/chat/completions"
    with httpx.stream("POST", url + path, json=body, timeout=300) as response:
        text = response.read().decode()
    if not stream:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "shutting_down" and response.headers["Retry-After"]
        assert response.status_code in (200, 503), text
        return str(response.status_code)
    events = [json.loads(line[len("data: "):]) if line != "data: [DONE]" else "[DONE]"
              for line in text.split("\n") if line.startswith("data: ")]
    assert response.status_code == 200, text
    if responses:
        assert events[-1]["type"] in ("response.completed", "error"), text
        cut = events[-1]["type"] == "error"
        assert not cut or events[-1]["code"] == "shutting_down", text
        return "stream cut" if cut else "stream"
    assert events[-1] == "[DONE]", text
    errors = [e for e in events[:-1] if "error" in e]
    assert not errors or errors[0]["error"]["code"] == "shutting_down", text
    return "stream cut" if errors else "stream"


def _arrived(metrics: dict) -> float:
    """Chat completion and Responses requests the server has taken: those in flight and those answered."""
    answered = sum(value for (name, labels), value in metrics.items() if name == "bbsmall_requests_total" and (
        ("path", "/v1/chat/completions") in labels or ("path", "/v1/responses") in labels))
    return metrics[("bbsmall_requests_in_flight", ())] + answered


def test_past_the_drain_timeout_every_request_gets_an_answer(tmp_path):
    """SIGTERM under 100 concurrent requests (chat completions and responses) with a drain timeout too short for
    them: each is answered (200, a JSON 503, or a stream ended by an error event), and the log has one line, no
    traceback."""
    slow = Server(FLAGS[:-2] + ["--slots", "1", "--max-length", "40", "--min-length", "40", "--drain-timeout", "2"],
                  str(tmp_path / "slow.log"))
    try:
        slow.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            outcomes = [pool.submit(_outcome, slow.url, i) for i in range(100)]
            deadline = time.monotonic() + 120
            while _arrived(slow.metrics()) < 100 and time.monotonic() < deadline:  # SIGTERM stops listening:
                time.sleep(0.05)  # a request not yet connected then would be refused, not answered
            slow.process.send_signal(signal.SIGTERM)  # one slot, 31-token replies: most still wait
            outcomes = [future.result() for future in outcomes]
        assert slow.process.wait(60) == 0
        counts = {kind: outcomes.count(kind) for kind in sorted(set(outcomes))}
        print(counts)
        assert counts.get("503", 0) + counts.get("stream cut", 0) > 0, counts  # the timeout did cut some
        with open(slow.log_path) as f:
            log = f.read()
        assert "Traceback" not in log and "CancelledError" not in log
        assert re.search(r"the drain timeout passed; answered \d+ waiting request\(s\) with 503", log)
    finally:
        slow.stop()


def test_serve_flag_errors(capsys):
    assert cli.main(["serve", "--batch-buckets", "1,3"]) == 2
    assert "--batch-buckets: 3 is not a power of two" in capsys.readouterr().err
    assert cli.main(["serve", "--max-batch", "64", "--batch-buckets", "1,32"]) == 2
    assert "below --max-batch 64" in capsys.readouterr().err
    assert cli.main(["serve", "--warmup-lengths", "a,b"]) == 2
    assert "--warmup-lengths 'a,b'" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert cli.main(["serve", "--temperature", "0.5"]) == 2
    assert "only apply with --sample" in capsys.readouterr().err


def browser_missing() -> str:
    """Why the browser test cannot run here ('' when it can)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian's chromium and chromium-driver; .ci/run installs "
                "them with apt-get when it can)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    return ""


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_chat_page_in_headless_chromium(server, alone, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=760,560", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "status").text == f"model: {MODEL}")
        first, second = "hi! do you like dogs?", "what is your favourite food?"
        history = []
        for number, message in enumerate((first, second), start=1):
            box = driver.find_element(By.ID, "input")
            box.send_keys(message, Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot:not(.pending)")) == number)
            history.append(message)
            reply = driver.find_elements(By.CSS_SELECTOR, ".msg.bot")[-1].text
            assert reply == alone(history).text  # the page keeps the conversation and sends all of it
            history.append(reply)
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == [first, second]
        sent = driver.execute_script("return state.history")
        assert sent == [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, history)]
        driver.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("BBSMALL_SCREENSHOT"):  # how the README's picture was taken
            driver.save_screenshot(os.environ["BBSMALL_SCREENSHOT"])
        assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert driver.execute_script("return state.history") == []
        driver.find_element(By.ID, "input").send_keys(second, Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot:not(.pending)")) == 1)
        assert driver.find_element(By.CSS_SELECTOR, ".msg.bot").text == alone([second]).text  # a new conversation
    finally:
        driver.quit()


def test_listen_address_errors_come_before_the_model_loads():
    from bbsmall_jax.serve.flags import check_address

    with pytest.raises(ValueError, match=r"--host '.*' does not resolve to an address"):
        check_address("a" * 64 + ".example", 8000)  # a label over 63 characters: refused without a DNS query
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on --host 127.0.0.1 --port {port}: "):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", 0)


def test_health_polls_stay_out_of_the_access_log():
    import logging

    from bbsmall_jax.serve.server import QuietHealthChecks

    def access(path):  # a record as uvicorn's access logger makes it
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5000", "GET", path, "1.1", 200), None)

    quiet = QuietHealthChecks()
    assert not quiet.filter(access("/health")) and not quiet.filter(access("/health/live?x=1"))
    assert quiet.filter(access("/v1/models")) and quiet.filter(access("/healthz"))


def _guarded(policy):
    """An app that answers 200 'ok' to everything, behind `policy`, and a way to call it."""
    from bbsmall_jax.serve.access import AccessControl

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(method, path, headers=(), host="127.0.0.1:8000", content=b"{}"):
        async def go():
            transport = httpx.ASGITransport(app=AccessControl(app, policy))
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
                return await client.request(method, path, headers=dict(headers), content=content)
        return asyncio.run(go())
    return call


def test_access_policy_origins_hosts_content_types_and_keys():
    from bbsmall_jax.serve.access import AccessPolicy, parse_origins

    json_type = {"content-type": "application/json"}
    call = _guarded(AccessPolicy())
    assert call("GET", "/v1/models").status_code == 200
    assert call("POST", "/v1/chat/completions", json_type).status_code == 200
    plain = call("POST", "/v1/chat/completions", {"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    foreign = call("POST", "/v1/chat/completions", {"origin": "https://evil.example", **json_type})
    assert foreign.status_code == 403 and "https://evil.example" in foreign.json()["error"]["message"]
    own = call("POST", "/v1/chat/completions", {"origin": "http://127.0.0.1:8000", **json_type})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    rebound = call("GET", "/v1/models", host="attacker.example:8000")
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert call("GET", "/v1/models", host="localhost:8000").status_code == 200
    assert call("GET", "/", [(f"x-{i}", "1") for i in range(120)]).status_code == 431
    assert _guarded(AccessPolicy(bound_host="0.0.0.0"))("GET", "/", host="any.example").status_code == 200

    allowed = _guarded(AccessPolicy(allowed_origins=parse_origins("https://app.example")))
    preflight = allowed("OPTIONS", "/v1/chat/completions", {"origin": "https://app.example"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    cross = allowed("POST", "/v1/chat/completions", {"origin": "https://app.example", **json_type})
    assert cross.status_code == 200 and cross.headers["access-control-allow-origin"] == "https://app.example"
    with pytest.raises(ValueError, match="'app.example' is not an origin"):
        parse_origins("app.example")

    keyed = _guarded(AccessPolicy(api_key="s3cret"))
    for headers, status in [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": "s3cret"}, 401),
                            ({"authorization": "Bearer s3cret"}, 200), ({"authorization": "bearer s3cret"}, 200)]:
        response = keyed("GET", "/v1/models", headers)
        assert response.status_code == status, headers
        if status == 401:
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert keyed("GET", "/").status_code == 200 and keyed("GET", "/health").status_code == 200  # the page asks


def test_server_refuses_foreign_pages_and_hosts_and_sends_a_strict_page(server):
    chat = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    url = server.url + "/v1/chat/completions"
    csrf = httpx.post(url, content=chat, headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
                      timeout=60)
    assert csrf.status_code == 403 and csrf.json()["error"]["code"] == "origin_not_allowed"
    assert httpx.post(url, content=chat, headers={"Content-Type": "text/plain"}, timeout=60).status_code == 415
    rebinding = httpx.get(server.url + "/v1/models", headers={"Host": f"evil.example:{server.port}"}, timeout=30)
    assert rebinding.status_code == 403
    page = httpx.get(server.url + "/", timeout=30)
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy


def test_api_key_with_the_openai_client(tmp_path):
    keyed = Server(FLAGS + ["--warmup-lengths", "none", "--api-key", "s3cret-key"], str(tmp_path / "server.log"))
    try:
        keyed.wait_ready()
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret-key", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        for key in ("wrong", "not-needed"):
            other = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
                other.models.list()
        response = httpx.get(keyed.url + "/v1/models", timeout=30)
        assert response.status_code == 401 and "No API key given" in response.json()["error"]["message"]
    finally:
        keyed.stop()
