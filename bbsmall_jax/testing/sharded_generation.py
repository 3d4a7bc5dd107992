"""`python -m bbsmall_jax.testing.sharded_generation`: generate over all (forced) devices and on one device,
for several batch sizes and strategies, and print one JSON line per comparison (run it in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, so the caller keeps one device). How many devices the
batch was spread over (`sharded`) is read for each batch's first strategy only: it costs a compilation."""

from __future__ import annotations

import argparse
import json

import numpy as np

STRATEGIES = {
    "greedy": dict(max_length=14),
    "beam": dict(num_beams=4, max_length=14, num_return_sequences=2, no_repeat_ngram_size=2),
    "sample": dict(do_sample=True, top_p=0.9, top_k=20, max_length=14, num_return_sequences=2),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="3,21")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--paths", default="portable")
    args = parser.parse_args()
    import jax

    from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
    from bbsmall_jax.testing.shapes import TINY

    model = BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**dict(TINY, init_std=0.3)), seed=2)
    rng = np.random.default_rng(0)
    for batch in map(int, args.batches.split(",")):
        ids = rng.integers(3, TINY["vocab_size"], (batch, 11))
        mask = (np.arange(11)[None] < rng.integers(4, 12, (batch, 1))).astype(np.int32)
        for path in args.paths.split(","):
            model.decode_path = path
            for k, name in enumerate(args.strategies.split(",")):
                kwargs = dict(STRATEGIES[name], output_scores=True, return_dict_in_generate=True,
                              prng_key=jax.random.PRNGKey(batch))
                spread = model.generate(ids * mask, attention_mask=mask, **kwargs)
                alone = model.generate(ids * mask, attention_mask=mask, devices=jax.devices()[:1], **kwargs)
                scores = [np.stack([np.asarray(s) for s in out.scores]) for out in (spread, alone)]
                finite = np.isfinite(scores[0])
                spread_info = {} if k else dict(
                    sharded=spread_over(model.lower_generate(ids * mask, attention_mask=mask, **kwargs)))
                print(json.dumps(dict(
                    batch=batch, path=path, strategy=name, devices=jax.device_count(), **spread_info,
                    same_tokens=bool(np.array_equal(np.asarray(spread.sequences), np.asarray(alone.sequences))),
                    same_filtered=bool(np.array_equal(finite, np.isfinite(scores[1]))),
                    max_score_difference=float(np.abs(scores[0][finite] - scores[1][finite]).max(initial=0.0)))),
                    flush=True)


def spread_over(lowered) -> int:
    """The most devices any argument of a lowered generation program is laid out over."""
    import jax

    shardings = jax.tree_util.tree_leaves(lowered.compile().input_shardings)
    return max(len(sharding.device_set) for sharding in shardings)


if __name__ == "__main__":
    main()
