"""The FastAPI application: OpenAI's chat completions and responses (plain and streamed), models, health,
metrics, the chat page."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bbsmall_jax.runtime.responder import Reply, Responder
from bbsmall_jax.serve import batcher, engine_worker
from bbsmall_jax.serve.access import AccessControl, AccessPolicy
from bbsmall_jax.serve.batcher import QueueFull, RequestBatcher
from bbsmall_jax.serve.engine_worker import EngineWorker
from bbsmall_jax.serve.metrics import ServerMetrics
from bbsmall_jax.serve.schemas import (ApiError, ChatCompletionRequest, chunk_body, completion_body, error_body,
                                       logprobs_body, parse_request, stop_strings, token_log_prob, turns_of, usage)
from bbsmall_jax.serve.responses import ResponseEvents, ResponsesRequest, parse_responses_request
from bbsmall_jax.serve.settings import Defaults
from bbsmall_jax.serve.text_stream import TextStream

log = logging.getLogger("uvicorn.error")
Job = Union[engine_worker.Job, batcher.Job]
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the reply
PATHS = ("/", "/health", "/health/live", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/responses")


@dataclass
class Service:
    """What the endpoints share: the model's responder and scheduler (the decode engine's worker, or the static
    batcher), defaults, limits, metrics and state."""

    responder: Responder
    scheduler: Union[EngineWorker, RequestBatcher]
    metrics: ServerMetrics
    defaults: Defaults
    model_id: str
    max_body_bytes: int = 1 << 20
    access: AccessPolicy = field(default_factory=AccessPolicy)
    body_timeout: float = 30.0  # seconds a request body may take to arrive
    strict_fields: bool = False  # unknown request fields are a 400 rather than ignored (and logged)
    drain_timeout: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    stopped: bool = False
    loop: Optional[asyncio.AbstractEventLoop] = None
    # one thread tokenizes, off the event loop (the tokenizer's caches are not for concurrent writers)
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="bbsmall-tokenize"))
    replies: set = field(default_factory=set)  # the `_Reply`s not yet finished

    def begin_drain(self) -> None:
        """SIGTERM: report not ready and stop holding batches open; in-flight requests are still answered
        until shortly before the drain timeout, when those still waiting are answered 503 (`cut_off`)."""
        self.draining = True
        self.metrics.ready.set(0)
        self.scheduler.flush()
        if self.loop is not None:  # before uvicorn cancels what is left, which would end it without an answer
            self.loop.call_later(max(self.drain_timeout - 1.0, 0.8 * self.drain_timeout), self.cut_off)

    def cut_off(self) -> None:
        """Answer every request still waiting with a 503 (a stream: an error event and [DONE]), one log line."""
        waiting = [reply for reply in self.replies if not reply.job.future.done()]
        for reply in waiting:
            reply.job.future.set_exception(ApiError(
                503, f"The server is shutting down; its {self.drain_timeout:g} s drain timeout passed before this "
                "request was answered. Retry it (on another replica).", code="shutting_down", kind="server_error",
                headers={"Retry-After": "5"}))
            if reply.job.tokens is not None:  # a stream waiting for its next token reads the error now
                reply.job.tokens.put_nowait(None)
            reply.abandon()
        if waiting:
            log.warning("bbsmall serve: the drain timeout passed; answered %d waiting request(s) with 503",
                        len(waiting))

    def state(self) -> str:
        """The health status: warming_up, ok or draining."""
        if self.draining:
            return "draining"
        return "ok" if self.scheduler.ready.is_set() else "warming_up"


class MetricsMiddleware:
    """Counts every HTTP response by path and status (pure ASGI, so streaming and disconnects pass through)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in PATHS else (
                "/v1/models/{model}" if scope["path"].startswith("/v1/models/") else "other")
            self.metrics.requests.inc(path=path, status=status["code"])


def _error_response(err: ApiError) -> JSONResponse:
    """The JSON response of an ApiError, with its headers."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def page_security_headers(page: str) -> dict:
    """The chat page's headers: a CSP allowing only its own inline script and style (by hash) and same-origin
    requests, no framing, no MIME sniffing, no referrer."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


async def read_body(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The request body, or ApiError(413) as soon as it is known to exceed `limit` bytes, or ApiError(408) when
    a part of it takes longer than `timeout` seconds to arrive."""
    declared = request.headers.get("content-length")
    too_large = f"The request body is larger than this server's limit of {limit} bytes"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{too_large} (Content-Length: {declared})", code="request_too_large")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {timeout:g} s",
                           code="request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large, code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class _Choice:
    """One choice of a completion: its text, finish reason, token count and `logprobs.content` entries."""

    text: str
    finish_reason: str
    tokens: int
    log_probs: Optional[list[dict]] = None  # None unless the request asked for logprobs


def _choices(replies: list[Reply], copies: int, chat: ChatCompletionRequest, responder: Responder) -> list[_Choice]:
    """Each reply `copies` times, cut at the first stop string, with its tokens' log-probabilities when asked."""
    stops, out = stop_strings(chat), []
    for reply in replies:
        text, reason = reply.text, reply.finish_reason
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        entries = _log_prob_entries(reply, text, chat.top_logprobs or 0, responder) if chat.logprobs else None
        out += [_Choice(text, reason, len(reply.token_ids), entries)] * copies
    return out


def _log_prob_entries(reply: Reply, text: str, top: int, responder: Responder) -> list[dict]:
    """OpenAI's `logprobs.content` of a reply whose text (maybe cut at a stop string) is `text`: one entry per
    token that spells it (special tokens left out), with its `top` most likely alternatives.

    The tokens are the model's, `@@` (a word goes on) dropped and a space before each word after the first:
    joined, they spell the reply before the tokenizer's clean-up of spaces ("yes ! i don ' t" for "yes! i don't")."""
    tokenizer, log_probs = responder.tokenizer, reply.log_probs
    special = set(tokenizer.all_special_ids)
    positions = [i for i, token in enumerate(reply.token_ids) if token not in special]
    if len(text) < len(reply.text):  # cut at a stop string: the tokens that spell what is kept
        ids = [reply.token_ids[i] for i in positions]
        kept = next(m for m in range(len(ids) + 1) if len(responder.decode(ids[:m])) >= len(text.rstrip()))
        positions = positions[:kept]
    tokens = tokenizer.convert_ids_to_tokens([reply.token_ids[i] for i in positions])
    entries = []
    for n, (i, token) in enumerate(zip(positions, tokens)):
        space = " " if n and not tokens[n - 1].endswith("@@") else ""
        alternatives = tokenizer.convert_ids_to_tokens(log_probs.top_ids[i, :top].tolist())
        entries.append(token_log_prob(space + _without_mark(token), float(log_probs.chosen[i]), [
            token_log_prob(space + _without_mark(other), float(value))
            for other, value in zip(alternatives, log_probs.top[i, :top])]))
    return entries


def _without_mark(token: str) -> str:
    """A BPE token without its `@@` mark (the word goes on)."""
    return token[:-2] if token.endswith("@@") else token


def create_app(service: Service) -> FastAPI:
    """The application for one loaded model."""

    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop, service.drain_timeout)
        service.tokenizing.shutdown(wait=False)
        service.stopped = True

    app = FastAPI(title="bbsmall serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessControl, policy=service.access)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: refusals are counted too
    _add_error_handlers(app)
    _add_info_routes(app, service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(service, request, _parse_chat)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await _answer(service, request, _parse_response)

    return app


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """The chat page, health, metrics and models."""
    page = resources.files("bbsmall_jax.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")
    metrics = service.metrics

    page_headers = page_security_headers(page)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health():
        state = service.state()
        body = {"status": state, "ready": state == "ok", "model": service.model_id,
                "queue_depth": int(metrics.queue_depth.value)}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "bbsmall_jax"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def one_model(model: str):
        if model != service.model_id:
            raise _unknown_model(model, service.model_id)
        return model_card()


async def _answer(service: Service, request: Request, parse) -> Response:
    """A POST of a chat completion or a response: check it (`parse(body, strict, ignored)` gives the chat request
    and the reply's shape), tokenize (off the event loop), queue, then answer or stream."""
    arrived = time.perf_counter()
    try:
        body = await read_body(request, service.max_body_bytes, service.body_timeout)
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)
    ignored: list[str] = []
    chat, shape = parse(body, service.strict_fields, ignored)
    if ignored:
        log.info("ignored request fields this server does not use: %s", ", ".join(map(repr, ignored)))
    if chat.model != service.model_id:
        raise _unknown_model(chat.model, service.model_id)
    settings, copies = service.defaults.for_request(chat)
    ids = await asyncio.get_running_loop().run_in_executor(service.tokenizing, service.responder.context_ids,
                                                           turns_of(chat))
    try:
        # streamed token by token unless the choices need the whole reply first (log-probabilities)
        job = service.scheduler.submit(ids, settings, log_probs=bool(chat.logprobs),
                                     stream=bool(chat.stream) and not chat.logprobs)
    except QueueFull as err:
        raise ApiError(503, f"The server is busy: {err}", code="queue_full", kind="server_error",
                       headers={"Retry-After": str(err.retry_after)}) from None
    service.metrics.in_flight.add(1)
    reply = _Reply(service, chat, job, copies, len(ids), arrived, shape)
    if chat.stream:
        return _EventStream(reply)
    return await reply.whole(request)


def _parse_chat(body: bytes, strict_fields: bool, ignored: list) -> tuple[ChatCompletionRequest, "_ChatShape"]:
    chat = parse_request(body, strict_fields, ignored)
    return chat, _ChatShape(chat.model)


def _parse_response(body: bytes, strict_fields: bool, ignored: list) -> tuple[ChatCompletionRequest, "_ResponseShape"]:
    request, chat = parse_responses_request(body, strict_fields, ignored)
    return chat, _ResponseShape(request)


def _unknown_model(name: str, served: str) -> ApiError:
    """404 for a model this server does not serve, as OpenAI answers."""
    return ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'", "model",
                    "model_not_found")


class _ChatShape:
    """Replies as a `chat.completion`, or as its chunks in server-sent events ending in [DONE]."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def _sse(self, choices: list[dict], usage_: Optional[dict] = None) -> str:
        return f"data: {json.dumps(chunk_body(self.id, self.created, self.model, choices, usage_))}\n\n"

    def body(self, choices: list[_Choice], prompt_tokens: int) -> dict:
        return completion_body(self.id, self.created, self.model, [(c.text, c.finish_reason, c.log_probs)
                                                                   for c in choices],
                               prompt_tokens, sum(choice.tokens for choice in choices))

    def started(self, chat: ChatCompletionRequest) -> list[str]:
        """The role chunk."""
        return [self._sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(chat.n or 1)])]

    def delta(self, index: int, text: str) -> list[str]:
        """More of choice `index`'s text, as it is decoded."""
        return [self._sse([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])]

    def finished(self, chat: ChatCompletionRequest, choices: list[_Choice], prompt_tokens: int,
                 rests: list[str]) -> list[str]:
        """The rest of each reply (`rests`: all of it unless streamed), the finish reasons, the usage if asked
        for, [DONE]."""
        events = [self._sse([{"index": i, "delta": {"content": rest},
                              "logprobs": logprobs_body(choice.log_probs), "finish_reason": None}])
                  for i, (choice, rest) in enumerate(zip(choices, rests)) if rest or not choice.text]
        events.append(self._sse([{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}
                                 for i, choice in enumerate(choices)]))
        if chat.stream_options is not None and chat.stream_options.include_usage:
            events.append(self._sse([], usage(prompt_tokens, sum(choice.tokens for choice in choices))))
        return events + ["data: [DONE]\n\n"]

    def failed(self, error: dict) -> list[str]:
        return [f"data: {json.dumps(error)}\n\n", "data: [DONE]\n\n"]


class _ResponseShape:
    """Replies as a `response` of the Responses API, or as its events."""

    def __init__(self, request: ResponsesRequest):
        self.events = ResponseEvents(f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time()), request)

    def body(self, choices: list[_Choice], prompt_tokens: int) -> dict:
        return self.events.body(self._result(choices[0], prompt_tokens))

    def started(self, chat: ChatCompletionRequest) -> list[str]:
        return self.events.started()

    def delta(self, index: int, text: str) -> list[str]:
        return self.events.delta(text) if index == 0 else []

    def finished(self, chat: ChatCompletionRequest, choices: list[_Choice], prompt_tokens: int,
                 rests: list[str]) -> list[str]:
        return self.events.finished(*self._result(choices[0], prompt_tokens), rest=rests[0])

    def failed(self, error: dict) -> list[str]:
        return self.events.failed(error)

    @staticmethod
    def _result(choice: _Choice, prompt_tokens: int) -> tuple:
        return choice.text, choice.finish_reason, prompt_tokens, choice.tokens


class _Reply:
    """Answering one submitted request: the whole body, or its server-sent events, in the request's shape."""

    def __init__(self, service: Service, chat: ChatCompletionRequest, job: Job, copies: int, prompt_tokens: int,
                 arrived: float, shape):
        self.service, self.chat, self.job, self.copies = service, chat, job, copies
        self.prompt_tokens, self.arrived, self.shape = prompt_tokens, arrived, shape
        self.finished = False
        service.replies.add(self)

    def abandon(self) -> None:
        """The reply will not be sent (the client left, or the server cancels): drop the job, once."""
        if not self.finished:
            self.service.scheduler.cancel(self.job)
            self._done()

    def _done(self, choices: Optional[list] = None) -> None:
        """Count the request as finished (answered when `choices` is given)."""
        if self.finished:
            return
        self.finished = True
        self.service.replies.discard(self)
        metrics = self.service.metrics
        metrics.in_flight.add(-1)
        if choices is not None:
            metrics.latency.observe(time.perf_counter() - self.arrived)
            metrics.prompt_tokens.inc(self.prompt_tokens)
            metrics.generated_tokens.inc(sum(choice.tokens for choice in choices))

    def _choices(self, replies: list[Reply]) -> list[_Choice]:
        return _choices(replies, self.copies, self.chat, self.service.responder)

    async def whole(self, request: Request) -> Response:
        """The whole body, or nothing (499) if the client leaves first."""
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({self.job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.abandon()
            raise
        finally:
            watcher.cancel()
        if not self.job.future.done():
            self.abandon()
            return Response(status_code=CLIENT_CLOSED)
        try:
            choices = self._choices(self.job.future.result())
        except Exception:
            self._done()
            raise
        self._done(choices)
        return JSONResponse(self.shape.body(choices, self.prompt_tokens))

    async def events(self):
        """The reply's server-sent events: those that start it, its text as it is decoded (when the job streams
        its tokens), then the rest of the reply (or an error event)."""
        try:
            for event in self.shape.started(self.chat):
                yield event
            streams = [TextStream(self.service.responder.decode, stop_strings(self.chat))
                       for _ in range(self.job.settings.num_return_sequences)]
            if self.job.tokens is not None:
                while (item := await self.job.tokens.get()) is not None:
                    row, token = item
                    text = streams[row].push(token)
                    for copy in range(self.copies if text else 0):  # choice index: row * copies + copy
                        for event in self.shape.delta(row * self.copies + copy, text):
                            yield event
            try:
                choices = self._choices(await self.job.future)
            except Exception as err:
                self._done()
                body = err.body() if isinstance(err, ApiError) else error_body(f"generation failed: {err}",
                                                                                 "server_error")
                for event in self.shape.failed(body):
                    yield event
                return
            self._done(choices)
            rests = [streams[i // self.copies].rest(choice.text) for i, choice in enumerate(choices)]
            for event in self.shape.finished(self.chat, choices, self.prompt_tokens, rests):
                yield event
        finally:
            self.abandon()


class _EventStream(StreamingResponse):
    """The event stream of a reply; a stream that ends before its reply (the client left) drops the job."""

    def __init__(self, reply: _Reply):
        super().__init__(reply.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.reply = reply

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.abandon()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        elif err.status_code == 405:
            message, code = f"Method {request.method} is not allowed for {request.url.path}", "method_not_allowed"
        else:
            message, code = str(err.detail), None
        return _error_response(ApiError(err.status_code, message, code=code, headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return _error_response(ApiError(400, f"Invalid request: {err.errors()[0].get('msg', err)}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return _error_response(ApiError(500, f"Internal error: {type(err).__name__}: {err}", kind="server_error"))
