"""How much of each training batch is real tokens, with and without sequence packing, on chitchat.

    python bench/packing.py                                  # the 90M configs' buckets, the demo tokenizer
    python bench/packing.py --tokenizer DIR --config configs/blenderbot_small_90m.yaml

For each config: one epoch's batches as `train.py` plans them (`Batcher`, `PackedBatcher`), and the fraction
of their source + target slots that hold real tokens, with the planning time of the packed epoch.
"""

from __future__ import annotations

import argparse
import time

from bbsmall_jax.cli.models import DEMO_MODEL_DIR
from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
from bbsmall_jax.train.config import load_config
from bbsmall_jax.train.data import Batcher, chitchat_conversations, conversation_examples, tokenize_examples
from bbsmall_jax.train.packing import PackedBatcher


def real_fraction(batcher: Batcher) -> tuple[float, int]:
    """(real source + target tokens over the slots of epoch 0's batches, the number of batches)."""
    real = slots = 0
    plan = batcher.epoch_plan(0)
    for bucket, rows in plan:
        source_len, target_len = batcher.buckets[bucket]
        real += int(batcher.lengths[rows[rows >= 0]].sum())
        slots += rows.shape[0] * (source_len + target_len)
    return real / slots, len(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=DEMO_MODEL_DIR, help="tokenizer directory (default: the demo's)")
    parser.add_argument("--config", action="append", help="training configs (default: the two 90M fine-tuning "
                        "configs, unpacked and packed buckets)")
    args = parser.parse_args()
    configs = args.config or ["configs/blenderbot_small_90m.yaml", "configs/tpu_pod_v5e16.yaml"]
    tokenizer = BlenderbotSmallTokenizer.from_pretrained(args.tokenizer)
    examples = conversation_examples(chitchat_conversations())
    tokenized = {}
    print("| config | buckets | batch | real tokens, unpacked | real tokens, packed | batches unpacked -> packed "
          "| packing an epoch (s) |\n|---|---|---|---|---|---|---|")
    for path in configs:
        cfg = load_config(path)
        lengths = (cfg.max_source_length, cfg.max_target_length)
        if lengths not in tokenized:
            tokenized[lengths] = tokenize_examples(examples, tokenizer, *lengths, separator=cfg.separator)
        data = tokenized[lengths]
        unpacked, batches = real_fraction(Batcher(data, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0))
        start = time.perf_counter()
        packed, packed_batches = real_fraction(PackedBatcher(data, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0))
        seconds = time.perf_counter() - start
        print(f"| {path} | {[list(b) for b in cfg.bucket_shapes]} | {cfg.batch_size} | {unpacked:.1%} | "
              f"{packed:.1%} | {batches} -> {packed_batches} | {seconds:.1f} |", flush=True)
    name = "the demo model's tokenizer" if args.tokenizer == DEMO_MODEL_DIR else args.tokenizer
    print(f"{len(examples)} chitchat examples, tokenized with {name}")


if __name__ == "__main__":
    main()
