"""`python -m bbsmall_jax.testing.user_transforms`: the model and `generate` inside the user's own `pmap` and
`shard_map` over all (forced) devices, against the same calls made outside; prints one JSON line per check.
Run it in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`, so the caller keeps one
device."""

from __future__ import annotations

import json
from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from bbsmall_jax.testing.shapes import TINY

GENERATION = {"greedy": dict(max_length=10), "beam": dict(max_length=10, num_beams=3),
              "sample": dict(max_length=10, do_sample=True, top_k=8)}


def padded_to(sequences, length: int, pad: int) -> np.ndarray:
    """Un-traced `generate` output right-padded to `length` with `pad` (what a traced call returns)."""
    sequences = np.asarray(sequences)
    return np.pad(sequences, ((0, 0), (0, length - sequences.shape[1])), constant_values=pad)


def main() -> None:
    devices = jax.device_count()
    model = BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**dict(TINY, init_std=0.3)), seed=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY["vocab_size"], (devices * 2, 11)).astype(np.int32)  # 2 rows per device
    mask = (np.arange(11)[None] < rng.integers(4, 12, (devices * 2, 1))).astype(np.int32)
    ids = ids * mask
    decoder_ids = rng.integers(3, TINY["vocab_size"], (devices * 2, 6)).astype(np.int32)
    per_device = lambda x: x.reshape((devices, -1) + x.shape[1:])  # [D * 2, ...] -> [D, 2, ...]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = P("data")

    plain = BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**TINY), seed=2)  # logits of order 1

    def forward(params, i, m, d):
        return plain(i, m, decoder_input_ids=d, params=params).logits

    # each device's rows alone: the same shapes inside and out, so the same rounding
    expected = np.concatenate([np.asarray(forward(plain.params, *rows_of))
                               for rows_of in zip(*map(per_device, (ids, mask, decoder_ids)))])
    mapped = jax.pmap(forward, in_axes=(None, 0, 0, 0))(plain.params, *map(per_device, (ids, mask, decoder_ids)))
    sharded = jax.jit(jax.shard_map(partial(forward, plain.params), mesh=mesh, in_specs=(rows, rows, rows),
                                    out_specs=rows))(ids, mask, decoder_ids)
    for name, got in (("pmap", np.asarray(mapped).reshape(expected.shape)), ("shard_map", np.asarray(sharded))):
        print(json.dumps(dict(check="forward", transform=name, devices=devices,
                              max_difference=float(np.abs(got - expected).max()),
                              largest_logit=float(np.abs(expected).max()))))

    pad = model.generation_config.pad_token_id
    for strategy, settings in GENERATION.items():
        def generate(params, i, m, key):
            return model.generate(i, m, params=params, prng_key=key, **settings)

        key = jax.random.PRNGKey(5)
        # each device's rows with the key they get inside: a sampled row depends on its batch's key and place
        alone = np.concatenate([padded_to(generate(model.params, i, m, key), settings["max_length"], pad)
                                for i, m in zip(per_device(ids), per_device(mask))])
        mapped = jax.pmap(generate, in_axes=(None, 0, 0, None))(model.params, per_device(ids), per_device(mask), key)
        sharded = jax.jit(jax.shard_map(partial(generate, model.params), mesh=mesh, in_specs=(rows, rows, P()),
                                        out_specs=rows))(ids, mask, key)
        for name, got in (("pmap", np.asarray(mapped).reshape(alone.shape)), ("shard_map", np.asarray(sharded))):
            print(json.dumps(dict(check="generate", strategy=strategy, transform=name, devices=devices,
                                  shape=list(got.shape), same_tokens=bool((got == alone).all()))))


if __name__ == "__main__":
    main()
