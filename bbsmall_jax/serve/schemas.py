"""OpenAI's chat-completion schema: the request model, its checks, the error shape and the response bodies."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bbsmall_jax.errors import UsageError
from bbsmall_jax.records import SURROGATE_OR_NUL, field_matching

ROLES = ("system", "developer", "user", "assistant", "tool")  # a tool message's text is read as a dialogue turn
MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # as OpenAI allows


class ApiError(Exception):
    """A request error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error object (text that is not UTF-8, such as a request's lone surrogate, escaped)."""
    printable = lambda text: None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": printable(message), "type": kind, "param": printable(param), "code": code}}


class Message(BaseModel):
    """One chat message; `content` is a string or a list of text parts (checked in `text_of`)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Any = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a final chunk with the token counts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Fields OpenAI has and this server does not use are accepted only at
    their neutral values; any other field is unknown (`parse_request` drops or refuses it)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted at their neutral values only
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None


NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
           "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False)}


def _location(loc: tuple) -> str:
    """`messages[0].role` from pydantic's ("messages", 0, "role")."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field and the value."""
    first = err.errors(include_url=False)[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list"))))
    param = _location(loc)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    shown = json.dumps(first.get("input"), default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(400, f"Invalid value for '{param}': {first['msg']} (got {shown})", param, "invalid_value")


def _no_constant(name: str):
    """json.loads' hook for NaN and Infinity, which JSON does not have."""
    raise UsageError(f"{name} is not JSON")


def parse_request(body: bytes, strict_fields: bool = True, ignored: Optional[list] = None) -> ChatCompletionRequest:
    """A checked request from the raw body; ApiError(400) naming the problem otherwise.

    Fields this server does not know are an error with `strict_fields`, as OpenAI answers; otherwise they
    are dropped, as vLLM does with hints it cannot use (`service_tier`, `top_k`, ...), and their names are
    appended to `ignored`."""
    request = validated(ChatCompletionRequest, json_object(body), strict_fields, ignored)
    check_request(request)
    return request


def check_request(request: ChatCompletionRequest) -> None:
    """The checks beyond each field's type and range; ApiError(400) naming the field."""
    _check_neutral(request)
    _check_messages(request)
    _check_stop(request)


def json_object(body: bytes) -> dict:
    """The body as a JSON object holding only text (no lone surrogate, no NUL); ApiError(400) otherwise."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ApiError(400, f"We could not parse the JSON body of your request ({reason}). The body must be a "
                       "JSON object.", code="invalid_json") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
            type(data), "null")
        raise ApiError(400, f"The request body must be a JSON object, got {kind}", code="invalid_json")
    bad = field_matching(data, SURROGATE_OR_NUL)
    if bad is not None:
        raise ApiError(400, f"'{bad}' holds a lone surrogate (an escape such as \\ud800 alone) or a NUL character, "
                       "neither of which is text", bad, "invalid_value")
    return data


def validated(model: type[BaseModel], data: dict, strict_fields: bool, ignored: Optional[list]):
    """`model` validated from `data`, its unknown fields refused (`strict_fields`) or dropped and named in
    `ignored`; ApiError(400) naming the first problem."""
    if not strict_fields:
        unknown = sorted(set(data) - set(model.model_fields))
        data = {key: value for key, value in data.items() if key not in unknown}
        if ignored is not None:
            ignored.extend(unknown)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


def _check_neutral(request: ChatCompletionRequest) -> None:
    """Unsupported OpenAI options are an error unless left at their neutral value."""
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name)
        if value is not None and value not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server (got {json.dumps(value)}; only "
                           f"{' or '.join(json.dumps(v) for v in neutral)} is accepted)", name, "unsupported_parameter")
    if request.tools and request.tool_choice != "none":
        raise ApiError(400, "'tools' are accepted only with tool_choice 'none': this model does not call tools "
                       f"(got tool_choice {json.dumps(request.tool_choice)})", "tool_choice", "unsupported_parameter")
    if request.tool_choice not in (None, "none", "auto"):
        raise ApiError(400, f"'tool_choice' {json.dumps(request.tool_choice)} asks for a tool call; this model "
                       "does not call tools", "tool_choice", "unsupported_parameter")
    if request.top_logprobs and not request.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise ApiError(400, f"max_tokens ({request.max_tokens}) and max_completion_tokens "
                       f"({request.max_completion_tokens}) disagree; give one", "max_tokens", "invalid_value")


def text_of(message: Message, index: int) -> str:
    """The text of a message's content (a string, or text parts joined)."""
    param = f"messages[{index}].content"
    content = message.content
    if isinstance(content, str):
        return content
    if content is None and message.role == "assistant":  # an assistant turn of tool calls only: no text
        return ""
    if isinstance(content, list) and content:
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"Invalid value for '{param}[{number}]': only text parts "
                               '({"type": "text", "text": "..."}) are supported', f"{param}[{number}]", "invalid_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"Invalid value for '{param}': expected a string or a non-empty list of text parts, got "
                   f"{json.dumps(content, default=str)[:60]}", param, "invalid_value")


def _check_messages(request: ChatCompletionRequest) -> None:
    """A non-empty list of known roles, with at least one user or assistant message that has text."""
    if not request.messages:
        raise ApiError(400, "Invalid value for 'messages': the list is empty; give at least one user message",
                       "messages", "invalid_value")
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise ApiError(400, f"Invalid value for 'messages[{index}].role': unknown role {message.role!r}; "
                           f"expected one of {', '.join(ROLES)}", f"messages[{index}].role", "invalid_value")
        text_of(message, index)
    if not any(m.role in ("user", "assistant") and text_of(m, i).strip() for i, m in enumerate(request.messages)):
        raise ApiError(400, "Invalid value for 'messages': no user or assistant message with text; the "
                       "conversation is empty", "messages", "invalid_value")


def _check_stop(request: ChatCompletionRequest) -> None:
    """At most MAX_STOP non-empty stop strings."""
    stops = stop_strings(request)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"Invalid value for 'stop': give at most {MAX_STOP} non-empty strings, got "
                       f"{json.dumps(request.stop)[:60]}", "stop", "invalid_value")


def stop_strings(request: ChatCompletionRequest) -> list[str]:
    """The request's stop sequences as a list."""
    if request.stop is None:
        return []
    return [request.stop] if isinstance(request.stop, str) else list(request.stop)


def turns_of(request: ChatCompletionRequest) -> list[str]:
    """The dialogue turns: ParlAI's `your persona: ...` lines from system messages, then the others' texts."""
    persona, turns = [], []
    for index, message in enumerate(request.messages):
        text = text_of(message, index).strip()
        if message.role in ("system", "developer"):
            persona += [line if line.lower().startswith("your persona:") else f"your persona: {line}"
                        for line in (part.strip() for part in text.splitlines()) if line]
        elif text:
            turns.append(text)
    return persona + turns


def token_log_prob(token: str, log_prob: float, top: Optional[list] = None) -> dict:
    """One entry of OpenAI's `logprobs.content` (with its `top_logprobs` list when `top` is given)."""
    entry = {"token": token, "logprob": log_prob, "bytes": list(token.encode("utf-8"))}
    if top is not None:
        entry["top_logprobs"] = top
    return entry


def logprobs_body(entries: Optional[list[dict]]) -> Optional[dict]:
    """A choice's `logprobs` object (None when not asked for)."""
    return None if entries is None else {"content": entries, "refusal": None}


def completion_body(completion_id: str, created: int, model: str, choices: list[tuple[str, str, Optional[list]]],
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A `chat.completion` object; `choices` are (text, finish_reason, logprobs entries or None)."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs_body(entries), "finish_reason": reason}
                        for i, (text, reason, entries) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_body(completion_id: str, created: int, model: str, choices: list[dict], usage_: Optional[dict] = None) -> dict:
    """A `chat.completion.chunk` object for server-sent events."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "system_fingerprint": None}
    if usage_ is not None:
        body["usage"] = usage_
    return body
