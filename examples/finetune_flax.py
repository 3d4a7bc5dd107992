"""Fine-tune BlenderbotSmall from your own JAX code, as transformers' Flax examples do.

The train step is the user's own `jax.jit`, calling `model(..., params=..., dropout_rng=..., train=True)`;
evaluation is a `jax.pmap` of `model.generate(..., params=...)` over the local devices. The model is the
tiny random config (or `--model DIR`, a saved model) and the data a synthetic copy task, so it runs anywhere:

    python examples/finetune_flax.py --steps 200
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/finetune_flax.py   # 8 CPU "devices"

The last line printed is a JSON summary (first and last loss, rows evaluated, devices).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax

import bbsmall_jax as bb
from bbsmall_jax.nn.model import shift_tokens_right

TINY = dict(vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


def copy_task(rng: np.random.Generator, rows: int, length: int, symbols: int, eos: int):
    """Sources of random tokens (ids 4 to 4 + symbols) and targets repeating them, then EOS: [rows, length] and
    [rows, length + 1]."""
    source = rng.integers(4, 4 + symbols, (rows, length)).astype(np.int32)
    return source, np.concatenate([source, np.full((rows, 1), eos, np.int32)], axis=1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved model directory (default: the tiny random config)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=6, help="source length of the copy task")
    parser.add_argument("--symbols", type=int, default=12, help="distinct tokens of the copy task")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--output", help="save the tuned model here (save_pretrained)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cls = bb.BlenderbotSmallForConditionalGeneration
    model = cls.from_pretrained(args.model) if args.model else cls(bb.BlenderbotSmallConfig(**TINY), seed=args.seed)
    config = model.config
    rng = np.random.default_rng(args.seed)
    optimizer = optax.adamw(args.learning_rate, weight_decay=0.01)
    params = model.params
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch, dropout_rng):
        def loss_fn(params):
            decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id,
                                                   config.decoder_start_token_id)
            logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=decoder_input_ids,
                           params=params, dropout_rng=dropout_rng, train=True).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.PRNGKey(args.seed)
    losses = []
    for step in range(args.steps):
        source, target = copy_task(rng, args.batch_size, args.length, args.symbols, config.eos_token_id)
        batch = dict(input_ids=source, attention_mask=np.ones_like(source), labels=target)
        key, dropout_rng = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, batch, dropout_rng)
        losses.append(float(loss))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")

    # Evaluation: each local device generates for its own rows, inside the user's pmap.
    devices = jax.local_device_count()
    source, target = copy_task(rng, devices * 2, args.length, args.symbols, config.eos_token_id)
    per_device = lambda x: x.reshape((devices, -1) + x.shape[1:])  # [D * 2, ...] -> [D, 2, ...]
    generate = jax.pmap(lambda p, ids: model.generate(ids, params=p, max_length=args.length + 3, num_beams=2),
                        in_axes=(None, 0))
    replies = np.asarray(generate(params, per_device(source))).reshape(devices * 2, -1)
    exact = float(np.mean([(reply[1:args.length + 2] == row).all() for reply, row in zip(replies, target)]))
    print(f"copy accuracy after {args.steps} steps: {exact:.2f}")

    if args.output:
        model.save_pretrained(args.output, params=params)
    print(json.dumps(dict(first_loss=losses[0], last_loss=losses[-1], eval_rows=int(replies.shape[0]),
                          devices=devices, copy_accuracy=exact)))


if __name__ == "__main__":
    main()
