"""Batch inference (`bbsmall generate`): the decode engine's slots against static generate batches, alternating.

    python bench/batch.py --records 2000 --runs 3

Three settings: the embedded demo model with its own defaults; random weights in the 90M shape (8 layers,
width 512, over the demo's 8,000-token vocabulary, so its replies decode), greedy to 32 tokens; and the same
weights with the 90M checkpoint's search (beam 10, min_length 20, length penalty 0.65, no repeated trigrams,
early stopping, max_length 128). The two schedulers alternate run by run on the same input; the speed-up is
the median of the per-pair ratios, and the outputs are compared byte for byte. Compilation happens in an
untimed first run of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

SETTINGS = {
    "demo": (None, {}),
    "90m-greedy": ("random90m", dict(num_beams=1, max_length=33, min_length=0)),
    "90m-beam10": ("random90m", dict(num_beams=10, max_length=128, min_length=20, length_penalty=0.65,
                                     no_repeat_ngram_size=3, early_stopping=True)),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="dialogues in the input")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each scheduler")
    parser.add_argument("--batch-size", type=int, default=32, help="static batch size, and the engine's slots")
    parser.add_argument("--engine-steps", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="input lines per committed window")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
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
    """Random 90M-shape weights with the demo tokenizer's files (made once)."""
    import shutil

    from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
    from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
    from bbsmall_jax.testing.shapes import FULL_90M

    if os.path.isdir(directory):
        return directory
    demo = BlenderbotSmallConfig.from_json_file(os.path.join(DEMO_MODEL_DIR, "config.json"))
    config = BlenderbotSmallConfig(**dict(FULL_90M, vocab_size=demo.vocab_size))
    BlenderbotSmallForConditionalGeneration(config, seed=0).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(DEMO_MODEL_DIR, name), directory)
    return directory


def timed_run(responder, input_path: str, output_path: str, engine: bool) -> float:
    from bbsmall_jax.cli.batch import run_batch

    start = time.perf_counter()
    run_batch(responder, input_path, output_path, batch_size=ARGS.batch_size, window=ARGS.window, overwrite=True,
              show_progress=False, log=io.StringIO(), engine_steps=ARGS.engine_steps if engine else None)
    return time.perf_counter() - start


def main():
    import jax

    from bbsmall_jax.runtime.responder import Responder, load_chat_model
    from bbsmall_jax.testing.machine import describe

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.local_device_count()}; {describe()}")
    print(f"{ARGS.records} records, batch/slots {ARGS.batch_size}, engine steps {ARGS.engine_steps}, "
          f"window {ARGS.window}; medians of {ARGS.runs} runs each, alternating")
    print("| setting | static replies/s | engine replies/s | speed-up | same bytes |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        input_path = os.path.join(tmp, "in.jsonl")
        write_input(input_path)
        for name in ARGS.settings.split(","):
            weights, generation = SETTINGS[name]
            model, tokenizer = load_chat_model(weights and random_90m(os.path.join(tmp, weights)))
            responder = Responder(model, tokenizer, generation)
            outputs = {engine: os.path.join(tmp, f"{name}-{engine}.jsonl") for engine in (False, True)}
            for engine, path in outputs.items():  # compiles every program once
                timed_run(responder, input_path, path, engine)
            times = {False: [], True: []}
            for _ in range(ARGS.runs):
                for engine in (False, True):
                    times[engine].append(timed_run(responder, input_path, outputs[engine], engine))
            static, engine = (ARGS.records / statistics.median(times[flag]) for flag in (False, True))
            ratio = statistics.median(s / e for s, e in zip(times[False], times[True]))
            same = open(outputs[False], "rb").read() == open(outputs[True], "rb").read()
            print(f"| {name} | {static:.1f} | {engine:.1f} | {ratio:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
