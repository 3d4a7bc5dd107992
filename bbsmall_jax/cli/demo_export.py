"""Store a trained run's final model inside the package as the embedded demo (bf16 safetensors + tokenizer).

    python -m bbsmall_jax.cli.demo_export runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bbsmall_jax.cli.convert import convert
from bbsmall_jax.generation.config import GenerationConfig
from bbsmall_jax.runtime.models import DEMO_MODEL_DIR

# Decoding defaults of the demo: the checkpoint's recipe (beam search, no repeated trigrams, length
# penalty), with narrower beams and shorter replies so it answers quickly on a laptop CPU.
DEMO_GENERATION = GenerationConfig(num_beams=4, min_length=8, max_length=32, length_penalty=0.65,
                                   no_repeat_ngram_size=3, forced_eos_token_id=2, early_stopping=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=1)


def last_eval(metrics_path: str) -> dict:
    """The last metrics.jsonl record holding an evaluation."""
    record = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "eval_loss" in row:
                record = row
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train.py --output-dir whose run has finished (holds final/)")
    parser.add_argument("--output", default=DEMO_MODEL_DIR, help="default: the package's demo_model/")
    args = parser.parse_args(argv)
    final = os.path.join(args.run_dir, "final")
    if not os.path.isfile(os.path.join(final, "vocab.json")):
        print(f"{final} has no finished model with tokenizer; train first", file=sys.stderr)
        return 1
    convert(final, args.output, dtype="bfloat16", overwrite=True)  # the demo model is replaced on purpose
    DEMO_GENERATION.save_pretrained(args.output)
    size = os.path.getsize(os.path.join(args.output, "model.safetensors")) / 2**20
    evaluation = last_eval(os.path.join(args.run_dir, "metrics.jsonl"))
    print(f"demo model written to {args.output}: {size:.1f} MiB; last evaluation: step "
          f"{evaluation.get('step')}, validation loss {evaluation.get('eval_loss', float('nan')):.3f}, "
          f"perplexity {evaluation.get('eval_ppl', float('nan')):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
