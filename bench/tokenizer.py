"""Utterances/s of bbsmall_jax's tokenizer vs transformers' BlenderbotSmallTokenizer on 50,000 chitchat utterances."""

import argparse
import random
import tempfile
import time

import chitchat_dataset
from transformers import BlenderbotSmallTokenizer as ReferenceTokenizer

from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
from bbsmall_jax.text.vocab_training import train_tokenizer


def chitchat_utterances() -> list[str]:
    """Every utterance of the chitchat dataset, in file order."""
    return [u["text"] for conv in chitchat_dataset.Dataset().values() for turn in conv["messages"] for u in turn]


def timed(fn):
    """(result, (wall seconds, CPU seconds of this process)) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer-dir", help="vocab.json + merges.txt to use (default: train one on chitchat)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="size of the vocabulary trained by default")
    parser.add_argument("-n", type=int, default=50_000, help="utterances to encode")
    parser.add_argument("--repeats", type=int, default=3, help="warm passes of ours (the best one is reported)")
    args = parser.parse_args()

    utterances = chitchat_utterances()
    sample = random.Random(0).sample(utterances, args.n)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.tokenizer_dir
        if directory is None:
            directory = scratch
            train_tokenizer(utterances, args.vocab_size, directory=directory)
        reference = ReferenceTokenizer.from_pretrained(directory)
        ours = BlenderbotSmallTokenizer.from_pretrained(directory)

    # Each tokenizer starts with empty caches; both also get a pass with their caches filled.
    expected, ref_first = timed(lambda: reference(sample)["input_ids"])
    _, ref_second = timed(lambda: reference(sample)["input_ids"])
    first, ours_first = timed(lambda: ours(sample)["input_ids"])
    warm = [timed(lambda: ours(sample)["input_ids"]) for _ in range(args.repeats)]
    ours_warm = min((seconds for _, seconds in warm), key=lambda s: s[0])
    identical = first == expected and all(ids == expected for ids, _ in warm)

    n = len(sample)
    print(f"{n:,} chitchat utterances; vocabulary of {ours.vocab_size} tokens and {len(ours.bpe_ranks)} merges")
    print(f"{'':<40} {'utterances/s':>12} {'speed-up':>8}   {'per CPU-second':>14} {'speed-up':>8}")
    rows = [("transformers, first pass", ref_first, ref_first), ("transformers, second pass", ref_second, ref_second),
            ("bbsmall_jax, first pass (empty cache)", ours_first, ref_first),
            (f"bbsmall_jax, warm cache (best of {args.repeats})", ours_warm, ref_second)]
    for name, (wall, cpu), (base_wall, base_cpu) in rows:
        print(f"{name:<40} {n / wall:>12,.0f} {base_wall / wall:>7.1f}x   {n / cpu:>14,.0f} {base_cpu / cpu:>7.1f}x")
    print(f"ids identical to transformers: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
