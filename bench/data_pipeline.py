"""How fast the training data pipeline makes batches, against how fast a step consumes them.

    python bench/data_pipeline.py

In memory: `BucketBatcher` over 20,000 synthetic examples, materialised in `Prefetcher`'s background thread
(the tiny config's shapes, 32 rows). Streamed: `StreamBatcher` over a generated sharded corpus (JSONL, gzip
JSONL and Parquet shards), read, tokenized and bucketed as `train.py` does it. Each is timed over `--batches`
batches after a first one; the median of `--rounds` rounds is reported. The tiny config's train step takes
about 30 ms on a 2-core CPU, the 90M shape's seconds: a pipeline well under those never holds a step up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bbsmall_jax.testing.corpora import corpus_tokenizer, write_shards
from bbsmall_jax.testing.machine import describe
from bbsmall_jax.testing.training import synthetic_examples
from bbsmall_jax.train import data as data_lib

BUCKETS = [(32, 16), (64, 32)]
ROWS = 32


def in_memory():
    data = synthetic_examples(20000, 1000, seed=0, max_source=64, max_target=32)
    batcher = data_lib.BucketBatcher(data, ROWS, BUCKETS, seed=0, pad_token_id=0)
    batches = data_lib.Prefetcher((batcher.materialize(s.bucket, s.rows) for s in batcher.schedule()), 4)
    return batches, batches.close


def streamed(directory: str):
    from bbsmall_jax.runtime.examples import tokenize_examples
    from bbsmall_jax.train.corpus import ShardedCorpus, find_shards
    from bbsmall_jax.train.streaming import StreamBatcher

    tokenizer = corpus_tokenizer(os.path.join(directory, "tokenizer"))
    corpus = ShardedCorpus(find_shards(os.path.join(directory, "shards")), 0, 1, 0,
                           lambda examples: tokenize_examples(examples, tokenizer, 64, 32))
    batcher = StreamBatcher(corpus, ROWS, BUCKETS, tokenizer.pad_token_id, packing=False)
    return batcher, batcher.close


def per_batch(batches, count: int) -> float:
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000, help="records of the generated corpus")
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as directory:
        write_shards(os.path.join(directory, "shards"), args.records, 8)
        for name, make in (("in memory", in_memory), ("streamed", lambda: streamed(directory))):
            times = []
            for _ in range(args.rounds):
                batches, close = make()
                times.append(per_batch(batches, args.batches))
                close()
            median = statistics.median(times)
            print(f"{name}: {median * 1e3:.2f} ms per batch of {ROWS} rows ({1 / median:,.0f} batches/s, "
                  f"{ROWS / median:,.0f} examples/s; median of {args.rounds} rounds of {args.batches})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
