"""OpenAI's Responses API, the minimal part a chat model answers: `POST /v1/responses` with text or message
`input` (and `instructions`), `output_text` and `usage` out, plain or as its streamed events.

A request becomes the equivalent chat completion request (so settings, limits and checks are the chat
endpoint's); this module only translates the request and shapes the replies.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from bbsmall_jax.serve.schemas import ApiError, ChatCompletionRequest, check_request, json_object, validated

INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Fields for what this server does not do (tools, stored responses, reasoning) are
    accepted at their neutral values only; other unknown fields are handled as on the chat endpoint."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: Union[str, list[Any]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    stream: Optional[bool] = None
    store: Optional[bool] = None  # nothing is stored either way
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    previous_response_id: Optional[str] = None  # refused: this server keeps no responses to continue
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None  # a hint for reasoning models; this one does not reason
    truncation: Optional[str] = None


def parse_responses_request(body: bytes, strict_fields: bool = True,
                            ignored: Optional[list] = None) -> tuple[ResponsesRequest, ChatCompletionRequest]:
    """(the request, the chat completion request it amounts to); ApiError(400) naming the field otherwise."""
    request = validated(ResponsesRequest, json_object(body), strict_fields, ignored)
    if request.previous_response_id is not None:
        raise ApiError(400, "'previous_response_id' is not supported: this server stores no responses; send the "
                       "conversation so far in 'input'", "previous_response_id", "unsupported_parameter")
    text_format = (request.text or {}).get("format", {"type": "text"})
    if text_format != {"type": "text"}:
        raise ApiError(400, f"'text.format' {json.dumps(text_format)[:80]} is not supported: this server answers "
                       'plain text only ({"type": "text"})', "text.format", "unsupported_parameter")
    if request.truncation not in (None, "disabled", "auto"):
        raise ApiError(400, f"Invalid value for 'truncation': {request.truncation!r}; expected 'auto' or 'disabled'",
                       "truncation", "invalid_value")
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else []) + _messages(
        request.input)
    chat = ChatCompletionRequest.model_validate(dict(
        model=request.model, messages=messages, max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature, top_p=request.top_p, stream=request.stream, tools=request.tools,
        tool_choice=request.tool_choice))
    try:
        check_request(chat)
    except ApiError as err:  # the conversation as a whole (no text), or tools: name the field of this request
        param = "input" if (err.param or "").startswith("messages") else err.param
        raise ApiError(err.status, err.message.replace("'messages'", "'input'"), param, err.code) from None
    return request, chat


def _messages(items: Union[str, list]) -> list[dict]:
    """Chat messages with string content from `input`: a string (one user message) or a list of messages
    (`{"role", "content"}`, content a string or text parts) and function call outputs (read as dialogue)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise ApiError(400, "Invalid value for 'input': the list is empty; give a string or at least one message",
                       "input", "invalid_value")
    return [_message(item, f"input[{index}]") for index, item in enumerate(items)]


def _message(item: Any, param: str) -> dict:
    """One input item as a chat message; ApiError(400) naming `param` for anything else."""
    if isinstance(item, dict) and item.get("type") == "function_call_output" and isinstance(item.get("output"), str):
        return {"role": "tool", "content": item["output"]}
    if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") not in INPUT_ROLES:
        raise ApiError(400, f"Invalid value for '{param}': expected a message with a role of "
                       f"{', '.join(INPUT_ROLES)}, got {json.dumps(item, default=str)[:60]}", param, "invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": item["role"], "content": content}
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"Invalid value for '{param}.content': expected a string or a non-empty list of text "
                       "parts", f"{param}.content", "invalid_value")
    texts = []
    for number, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ApiError(400, f"Invalid value for '{param}.content[{number}]': only text parts "
                           '({"type": "input_text", "text": "..."}) are supported', f"{param}.content[{number}]",
                           "invalid_value")
        texts.append(part["text"])
    return {"role": item["role"], "content": "\n".join(texts)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The Responses API's `usage` object."""
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def output_message(message_id: str, text: Optional[str]) -> dict:
    """The `message` output item: in progress (no text yet) or completed with its text."""
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": message_id, "status": "in_progress" if text is None else "completed",
            "role": "assistant", "content": content}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_body(response_id: str, message_id: str, created: int, request: ResponsesRequest,
                  result: Optional[tuple[str, str, int, int]] = None) -> dict:
    """A `response` object: in progress (no `result` yet), else from (text, finish_reason, prompt tokens,
    completion tokens); a reply cut by the length limit is `incomplete`, as OpenAI marks it."""
    body = {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens, "model": request.model, "output": [],
            "parallel_tool_calls": request.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": request.temperature,
            "text": {"format": {"type": "text"}}, "tool_choice": request.tool_choice or "auto",
            "tools": request.tools or [], "top_p": request.top_p, "truncation": request.truncation or "disabled",
            "usage": None, "user": request.user, "metadata": request.metadata or {}}
    if result is not None:
        text, reason, prompt_tokens, completion_tokens = result
        incomplete = reason == "length"
        body.update(status="incomplete" if incomplete else "completed",
                    incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                    output=[output_message(message_id, text)], usage=_usage(prompt_tokens, completion_tokens))
    return body


class ResponseEvents:
    """The server-sent events of one streamed response, numbered in order (`sequence_number`)."""

    def __init__(self, response_id: str, message_id: str, created: int, request: ResponsesRequest):
        self.ids = (response_id, message_id, created, request)
        self.message_id, self.number = message_id, 0

    def body(self, result: Optional[tuple[str, str, int, int]] = None) -> dict:
        """This response's `response` object (`response_body`)."""
        return response_body(*self.ids, result)

    def _event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def started(self) -> list[str]:
        """Before the reply: the response created and in progress, its message item and empty text part."""
        body = self.body()
        where = dict(item_id=self.message_id, output_index=0, content_index=0)
        return [self._event("response.created", response=body), self._event("response.in_progress", response=body),
                self._event("response.output_item.added", output_index=0, item=output_message(self.message_id, None)),
                self._event("response.content_part.added", **where, part=_text_part(""))]

    def delta(self, text: str) -> list[str]:
        """More of the reply's text, as it is decoded."""
        where = dict(item_id=self.message_id, output_index=0, content_index=0)
        return [self._event("response.output_text.delta", **where, delta=text, logprobs=[])]

    def finished(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int,
                 rest: Optional[str] = None) -> list[str]:
        """The reply: the rest of its text (`rest`, all of it unless streamed) in one delta, the parts and item
        done, then the whole response, in a `response.completed` event also when its status is `incomplete`
        (OpenAI's SDK ends a stream only there)."""
        body = self.body((text, reason, prompt_tokens, completion_tokens))
        where = dict(item_id=self.message_id, output_index=0, content_index=0)
        rest = text if rest is None else rest
        deltas = self.delta(rest) if rest or not text else []
        return [*deltas,
                self._event("response.output_text.done", **where, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, part=_text_part(text)),
                self._event("response.output_item.done", output_index=0, item=output_message(self.message_id, text)),
                self._event("response.completed", response=body)]

    def failed(self, error: dict) -> list[str]:
        """An `error` event from OpenAI's error body (the stream ends after it)."""
        detail = error["error"]
        return [self._event("error", code=detail["code"] or detail["type"], message=detail["message"],
                            param=detail["param"])]
