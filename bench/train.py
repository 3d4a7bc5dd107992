"""Training-step throughput, ours (one jitted JAX step) vs a plain PyTorch loop over transformers' model, one run.

Both train the same random-weight model (the 90M shape by default) on the same batch with AdamW, gradient
clipping and dropout 0.1. Prints tokens/s (source + target tokens) of each, the ratio, and our compile time.

    python bench/train.py [--batch 16 --source-len 64 --target-len 32 --steps 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


FULL_90M = dict(vocab_size=54944, d_model=512, encoder_layers=8, decoder_layers=8, encoder_attention_heads=16,
                decoder_attention_heads=16, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                scale_embedding=True, dropout=0.1)
TINY = dict(FULL_90M, vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)


def make_batch(vocab: int, batch: int, source_len: int, target_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(4, vocab, (batch, source_len)).astype(np.int32),
            "attention_mask": np.ones((batch, source_len), np.int32),
            "labels": rng.integers(4, vocab, (batch, target_len)).astype(np.int32)}


def bench_torch(model, batch: dict, steps: int, warmup: int, lr: float) -> tuple[float, list[float]]:
    import torch

    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses, times = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), losses


def bench_jax(directory: str, batch: dict, steps: int, warmup: int, lr: float, dtype: str, remat: str):
    import jax
    import jax.numpy as jnp

    from bbsmall_jax import BlenderbotSmallForConditionalGeneration
    from bbsmall_jax.nn.model import build_module
    from bbsmall_jax.train.config import TrainConfig
    from bbsmall_jax.train.steps import learning_rate_schedule, make_optimizer, make_train_step

    loaded = BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
    cfg = TrainConfig(learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0, schedule="constant", dtype=dtype,
                      remat=remat, model={"vocab_size": loaded.config.vocab_size})
    module = build_module(loaded.config, "seq2seq_lm", jnp.dtype(dtype), jnp.float32)
    optimizer = make_optimizer(cfg)
    state = {"params": loaded.params, "opt_state": optimizer.init(loaded.params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(0)}
    step = jax.jit(make_train_step(module, optimizer, learning_rate_schedule(cfg), remat=remat), donate_argnums=0)
    device_batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [accum=1, B, T]
    start = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_time = time.perf_counter() - start
    losses, times = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), losses, compile_time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source-len", type=int, default=64)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny config instead of the 90M shape")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    parser.add_argument("--remat", default="none", choices=["none", "dots", "full"])
    args = parser.parse_args(argv)

    import torch
    import transformers

    shape = TINY if args.tiny else FULL_90M
    config = transformers.BlenderbotSmallConfig(**shape)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.BlenderbotSmallForConditionalGeneration(config)
    batch = make_batch(config.vocab_size, args.batch, args.source_len, args.target_len)
    tokens = args.batch * (args.source_len + args.target_len)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M params; batch {args.batch} x (source {args.source_len} + target "
          f"{args.target_len}) = {tokens} tokens; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        jax_time, jax_losses, compile_time = bench_jax(directory, batch, args.steps, args.warmup, 1e-4, args.dtype,
                                                       args.remat)
    torch_time, torch_losses = bench_torch(model, batch, args.steps, args.warmup, 1e-4)
    print(f"ours (JAX, {args.dtype}, remat={args.remat}): {jax_time * 1e3:8.1f} ms/step  "
          f"{tokens / jax_time:9,.0f} tokens/s  (compile {compile_time:.1f} s)")
    print(f"PyTorch (transformers, eager):   {torch_time * 1e3:8.1f} ms/step  {tokens / torch_time:9,.0f} tokens/s")
    print(f"speed-up: {torch_time / jax_time:.2f}x   first-step loss: ours {jax_losses[0]:.4f}, "
          f"PyTorch {torch_losses[0]:.4f} (dropout masks differ)")


if __name__ == "__main__":
    main()
