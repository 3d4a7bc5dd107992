"""Training batches from a sharded corpus's stream (`data:` a directory or glob of shards, `corpus.py`).

Each example of the stream waits in the buffer of the smallest bucket (source_len, target_len) it fits. A
step takes this process's rows from one bucket's buffer: the first buffer to hold enough examples (packed:
enough that packing it fills more rows than a step takes; the oldest rows are taken). With several
processes, each reading its own shards, the step's bucket must be the same everywhere: once a process has a
full buffer the processes exchange which buffers are full (one small all-gather a step), take a bucket full
everywhere if there is one, and otherwise all fill the bucket that most processes have full.

Everything here is a deterministic function of the stream, so a `StreamState` (the stream's position and the
token ids of the examples waiting in the buffers) saved with a checkpoint resumes exactly. Each process
saves its own, as OUTPUT/stream_state/step_N.process_P.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.jsonfiles import read_json_object
from bbsmall_jax.runtime.examples import DataError, TokenizedExamples
from bbsmall_jax.train.corpus import ShardedCorpus, StreamPosition
from bbsmall_jax.train.data import padded_rows
from bbsmall_jax.train.packing import pack, packed_rows, row_matrix

Waiting = tuple[tuple[np.ndarray, np.ndarray], ...]  # (source ids, target ids) of each example in a buffer


@dataclasses.dataclass(frozen=True)
class StreamState:
    """Where a streamed run's data stands: the stream's position and each bucket's waiting examples."""

    position: StreamPosition
    waiting: tuple[Waiting, ...]  # one per bucket

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def to_json(self, processes: int) -> dict:
        return {"position": self.position.to_list(), "processes": processes,
                "waiting": [[[s.tolist(), t.tolist()] for s, t in bucket] for bucket in self.waiting]}

    @classmethod
    def from_json(cls, data: dict, buckets: int, processes: int, where: str) -> "StreamState":
        if data.get("processes") != processes:
            raise DataError(f"{where}: saved by a run of {data.get('processes')} processes, now {processes}: a "
                            "sharded corpus resumes with the same number of processes (each reads its own shards)")
        if len(data["waiting"]) != buckets:
            raise DataError(f"{where}: holds {len(data['waiting'])} bucket buffers for {buckets} buckets")
        waiting = tuple(tuple((np.asarray(s, np.int32), np.asarray(t, np.int32)) for s, t in bucket)
                        for bucket in data["waiting"])
        return cls(StreamPosition(*data["position"]), waiting)


@dataclasses.dataclass(frozen=True)
class StreamedBatch:
    """This process's rows of one step: indices into `examples` ([R], or [R, segments] packed)."""

    bucket: tuple[int, int]
    rows: np.ndarray
    examples: TokenizedExamples
    arrays: dict[str, np.ndarray]  # the rows materialised: [R, L] each (`padded_rows`, `packed_rows`)
    after: StreamState  # where the data stands once this batch is taken
    tokens: int  # real source + target tokens of every process's rows (this process's, times the processes)


def _as_examples(taken: Sequence[tuple[np.ndarray, np.ndarray]]) -> TokenizedExamples:
    offsets = [np.concatenate([[0], np.cumsum([len(pair[side]) for pair in taken])]) for side in (0, 1)]
    flat = [np.concatenate([pair[side] for pair in taken]).astype(np.int32) for side in (0, 1)]
    return TokenizedExamples(flat[0], offsets[0], flat[1], offsets[1])


class StreamBatcher:
    """This process's batches of `rows` rows from a corpus stream, resuming from `state` (None: the start)."""

    def __init__(self, corpus: ShardedCorpus, rows: int, buckets: Sequence[tuple[int, int]], pad_token_id: int,
                 packing: bool, state: Optional[StreamState] = None):
        self.rows, self.buckets, self.pad_token_id, self.packing = rows, tuple(buckets), pad_token_id, packing
        self.waiting = [list(bucket) for bucket in state.waiting] if state else [[] for _ in self.buckets]
        self.position = state.position if state else StreamPosition()
        self._stream = corpus.examples(self.position)

    def close(self) -> None:
        self._stream.close()

    def _pull(self) -> int:
        """Put the stream's next example in its bucket's buffer; returns the bucket."""
        self.position, source, target = next(self._stream)
        bucket = next(b for b, (s, t) in enumerate(self.buckets) if len(source) <= s and len(target) <= t)
        self.waiting[bucket].append((source, target))
        return bucket

    def _packed(self, bucket: int) -> list[list[int]]:
        waiting = self.waiting[bucket]
        return pack(np.array([len(s) for s, _ in waiting]), np.array([len(t) for _, t in waiting]),
                    np.arange(len(waiting)), *self.buckets[bucket])

    def _full(self, bucket: int) -> bool:
        waiting = self.waiting[bucket]
        if not self.packing:
            return len(waiting) >= self.rows
        source_len, target_len = self.buckets[bucket]
        enough = (sum(len(s) for s, _ in waiting) > self.rows * source_len
                  or sum(len(t) for _, t in waiting) > self.rows * target_len)
        return enough and len(self._packed(bucket)) > self.rows

    def _agree(self, full: list[bool]) -> int:
        """The step's bucket, the same in every process."""
        if jax.process_count() == 1:
            return full.index(True)
        from jax.experimental import multihost_utils

        everywhere = np.asarray(multihost_utils.process_allgather(np.asarray(full, np.int32)))  # [P, buckets]
        common = everywhere.all(axis=0)
        return int(np.argmax(common)) if common.any() else int(np.argmax(everywhere.sum(axis=0)))

    def _take(self, bucket: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Remove this step's examples from `bucket`'s buffer: (them, the rows indexing them)."""
        waiting = self.waiting[bucket]
        if not self.packing:
            self.waiting[bucket] = waiting[self.rows:]
            return waiting[:self.rows], np.arange(self.rows)
        rows = self._packed(bucket)[:self.rows]
        used = sorted(i for row in rows for i in row)
        renumber = {old: new for new, old in enumerate(used)}
        self.waiting[bucket] = [pair for i, pair in enumerate(waiting) if i not in renumber]
        return [waiting[i] for i in used], row_matrix([[renumber[i] for i in row] for row in rows])

    def __iter__(self) -> Iterator[StreamedBatch]:
        return self

    def __next__(self) -> StreamedBatch:
        full = [self._full(b) for b in range(len(self.buckets))]
        while not any(full):
            bucket = self._pull()
            full[bucket] = self._full(bucket)
        bucket = self._agree(full)
        while not self._full(bucket):
            self._pull()
        taken, rows = self._take(bucket)
        examples, shape = _as_examples(taken), self.buckets[bucket]
        arrays = (packed_rows if self.packing else padded_rows)(examples, shape, rows, self.pad_token_id)
        tokens = int(len(examples.source) + len(examples.target)) * jax.process_count()
        after = StreamState(self.position, tuple(tuple(waiting) for waiting in self.waiting))
        return StreamedBatch(shape, rows, examples, arrays, after, tokens)


def _state_path(directory: str, step: int, process: int) -> str:
    return os.path.join(directory, f"step_{step}.process_{process}.json")


def save_state(directory: str, step: int, state: StreamState) -> None:
    """Write this process's stream state of checkpoint `step`."""
    os.makedirs(directory, exist_ok=True)
    write_atomic(_state_path(directory, step, jax.process_index()), json.dumps(state.to_json(jax.process_count())))


def load_state(directory: str, step: int, buckets: int) -> StreamState:
    """This process's stream state of checkpoint `step`; DataError naming the file when it is missing or bad."""
    path = _state_path(directory, step, jax.process_index())
    try:
        data = read_json_object(path)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the checkpoint of step {step} cannot say where this process's "
                        "share of the sharded corpus stood") from None
    except ValueError as err:
        raise DataError(str(err)) from None
    try:
        return StreamState.from_json(data, buckets, jax.process_count(), path)
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a stream state ({type(err).__name__}: {err})") from None


def prune_states(directory: str, keep: Sequence[int]) -> None:
    """Delete this process's stream states of checkpoints that are no longer kept."""
    if not os.path.isdir(directory):
        return
    mine = re.compile(rf"step_(\d+)\.process_{jax.process_index()}\.json$")
    for name in os.listdir(directory):
        match = mine.match(name)
        if match and int(match.group(1)) not in keep:
            os.remove(os.path.join(directory, name))
