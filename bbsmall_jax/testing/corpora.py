"""Generated sharded dialogue corpora for the streaming tests: JSONL, gzip JSONL and Parquet shards."""

from __future__ import annotations

import gzip
import os

import numpy as np

WORDS = ("hi hello how are you doing fine good thanks what about the weather today i like cats dogs music "
         "and play read a book yes no maybe sure").split()
KINDS = (".jsonl", ".jsonl.gz", ".parquet")


def record_text(shard: int, index: int, words: np.ndarray) -> tuple[str, str]:
    """(context, response) of record `index` of `shard`: a few words and the record's own tag ("s3 r17")."""
    return f"{WORDS[words[0]]} {WORDS[words[1]]} s{shard} r{index}", f"{WORDS[words[2]]} {WORDS[words[3]]}"


def write_shards(directory: str, records: int, shards: int, seed: int = 0) -> list[str]:
    """`records` records split over `shards` files, cycling through the kinds (.jsonl, .jsonl.gz, .parquet);
    returns the paths. Record i of shard k has the context "<two words> sK ri" and a two-word response."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(shards):
        n = records // shards + (k < records % shards)
        pairs = [record_text(k, i, words) for i, words in enumerate(rng.integers(0, len(WORDS), (n, 4)))]
        path = os.path.join(directory, f"part-{k:05d}{KINDS[k % len(KINDS)]}")
        if path.endswith(".parquet"):
            columns = {"context": [c for c, _ in pairs], "response": [r for _, r in pairs]}
            pq.write_table(pa.table(columns), path, row_group_size=16384)
        else:
            text = "".join(f'{{"context": ["{c}"], "response": "{r}"}}\n' for c, r in pairs).encode()
            with (gzip.open(path, "wb", compresslevel=1) if path.endswith(".gz") else open(path, "wb")) as f:
                f.write(text)
        paths.append(path)
    return paths


def corpus_tokenizer(directory: str, vocab_size: int = 101):
    """A small BlenderbotSmall tokenizer trained on the generated corpora's words, saved in `directory`."""
    from bbsmall_jax.text.vocab_training import train_tokenizer

    texts = list(WORDS) + [f"s{k} r{i}" for k in range(20) for i in range(0, 2000, 7)]
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(directory)
    return tokenizer


def streaming_job(corpus: str, tokenizer: str, packing: bool = False, **overrides):
    """The shared training job (testing/training.py) on a generated sharded corpus; packed rows are twice as
    long, so that about two examples share one."""
    from bbsmall_jax.testing.training import SHARED_JOB, SHARED_MODEL, tiny_config

    lengths = dict(max_source_length=32, max_target_length=16, buckets=[[32, 16]]) if packing else {}
    values = dict(SHARED_JOB, model=SHARED_MODEL, data=corpus, tokenizer=tokenizer, packing=packing, **lengths)
    values.update(overrides)
    return tiny_config(**values)
