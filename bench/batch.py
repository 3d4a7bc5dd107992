"""Batch inference (`bbsmall generate`'s engine) with and without host/device overlap, side by side.

    python bench/batch.py --records 256 --runs 3

Two models: the embedded demo model, and random weights in the 90M shape (8 layers, width 512) over the
demo's 8,000-token vocabulary, so its replies decode. The two settings alternate run by run; the speed-up
is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256, help="dialogues in the input")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--window", type=int, default=64, help="input lines per committed window")
    parser.add_argument("--models", default="demo,random90m")
    parser.add_argument("--max-length", type=int, default=32, help="longest reply (greedy search)")
    return parser.parse_args()


ARGS = parse_args()


def write_input(path: str) -> None:
    """Chitchat contexts of 1-4 turns, one JSON record per line."""
    import chitchat_dataset

    turns = [m["text"] for conv in list(chitchat_dataset.Dataset().values())[:400]
             for turn in conv["messages"] for m in turn]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ARGS.records):
            start = (i * 7) % (len(turns) - 4)
            f.write(json.dumps({"id": i, "context": turns[start:start + 1 + i % 4]}) + "\n")


def random_90m(directory: str) -> str:
    """Random 90M-shape weights with the demo tokenizer's files."""
    import shutil

    from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
    from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
    from bbsmall_jax.testing.shapes import FULL_90M

    demo = BlenderbotSmallConfig.from_json_file(os.path.join(DEMO_MODEL_DIR, "config.json"))
    config = BlenderbotSmallConfig(**dict(FULL_90M, vocab_size=demo.vocab_size))
    BlenderbotSmallForConditionalGeneration(config, seed=0).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(DEMO_MODEL_DIR, name), directory)
    return directory


def timed_run(responder, input_path: str, output_path: str, overlap: bool) -> float:
    from bbsmall_jax.cli.batch import run_batch

    start = time.perf_counter()
    run_batch(responder, input_path, output_path, batch_size=ARGS.batch_size, window=ARGS.window, overwrite=True,
              show_progress=False, log=io.StringIO(), overlap=overlap)
    return time.perf_counter() - start


def main():
    import jax

    from bbsmall_jax.runtime.responder import Responder, load_chat_model

    from bbsmall_jax.testing.machine import describe

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.local_device_count()}; {describe()}")
    print(f"{ARGS.records} records, batch {ARGS.batch_size}, window {ARGS.window}, greedy to {ARGS.max_length} tokens")
    print("| model | plain replies/s | overlapped replies/s | speed-up | same bytes |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        input_path = os.path.join(tmp, "in.jsonl")
        write_input(input_path)
        for name in ARGS.models.split(","):
            directory = None if name == "demo" else random_90m(os.path.join(tmp, "random90m"))
            model, tokenizer = load_chat_model(directory)
            responder = Responder(model, tokenizer, dict(num_beams=1, max_length=ARGS.max_length, min_length=0))
            outputs = {flag: os.path.join(tmp, f"{name}-{flag}.jsonl") for flag in (False, True)}
            for flag, path in outputs.items():  # compiles every shape once
                timed_run(responder, input_path, path, flag)
            times = {False: [], True: []}
            for _ in range(ARGS.runs):
                for flag in (False, True):
                    times[flag].append(timed_run(responder, input_path, outputs[flag], flag))
            plain, overlapped = (ARGS.records / statistics.median(times[flag]) for flag in (False, True))
            ratio = statistics.median(p / o for p, o in zip(times[False], times[True]))
            same = open(outputs[False], "rb").read() == open(outputs[True], "rb").read()
            print(f"| {name} | {plain:.1f} | {overlapped:.1f} | {ratio:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
