"""How often bfloat16 compute gives exactly the float32 output: greedy and beam search, on the 90M shape with
random weights and on the embedded demo model.

    python bench/precision.py --prompts 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="inputs per model and strategy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", default="random90m,demo", help="comma-separated: random90m, demo")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="cpu")
    return parser.parse_args()


ARGS = parse_args()
os.environ["JAX_PLATFORMS"] = ARGS.backend if ARGS.backend != "gpu" else "cuda"

from bbsmall_jax import BlenderbotSmallForConditionalGeneration  # noqa: E402

STRATEGIES = {"greedy": dict(num_beams=1, max_length=32, min_length=0),
              "beam 10 (checkpoint defaults)": dict(num_beams=10, min_length=20, max_length=64, length_penalty=0.65,
                                                    no_repeat_ngram_size=3, forced_eos_token_id=2)}


def random_90m_directory(directory: str) -> tuple[str, list[np.ndarray]]:
    """A default-initialised random 90M-shape checkpoint and random prompts of 8-40 tokens."""
    from bbsmall_jax.testing.reference_models import random_hf_model, save_hf_model
    from bbsmall_jax.testing.shapes import FULL_90M

    save_hf_model(random_hf_model(**FULL_90M), directory)
    rng = np.random.default_rng(0)
    return directory, [rng.integers(3, FULL_90M["vocab_size"], rng.integers(8, 41)) for _ in range(ARGS.prompts)]


def demo_directory() -> tuple[str, list[np.ndarray]]:
    """The embedded demo model and chitchat-like prompts through its tokenizer."""
    from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
    from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer

    tokenizer = BlenderbotSmallTokenizer.from_pretrained(DEMO_MODEL_DIR)
    openers = ["hi, how are you?", "what do you do for a living?", "do you have any pets?", "i love pizza.",
               "tell me about yourself.", "what music do you like?", "i just got back from the gym.",
               "where did you grow up?"]
    texts = [f"{openers[i % len(openers)]} {openers[(i * 3 + 1) % len(openers)]}" for i in range(ARGS.prompts)]
    return DEMO_MODEL_DIR, [np.asarray(ids) for ids in tokenizer(texts)["input_ids"]]


def batches(prompts: list[np.ndarray]):
    for start in range(0, len(prompts), ARGS.batch_size):
        chunk = prompts[start:start + ARGS.batch_size]
        width = max(map(len, chunk))
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, :len(p)], mask[row, :len(p)] = p, 1
        yield ids, mask


def agreement(directory: str, prompts: list[np.ndarray]) -> dict:
    """{strategy: (equal outputs, total, seconds)} between float32 and bfloat16 compute."""
    models = {dtype: BlenderbotSmallForConditionalGeneration.from_pretrained(directory, dtype=dtype)
              for dtype in ("float32", "bfloat16")}
    results = {}
    for name, kwargs in STRATEGIES.items():
        equal, start = 0, time.perf_counter()
        for ids, mask in batches(prompts):
            out = {d: np.asarray(m.generate(ids, attention_mask=mask, **kwargs)) for d, m in models.items()}
            a, b = out["float32"], out["bfloat16"]
            width = max(a.shape[1], b.shape[1])
            a, b = (np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in (a, b))
            equal += int((a == b).all(axis=1).sum())
        results[name] = (equal, len(prompts), time.perf_counter() - start)
    return results


def main():
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {ARGS.prompts} prompts per model and strategy")
    print("| model | strategy | bf16 output == float32 | share |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in ARGS.models.split(","):
            directory, prompts = random_90m_directory(tmp) if model == "random90m" else demo_directory()
            for name, (equal, total, _) in agreement(directory, prompts).items():
                print(f"| {model} | {name} | {equal}/{total} | {equal / total:.0%} |", flush=True)


if __name__ == "__main__":
    main()
