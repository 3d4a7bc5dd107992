"""Corpora larger than memory: a directory or glob of JSONL shards (optionally gzip) and Parquet files.

Each process reads only its share of the training shards (shards p, p + P, ... of the sorted list, for
process p of P), in an order shuffled per epoch, and a background thread reads and tokenizes them a chunk
of CHUNK records at a time, a few chunks ahead: memory is bounded by that depth, not by the corpus. The
examples of a chunk are shuffled together (seeded by the run's seed, the epoch, the shard and the chunk),
so a `StreamPosition` (epoch, shard, chunk, examples taken from it) says exactly where a stream stands, and
a stream started there continues with the same examples.

JSONL lines follow `bbsmall_jax.records`' rules (errors name the file and line); Parquet rows are read with
pyarrow a row group at a time and follow the same rules on their columns (`context` or `text`, `response`
or `labels`; null cells count as absent). Records are numbered from 0 in their shard: JSONL lines, blank
ones included, or Parquet rows.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import zlib
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from bbsmall_jax.records import Dialogue, RecordError, decode_line, dialogue_of, parse_record
from bbsmall_jax.runtime.examples import DataError, Example, TokenizedExamples
from bbsmall_jax.train.data import Prefetcher, read_jsonl

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
CHUNK = 4096  # records read, tokenized and shuffled together
CHUNKS_AHEAD = 4  # tokenized chunks the background thread keeps ready


def is_sharded(data: str) -> bool:
    """Whether `data` names a sharded corpus (a directory, a glob, a .jsonl.gz or a .parquet file) rather than
    "chitchat" or one JSONL file read whole."""
    return data != "chitchat" and (os.path.isdir(data) or glob.has_magic(data) or data.endswith(SUFFIXES[1:]))


def find_shards(data: str) -> list[str]:
    """The shard files of a directory or glob, sorted; DataError when there are none or one is of another kind."""
    if not (glob.has_magic(data) or os.path.exists(data)):
        raise DataError(f"cannot read data {data}: no such file or directory")
    if os.path.isdir(data):
        paths = [os.path.join(data, name) for name in os.listdir(data) if name.endswith(SUFFIXES)]
    else:
        paths = glob.glob(data)
    paths = sorted(path for path in paths if os.path.isfile(path))
    kinds = "JSONL (.jsonl, .jsonl.gz) or Parquet (.parquet)"
    if not paths:
        raise DataError(f"{data}: holds no {kinds} shards")
    other = next((path for path in paths if not path.endswith(SUFFIXES)), None)
    if other:
        raise DataError(f"{other}: not a {kinds} shard (matched by {data})")
    return paths


def shard_records(path: str, start: int = 0) -> Iterator[tuple[int, Dialogue]]:
    """(index, record) of one shard's training records from record `start` on."""
    try:
        yield from (_parquet_records if path.endswith(".parquet") else _jsonl_records)(path, start)
    except RecordError as err:
        raise DataError(str(err)) from None
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or a damaged or cut gzip stream
        raise DataError(f"cannot read data shard {path}: {getattr(err, 'strerror', None) or err}") from None


def _jsonl_records(path: str, start: int) -> Iterator[tuple[int, Dialogue]]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for index, raw in enumerate(f):
            if index < start:
                continue
            text = decode_line(raw, f"{path}:{index + 1}", first=index == 0)
            if text.strip():
                yield index, parse_record(text, index + 1, path, need_response=True)


def _parquet_records(path: str, start: int) -> Iterator[tuple[int, Dialogue]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    first = 0  # index of the row group's first row
    for group in range(shard.num_row_groups):
        rows = shard.metadata.row_group(group).num_rows
        if first + rows > start:
            for offset, row in enumerate(shard.read_row_group(group).to_pylist()):
                if first + offset >= start:
                    data = {key: value for key, value in row.items() if value is not None}
                    yield first + offset, dialogue_of(data, first + offset + 1,
                                                      f"{path}: row {first + offset + 1}", need_response=True)
        first += rows


def read_examples(data: str) -> list[Example]:
    """Every example of a JSONL file or a sharded corpus, in memory (for evaluation sets)."""
    if not is_sharded(data):
        return read_jsonl(data)
    examples = [Example(record.turns, record.response)
                for path in find_shards(data) for _, record in shard_records(path)]
    if not examples:
        raise DataError(f"{data}: holds no examples")
    return examples


def split_shards(data: str, valid_data: Optional[str]) -> tuple[list[str], Callable[[], list[Example]]]:
    """(training shards, a function reading the validation examples) of a sharded corpus: `valid_data`'s
    examples, or else the last shard's, which is then not trained on."""
    shards = find_shards(data)
    if valid_data:
        if is_sharded(valid_data):
            find_shards(valid_data)  # fail now, not at the first evaluation
        return shards, lambda: read_examples(valid_data)
    if len(shards) < 2:
        raise DataError(f"{data}: a corpus of one shard leaves none to hold out for validation; give valid_data "
                        "(a JSONL file, directory or glob)")
    return shards[:-1], lambda: read_examples(shards[-1])


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: `taken` examples of chunk `chunk` of the `shard`-th shard of `epoch`'s order."""

    epoch: int = 0
    shard: int = 0
    chunk: int = 0
    taken: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.shard, self.chunk, self.taken]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk's examples, tokenized, in their shuffled order."""

    position: StreamPosition  # of its first example
    examples: TokenizedExamples


class ShardedCorpus:
    """One process's share of a sharded corpus's training shards, as a stream of tokenized examples."""

    def __init__(self, shards: Sequence[str], process: int, processes: int, seed: int,
                 tokenize: Callable[[list[Example]], TokenizedExamples]):
        if len(shards) < processes:
            raise DataError(f"{len(shards)} training shards cannot give each of {processes} processes its own "
                            f"share: split the corpus into at least {processes} shards")
        self.shards = list(shards[process::processes])  # this process's share
        self.seed, self.tokenize = seed, tokenize

    def order(self, epoch: int) -> np.ndarray:
        """The share's shards (indices into `self.shards`) in `epoch`'s order."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def chunks(self, start: StreamPosition) -> Iterator[Chunk]:
        """Tokenized chunks from `start` on, endlessly over epochs; DataError if an epoch holds no example."""
        epoch, shard, chunk = start.epoch, start.shard, start.chunk
        while True:
            found = False
            for k in range(shard, len(self.shards)):
                for c, records in self._shard_chunks(self.order(epoch)[k], chunk):
                    found = found or bool(records)
                    yield Chunk(StreamPosition(epoch, k, c), self._tokenized(records, epoch, k, c))
                chunk = 0
            if not found and shard == 0 and start.chunk == 0:
                raise DataError(f"the shards {', '.join(self.shards)} hold no examples")
            epoch, shard, start = epoch + 1, 0, StreamPosition()

    def _shard_chunks(self, index: int, first: int) -> Iterator[tuple[int, list[Example]]]:
        """(chunk number, its examples) of shard `index` from chunk `first` on (a chunk may be empty)."""
        records = shard_records(self.shards[index], first * CHUNK)
        pending, chunk = [], first
        for at, record in records:
            while at >= (chunk + 1) * CHUNK:
                yield chunk, pending
                pending, chunk = [], chunk + 1
            pending.append(Example(record.turns, record.response))
        yield chunk, pending

    def _tokenized(self, examples: list[Example], epoch: int, shard: int, chunk: int) -> TokenizedExamples:
        order = np.random.default_rng([self.seed, epoch, shard, chunk]).permutation(len(examples))
        try:
            return self.tokenize([examples[i] for i in order])
        except DataError:  # no example of the chunk has a context with tokens
            ids, offsets = np.zeros(0, np.int32), np.zeros(1, np.int64)
            return TokenizedExamples(ids, offsets, ids, offsets)

    def examples(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, np.ndarray, np.ndarray]]:
        """(position after it, source ids, target ids) of each example from `start` on, read and tokenized
        ahead in a background thread. Close the iterator to stop the thread."""
        chunks = Prefetcher(self.chunks(start), CHUNKS_AHEAD)
        try:
            for chunk in chunks:
                first = start.taken if chunk.position == dataclasses.replace(start, taken=0) else 0
                for i in range(first, len(chunk.examples)):
                    yield (dataclasses.replace(chunk.position, taken=i + 1), chunk.examples.source_ids(i),
                           chunk.examples.target_ids(i))
        finally:
            chunks.close()
