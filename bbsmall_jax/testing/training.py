"""Helpers of the training tests: synthetic token data, tiny configs, a PyTorch reference loop, a compile cache."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from bbsmall_jax.runtime.examples import TokenizedExamples, ragged
from bbsmall_jax.testing.shapes import TINY
from bbsmall_jax.train.config import TrainConfig

# One persistent XLA cache for the test process and its subprocesses: XLA:CPU compiles dominate these tests.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "bbsmall_jax_test_compile_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

TINY_MODEL = dict(TINY, dropout=0.1)  # the parity tests' tiny shape, with dropout


def use_compile_cache() -> None:
    """Turn on the persistent compilation cache in this process (unless configured already)."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def subprocess_env(**extra) -> dict:
    """The environment of a test subprocess: this one's, CPU only, the compile cache, plus `extra`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **CACHE_ENV)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def synthetic_examples(n: int, vocab_size: int, seed: int, max_source: int = 16,
                       max_target: int = 8) -> TokenizedExamples:
    """Learnable token data: the target is the reversed source (cut to fit) plus `__end__` (id 2)."""
    rng = np.random.default_rng(seed)
    sources, targets = [], []
    for _ in range(n):
        source = rng.integers(4, vocab_size, rng.integers(2, max_source + 1)).tolist()
        sources.append([source])
        targets.append([source[::-1][:max_target - 1] + [2]])
    return TokenizedExamples(*ragged(sources), *ragged(targets))


def synthetic_datasets(vocab_size: int = 101, n_train: int = 512, n_valid: int = 48):
    """Train and validation synthetic data (no tokenizer)."""
    from bbsmall_jax.train.preparation import Datasets

    return Datasets(synthetic_examples(n_train, vocab_size, 0), synthetic_examples(n_valid, vocab_size, 1))


def tiny_config(**overrides) -> TrainConfig:
    """A training config for the tiny model and the synthetic data: few steps, one bucket shape.

    Every training test uses these shapes so that compiled programs are shared through the cache.
    """
    values = dict(model=TINY_MODEL, max_source_length=16, max_target_length=8, buckets=[[16, 8]], batch_size=8,
                  learning_rate=3e-3, warmup_steps=3, weight_decay=0.01, max_grad_norm=1.0, max_steps=8,
                  log_every=1, eval_every=4, save_every=4, keep_checkpoints=2, progress=False, prefetch=2)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(output_dir: str) -> list[dict]:
    """The records of OUTPUT/metrics.jsonl."""
    import json

    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_tensorboard(output_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of OUTPUT/tensorboard/'s scalars, as TensorBoard's own reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def torch_reference_losses(model, batches: list[dict], cfg: TrainConfig) -> list[float]:
    """A plain PyTorch loop: AdamW (no decay on biases and LayerNorms), linear warmup/decay, clipping."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_norm = "layer_norm" in name or "layernorm" in name
        (decay if name.endswith(".weight") and not is_norm else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps)
    warmup, total = cfg.warmup_steps, cfg.total_schedule_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: t / warmup if t < warmup else max(0.0, (total - t) / (total - warmup)))
    model.train()
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        tensors = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}
        loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# The job that the 1-device, 8-device and 2-process tests all run (micro-batches of 8 rows split over devices).
# One layer a side keeps XLA:CPU compiles short (a second process cannot reuse the first one's cache entries).
SHARED_JOB = dict(max_steps=6, decay_steps=6, batch_size=16, grad_accum_steps=2, save_every=3, eval_every=3)
SHARED_MODEL = dict(TINY_MODEL, encoder_layers=1, decoder_layers=1)


def shared_job(fsdp: bool = False, packing: bool = False):
    """(config, datasets, model config) of the shared job; with `packing`, on short examples packed two to a row."""
    cfg = tiny_config(**SHARED_JOB, fsdp=fsdp, model=SHARED_MODEL, packing=packing)
    datasets = short_datasets() if packing else synthetic_datasets()
    return cfg, datasets, cfg.model_config()


def short_datasets(vocab_size: int = 101):
    """Synthetic train and validation data: sources of 2-6 tokens, targets of 3 (two to a row of the tiny bucket)."""
    from bbsmall_jax.train.preparation import Datasets

    return Datasets(synthetic_examples(1024, vocab_size, 0, max_source=6, max_target=3),
                    synthetic_examples(48, vocab_size, 1, max_source=6, max_target=3))
