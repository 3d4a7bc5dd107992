"""JSON files: the one reader (errors name the file and line) and the one writer (atomic, as transformers
formats them) of configs, tokenizer files, indexes and progress files."""

from __future__ import annotations

import json
import os
from typing import Any

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.errors import UsageError


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object; ValueError naming the file (and line) when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"{os.fspath(path)}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{os.fspath(path)}: not UTF-8 text (byte {err.start + 1})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{os.fspath(path)}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json_file(directory: str | os.PathLike, filename: str, data: dict[str, Any]) -> str:
    """Write `data` as indented, key-sorted JSON to `directory/filename` (atomically); returns the path."""
    os.makedirs(directory, exist_ok=True)
    return write_atomic(os.path.join(directory, filename), json.dumps(data, indent=2, sort_keys=True) + "\n")
