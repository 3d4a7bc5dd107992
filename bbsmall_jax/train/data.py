"""Training data: examples from JSONL or chitchat, in static bucketed batches, prefetched (tokenization is
`runtime/examples.py`)."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from bbsmall_jax.records import RecordError, read_records
from bbsmall_jax.runtime.examples import DataError, Example, TokenizedExamples

# ---- sources ----

def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples of a JSONL file of dialogue records (the rules are `bbsmall_jax.records`'), a response each."""
    path = os.fspath(path)
    try:
        records = read_records(path, need_response=True)
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None
    except RecordError as err:
        raise DataError(str(err)) from None
    if not records:
        raise DataError(f"{path}: holds no examples")
    return [Example(record.turns, record.response) for record in records]


def chitchat_conversations() -> list[list[str]]:
    """The conversations of the `chitchat-dataset` package; one sender's consecutive messages form a turn."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("the 'chitchat' corpus comes from the chitchat-dataset package, a dependency of "
                        "bbsmall_jax missing here: reinstall bbsmall_jax or `pip install chitchat-dataset`") from None
    return [list(conversation) for conversation in chitchat_dataset.ConversationDataset()]


def conversation_examples(conversations: Sequence[Sequence[str]]) -> list[Example]:
    """Every reply of every conversation, with the turns before it as context."""
    return [Example(tuple(turns[:i]), turns[i]) for turns in conversations for i in range(1, len(turns))]


def split_conversations(conversations: Sequence, valid_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle conversations with `seed` and split off `valid_fraction` of them (at least one if any)."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_valid = int(round(valid_fraction * len(conversations)))
    if valid_fraction > 0 and len(conversations) > 1:
        n_valid = min(max(n_valid, 1), len(conversations) - 1)
    valid = [conversations[i] for i in sorted(order[:n_valid])]
    train = [conversations[i] for i in sorted(order[n_valid:])]
    return train, valid


def load_examples(data: str, valid_data: Optional[str], valid_fraction: float,
                  seed: int) -> tuple[list[Example], list[Example]]:
    """(train, valid) examples of "chitchat" or a JSONL file, split by conversation (record) with `seed`."""
    if data == "chitchat":
        train, valid = split_conversations(chitchat_conversations(), valid_fraction, seed)
        train, valid = conversation_examples(train), conversation_examples(valid)
    else:
        train = read_jsonl(data)
        train, valid = split_conversations(train, 0.0 if valid_data else valid_fraction, seed)
    if valid_data:
        valid = read_jsonl(valid_data)
    return train, valid


# ---- batching ----

@dataclasses.dataclass(frozen=True)
class Position:
    """Where the stream stands: batch `index` of `epoch` is the next one."""

    epoch: int = 0
    index: int = 0


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    """One batch before it is materialised: its bucket and its example rows (-1 for filler rows)."""

    bucket: tuple[int, int]  # (source_len, target_len)
    rows: np.ndarray  # [batch_size] int64
    position: Position  # this batch's position in the stream
    tokens: int  # real (non-pad) source + target tokens

    @property
    def after(self) -> Position:
        """Where the stream stands once this batch is taken."""
        return Position(self.position.epoch, self.position.index + 1)


class BucketBatcher:
    """Bucketed, shuffled, deterministic batches: epoch e's order depends only on (seed, e).

    Each example goes to the smallest bucket (source_len, target_len) it fits; batches are drawn
    within a bucket and the batches of an epoch are shuffled. Training drops each bucket's
    remainder; evaluation (`drop_remainder=False`) fills the last batch with empty rows.
    """

    def __init__(self, data: TokenizedExamples, batch_size: int, buckets: Sequence[tuple[int, int]], seed: int,
                 pad_token_id: int, shuffle: bool = True, drop_remainder: bool = True):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.buckets = tuple(tuple(b) for b in buckets)
        self.pad_token_id, self.shuffle, self.drop_remainder = pad_token_id, shuffle, drop_remainder
        src, tgt = data.source_lengths, data.target_lengths
        fits = np.stack([(src <= s) & (tgt <= t) for s, t in self.buckets], axis=1)  # [N, n_buckets]
        if not fits[:, -1].all():
            raise DataError(f"an example is longer than the largest bucket {self.buckets[-1]}")
        self.bucket_of = fits.argmax(axis=1)
        self.lengths = src + tgt
        self._epochs: dict[int, list[tuple[int, np.ndarray]]] = {}

    ROWS = ""  # what a batch's rows are, in errors (" packed rows" for `PackedBatcher`)

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(bucket index, rows)] of one epoch."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.data)) if self.shuffle else np.arange(len(self.data))
            batches = [(b, rows) for b in range(len(self.buckets))
                       for rows in self.bucket_batches(b, order[self.bucket_of[order] == b])]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            if not batches:
                raise DataError(f"{len(self.data)} examples make no full batch of {self.batch_size}{self.ROWS}")
            self._epochs = {epoch: batches}  # keep one epoch's
        return self._epochs[epoch]

    def bucket_batches(self, bucket: int, examples: np.ndarray) -> list[np.ndarray]:
        """The batches' rows [batch_size] of one bucket's `examples`, in order: full batches, then (unless
        dropping the remainder) the rest filled with empty rows (-1)."""
        n_full = len(examples) // self.batch_size
        batches = [examples[k * self.batch_size:(k + 1) * self.batch_size] for k in range(n_full)]
        rest = examples[n_full * self.batch_size:]
        if len(rest) and not self.drop_remainder:
            batches.append(np.concatenate([rest, np.full(self.batch_size - len(rest), -1)]))
        return batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.epoch_batches(0))

    def schedule(self, start: Position = Position()) -> Iterator[ScheduledBatch]:
        """Scheduled batches from `start` on, endlessly over epochs (one epoch when not shuffling)."""
        epoch, index = start.epoch, start.index
        while True:
            batches = self.epoch_batches(epoch)
            for i in range(index, len(batches)):
                b, rows = batches[i]
                real = rows[rows >= 0]
                yield ScheduledBatch(self.buckets[b], rows, Position(epoch, i), int(self.lengths[real].sum()))
            if not self.shuffle:
                return
            epoch, index = epoch + 1, 0

    def materialize(self, bucket: tuple[int, int], rows: np.ndarray) -> dict[str, np.ndarray]:
        return padded_rows(self.data, bucket, rows, self.pad_token_id)


def padded_rows(data: TokenizedExamples, bucket: tuple[int, int], rows: np.ndarray,
                pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-padded int32 arrays of examples `rows` of `data` (-1: an empty row): input_ids, attention_mask
    [R, S] and labels [R, T] (-100 on padding)."""
    source_len, target_len = bucket
    n = len(rows)
    input_ids = np.full((n, source_len), pad_token_id, np.int32)
    labels = np.full((n, target_len), -100, np.int32)
    for r, row in enumerate(rows):
        if row < 0:
            continue
        src, tgt = data.source_ids(row), data.target_ids(row)
        input_ids[r, :len(src)] = src
        labels[r, :len(tgt)] = tgt
    lengths = data.source_lengths[np.maximum(rows, 0)] * (rows >= 0)
    attention_mask = (np.arange(source_len)[None, :] < lengths[:, None]).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Prefetcher:
    """Runs an iterator in a background thread, `size` items ahead; errors surface in the consumer."""

    _END = object()

    def __init__(self, iterator: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator):
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((self._END, err))

    def __iter__(self):
        return self

    def __next__(self):
        item, err = self._queue.get()
        if err is not None:
            raise err
        if item is self._END:
            raise StopIteration
        return item

    def close(self):
        """Stop the background thread."""
        self._stop.set()
        self._thread.join(timeout=5)
