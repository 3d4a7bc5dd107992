"""How much of each training batch is real tokens, with and without sequence packing, on chitchat; and the
examples/s of training on them, packed, unpacked and in transformers' PyTorch loop.

    python bench/packing.py                                  # the 90M configs' buckets, the demo tokenizer
    python bench/packing.py --tokenizer DIR --config configs/blenderbot_small_90m.yaml
    python bench/packing.py --throughput                     # examples/s, the demo model's shape

For each config: one epoch's batches as `train.py` plans them (`BucketBatcher`, `PackedBatcher`), and the fraction
of their source + target slots that hold real tokens, with the planning time of the packed epoch.

`--throughput` trains a random-weight model (the demo model's shape, positions for the lengths) on chitchat
with AdamW, clipping and dropout: our train step (train.py's program and plan) on unpacked and on packed
batches, and transformers' model in eager PyTorch with its best practice, length-grouped batches (sorted by
length within groups of 50 batches, as its `group_by_length`) padded to each batch's longest example. The
three alternate in rounds of `--steps` steps (the side going first rotating); each round gives examples/s,
the report gives medians, and compile time is apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np

from bbsmall_jax.runtime.examples import tokenize_examples
from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
from bbsmall_jax.train.config import load_config
from bbsmall_jax.train.data import BucketBatcher, chitchat_conversations, conversation_examples
from bbsmall_jax.train.packing import PackedBatcher


def real_fraction(batcher: BucketBatcher) -> tuple[float, int]:
    """(real source + target tokens over the slots of epoch 0's batches, the number of batches)."""
    real = slots = 0
    plan = batcher.epoch_batches(0)
    for bucket, rows in plan:
        source_len, target_len = batcher.buckets[bucket]
        real += int(batcher.lengths[rows[rows >= 0]].sum())
        slots += rows.shape[0] * (source_len + target_len)
    return real / slots, len(plan)


def our_side(data, cfg, model_config, packed: bool):
    """(a `steps(n) -> examples` function running n of our train steps, its compile seconds)."""
    import jax

    from bbsmall_jax.train.packing import PackedBatcher
    from bbsmall_jax.train.program import build_program
    from bbsmall_jax.train.sharding import Feeder, make_mesh
    from bbsmall_jax.train.steps import init_state

    cfg = cfg.replace(packing=packed)
    mesh = make_mesh()
    program = build_program(cfg, model_config, mesh, jax.default_backend())
    state = {"now": init_state(program.module, program.optimizer, program.abstract, cfg.seed, None,
                               program.stacked)}
    batcher = (PackedBatcher if packed else BucketBatcher)(data, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0)
    feeder, scheduled = Feeder(mesh, cfg.batch_size, 1), batcher.schedule()

    def steps(count: int, until_buckets: int = 0) -> int:
        examples, seen = 0, set()
        while count > 0 or len(seen) < until_buckets:
            plan, batch = feeder.train_batch(batcher, next(scheduled))
            state["now"], metrics = program.train_step(state["now"], batch)
            float(metrics["loss"])  # waits for the step
            examples += int((plan.rows >= 0).sum())
            seen.add(plan.bucket)
            count -= 1
        return examples

    start = time.perf_counter()
    steps(0, until_buckets=len(cfg.bucket_shapes))  # one step of each bucket shape compiles its program
    return steps, time.perf_counter() - start


def torch_side(data, model_config, batch_size: int, seed: int):
    """A `steps(n) -> examples` function running n steps of transformers' model on length-grouped batches."""
    import torch
    import transformers

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.BlenderbotSmallConfig(**model_config.to_dict())
    model = transformers.BlenderbotSmallForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    order = np.random.default_rng(seed).permutation(len(data))
    lengths = data.source_lengths + data.target_lengths
    group = 50 * batch_size
    grouped = np.concatenate([sorted(order[k:k + group], key=lambda i: -lengths[i])
                              for k in range(0, len(order), group)])
    batches = iter([grouped[k:k + batch_size] for k in range(0, len(grouped) - batch_size + 1, batch_size)])

    def tensors(rows):
        source, target = data.source_lengths[rows].max(), data.target_lengths[rows].max()
        input_ids, labels = np.zeros((len(rows), source), np.int64), np.full((len(rows), target), -100, np.int64)
        for r, row in enumerate(rows):
            input_ids[r, :data.source_lengths[row]] = data.source_ids(row)
            labels[r, :data.target_lengths[row]] = data.target_ids(row)
        return dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(input_ids != 0).long(),
                    labels=torch.tensor(labels))

    def steps(count: int) -> int:
        for _ in range(count):
            loss = model(**tensors(next(batches))).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
        return count * batch_size

    steps(1)  # a first step allocates
    return steps


def throughput(args, tokenizer, examples) -> None:
    """Examples/s of our step unpacked and packed, and of transformers' loop, in alternating rounds."""
    from bbsmall_jax.nn.config import BlenderbotSmallConfig
    from bbsmall_jax.testing.machine import describe
    from bbsmall_jax.train.config import TrainConfig

    source_len, target_len = args.source_len, args.target_len
    data = tokenize_examples(examples, tokenizer, source_len, target_len)
    model_config = BlenderbotSmallConfig.from_pretrained(DEMO_MODEL_DIR).replace(
        max_position_embeddings=max(source_len, target_len))
    fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.name != "extra"}
    cfg = TrainConfig(model=fields, max_source_length=source_len, max_target_length=target_len,
                      batch_size=args.batch, learning_rate=1e-4, weight_decay=0.01, dtype="float32",
                      progress=False)
    print(describe())
    sides = {}
    for name, packed in (("ours, unpacked", False), ("ours, packed", True)):
        sides[name], compile_s = our_side(data, cfg, model_config, packed)
        print(f"{name}: buckets {[list(b) for b in cfg.bucket_shapes]} compiled in {compile_s:.1f} s", flush=True)
    sides["transformers, length-grouped"] = torch_side(data, model_config, args.batch, cfg.seed)
    rates = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            start = time.perf_counter()
            count = sides[name](args.steps)
            rates[name].append(count / (time.perf_counter() - start))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    torch_rate = statistics.median(rates["transformers, length-grouped"])
    print(f"| side | examples/s (median of {args.rounds} rounds of {args.steps} steps) | vs transformers |\n"
          "|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / torch_rate:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=DEMO_MODEL_DIR, help="tokenizer directory (default: the demo's)")
    parser.add_argument("--config", action="append", help="training configs (default: the two 90M fine-tuning "
                        "configs, unpacked and packed buckets)")
    parser.add_argument("--throughput", action="store_true", help="time training instead (see above)")
    parser.add_argument("--batch", type=int, default=16, help="--throughput: examples (rows, packed) per step")
    parser.add_argument("--source-len", type=int, default=128, help="--throughput: context tokens at most")
    parser.add_argument("--target-len", type=int, default=32, help="--throughput: reply tokens at most")
    parser.add_argument("--steps", type=int, default=4, help="--throughput: steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="--throughput: rounds")
    parser.add_argument("--examples", type=int, default=20_000, help="--throughput: chitchat examples used")
    args = parser.parse_args()
    if args.throughput:
        examples = conversation_examples(chitchat_conversations())[:args.examples]
        throughput(args, BlenderbotSmallTokenizer.from_pretrained(args.tokenizer), examples)
        return
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
        unpacked, batches = real_fraction(BucketBatcher(data, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0))
        start = time.perf_counter()
        packed, packed_batches = real_fraction(PackedBatcher(data, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0))
        seconds = time.perf_counter() - start
        print(f"| {path} | {[list(b) for b in cfg.bucket_shapes]} | {cfg.batch_size} | {unpacked:.1%} | "
              f"{packed:.1%} | {batches} -> {packed_batches} | {seconds:.1f} |", flush=True)
    name = "the demo model's tokenizer" if args.tokenizer == DEMO_MODEL_DIR else args.tokenizer
    print(f"{len(examples)} chitchat examples, tokenized with {name}")


if __name__ == "__main__":
    main()
