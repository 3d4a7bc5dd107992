"""`bbsmall generate`: JSONL in, JSONL out with a "reply" per line; length-sorted batches, incremental, resumable."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

from bbsmall_jax.cli.responder import Responder


class BatchInputError(ValueError):
    """A malformed input line (with --on-error fail)."""


@dataclass
class Record:
    line: int  # 1-based input line number
    data: dict  # the input object, written back with "reply" added
    turns: list[str]


def parse_line(text: str, line: int, path: str) -> Record:
    """One input line -> Record; raises BatchInputError naming the file and line."""
    where = f"{path}:{line}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BatchInputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise BatchInputError(f"{where}: expected a JSON object with \"context\" or \"text\"")
    if "context" in data:
        turns = data["context"]
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise BatchInputError(f"{where}: \"context\" must be a non-empty list of strings")
    elif "text" in data:
        if not isinstance(data["text"], str):
            raise BatchInputError(f"{where}: \"text\" must be a string")
        turns = data["text"].split("\n")
    else:
        raise BatchInputError(f"{where}: needs a \"context\" list or a \"text\" string")
    if not any(t.strip() for t in turns):
        raise BatchInputError(f"{where}: the context is empty")
    return Record(line, data, turns)


class _Progress:
    """Sidecar `OUTPUT.progress.json`: next input line to read and the committed size of the output."""

    def __init__(self, output_path: str):
        self.path = output_path + ".progress.json"

    def read(self) -> Optional[dict]:
        if not os.path.exists(self.path):
            return None
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def write(self, next_line: int, size: int) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"next_line": next_line, "bytes": size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def _read_lines(path: str, start_line: int) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if number >= start_line:
                yield number, text


def run_batch(responder: Responder, input_path: str, output_path: str, batch_size: int = 32,
              resume: bool = False, overwrite: bool = False, on_error: str = "skip", window: int = 512,
              log: TextIO = sys.stderr, show_progress: bool = True) -> dict:
    """Reply to every line of `input_path`, writing `output_path` in input order; returns a summary."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    progress = _Progress(output_path)
    state = progress.read() if resume else None
    if os.path.exists(output_path) and not overwrite and state is None:
        if resume:
            print(f"{output_path} is complete (no unfinished run to resume)", file=log)
            return {"replies": 0, "skipped": 0, "seconds": 0.0}
        raise FileExistsError(f"{output_path} exists; pass --resume to continue it or --overwrite to replace it")
    start_line = 1
    with open(output_path, "ab" if state else "wb") as out:
        if state:
            out.truncate(state["bytes"])  # drop anything written after the last committed window
            start_line = state["next_line"]
            print(f"resuming at input line {start_line}", file=log)
        progress.write(start_line, out.tell())

        total_lines = sum(1 for _ in open(input_path, encoding="utf-8"))
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=total_lines, initial=start_line - 1, unit="line", file=log, dynamic_ncols=True)
        replies = skipped = 0
        began = time.perf_counter()
        pending: list[Record] = []
        last_line = start_line - 1

        def commit(records: list[Record], next_line: int) -> None:
            nonlocal replies
            if records:
                # Sort by context length so batches pad little; write back in input order.
                ids = {r.line: responder.context_ids(r.turns) for r in records}
                ordered = sorted(records, key=lambda r: len(ids[r.line]))
                texts: dict[int, str] = {}
                for i in range(0, len(ordered), batch_size):
                    chunk = ordered[i:i + batch_size]
                    outputs = responder.reply_ids([ids[r.line] for r in chunk])
                    for record, row in zip(chunk, outputs):
                        texts[record.line] = responder.decode(row)
                    if bar is not None:
                        bar.update(len(chunk))
                        bar.set_postfix(replies_per_s=f"{(replies + len(texts)) / (time.perf_counter() - began):.1f}")
                for record in records:
                    out.write((json.dumps({**record.data, "reply": texts[record.line]}, ensure_ascii=False)
                               + "\n").encode("utf-8"))
                replies += len(records)
            out.flush()
            os.fsync(out.fileno())
            progress.write(next_line, out.tell())

        for number, text in _read_lines(input_path, start_line):
            last_line = number
            if not text.strip():
                if bar is not None:
                    bar.update(1)
                continue
            try:
                pending.append(parse_line(text, number, input_path))
            except BatchInputError as err:
                if on_error == "fail":
                    commit(pending, number)
                    raise
                skipped += 1
                print(f"skipped {err}", file=log)
                if bar is not None:
                    bar.update(1)
            if len(pending) >= window:
                commit(pending, number + 1)
                pending = []
        commit(pending, last_line + 1)
        if bar is not None:
            bar.close()
    progress.remove()
    seconds = time.perf_counter() - began
    summary = {"replies": replies, "skipped": skipped, "seconds": round(seconds, 2),
               "replies_per_s": round(replies / seconds, 2) if seconds > 0 else None}
    print(f"{replies} replies in {seconds:.1f} s ({summary['replies_per_s']} replies/s), "
          f"{skipped} bad lines skipped -> {output_path}", file=log)
    return summary
