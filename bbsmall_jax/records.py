"""Dialogue records of JSONL files, one set of rules for training data and batch inference.

A record is one line holding a JSON object (blank lines are skipped):

- the context is `"context"` (a string, or a non-empty list of strings, the oldest turn first) or
  `"text"` (one string, turns separated by newlines, as ParlAI writes them), never both; at least one
  turn must hold some text;
- the response, which training needs and batch inference ignores, is `"response"`, else `"labels"` or
  `"label"`: a string, or a list of strings whose first one is used (ParlAI's `labels`);
- the line must be UTF-8 (a byte-order mark before the first line is dropped), and no string may hold
  an escaped lone surrogate such as `"\\ud800"`, which is not text.

Any other field is kept as it is. A bad line raises `RecordError` naming the file and line.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import re
from typing import Iterator, Optional

from bbsmall_jax.errors import UsageError
from bbsmall_jax.text.reference import SURROGATE

# How the turns of a context are joined, by the name used in configs and on the command line.
SEPARATORS = {"newline": "\n", "end_start": "__end__ __start__"}


class RecordError(UsageError):
    """A line that is not a usable dialogue record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """One record: its line number, the parsed object, the context turns and the response (None if absent)."""

    line: int
    data: dict
    turns: tuple[str, ...]
    response: Optional[str]


def separator_name(name: str) -> str:
    """A separator's name, checked; the older spelling `end-start` is read as `end_start`."""
    name = name.replace("-", "_") if isinstance(name, str) else name
    if name not in SEPARATORS:
        raise UsageError(f"turn separator {name!r} is not one of {', '.join(SEPARATORS)}")
    return name


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based number, raw bytes with their newline) of each line of `path`."""
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """The text of one line (newline dropped); bytes that are not UTF-8 raise naming the byte and its place."""
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                          "of the line)") from None


SURROGATE_OR_NUL = re.compile("[\ud800-\udfff\x00]")


def field_matching(value, pattern: re.Pattern = SURROGATE, field: str = "") -> Optional[str]:
    """The first field (dotted path, list items by index) of a parsed JSON value whose name or text matches
    `pattern` (by default: holds a lone surrogate, which is not UTF-8 and which the tokenizer cannot take)."""
    if isinstance(value, str):
        return field if pattern.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        name = f"{field}.{key}" if field else str(key)
        if isinstance(key, str) and pattern.search(key):
            return name.encode("utf-8", "backslashreplace").decode("ascii")  # printable, whatever the name holds
        found = field_matching(child, pattern, name)
        if found:
            return found
    return None


def _turns(data: dict, where: str) -> tuple[str, ...]:
    """The context turns of a record."""
    if "context" in data and "text" in data:
        raise RecordError(f'{where}: has both "context" and "text"; give the context once')
    if "context" in data:
        turns = data["context"]
        turns = [turns] if isinstance(turns, str) else turns
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise RecordError(f'{where}: "context" must be a string or a non-empty list of strings, '
                              f"got {json.dumps(data['context'])[:60]}")
    elif "text" in data:
        if not isinstance(data["text"], str):
            raise RecordError(f'{where}: "text" must be a string, got {json.dumps(data["text"])[:60]}')
        turns = data["text"].split("\n")
    else:
        raise RecordError(f'{where}: needs "context" (a list of turns) or "text" (turns joined by newlines)')
    if not any(turn.strip() for turn in turns):
        raise RecordError(f"{where}: the context is empty (no turn holds any text)")
    return tuple(turns)


def _response(data: dict, where: str) -> Optional[str]:
    """The response of a record, None when it has none."""
    name = next((key for key in ("response", "labels", "label") if key in data), None)
    if name is None:
        return None
    value = data[name]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if not isinstance(value, str):
        raise RecordError(f'{where}: "{name}" must be a string or a list of strings, got {json.dumps(value)[:60]}')
    return value


def parse_record(text: str, line: int, path: str, need_response: bool = False) -> Dialogue:
    """One line's text -> Dialogue; raises RecordError naming `path` and `line`."""
    where = f"{path}:{line}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Some of json's messages end in "starting at" ("Unterminated string starting at"): one "at" is enough.
        message = err.msg[:-len(" at")] if err.msg.endswith(" at") else err.msg
        raise RecordError(f"{where}: not valid JSON ({message} at column {err.colno})") from None
    return dialogue_of(data, line, where, need_response)


def dialogue_of(data, line: int, where: str, need_response: bool = False) -> Dialogue:
    """A parsed record (a JSON object, or a Parquet row as a dict) -> Dialogue; errors name `where`."""
    if not isinstance(data, dict):
        raise RecordError(f'{where}: expected a JSON object with "context" or "text", got {type(data).__name__}')
    bad = field_matching(data)
    if bad:
        raise RecordError(f'{where}: "{bad}" holds an escaped lone surrogate (such as "\\ud800"), which is not text')
    turns, response = _turns(data, where), _response(data, where)
    if need_response and response is None:
        raise RecordError(f'{where}: needs a "response" (or "labels") string to train on')
    return Dialogue(line, data, turns, response)


def read_records(path: str | os.PathLike, need_response: bool = False) -> list[Dialogue]:
    """Every record of a JSONL file (blank lines skipped); the first bad line raises RecordError."""
    path = os.fspath(path)
    records = []
    for number, raw in read_lines(path):
        text = decode_line(raw, f"{path}:{number}", first=number == 1)
        if text.strip():
            records.append(parse_record(text, number, path, need_response))
    return records
