"""Sequence packing: the packer, exactness against the same examples unpacked (loss, gradients, logits), and
packed training on 1 and 8 devices, with FSDP, killed and resumed."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbsmall_jax.nn.model import build_module, init_params
from bbsmall_jax.testing.training import read_metrics, shared_job, subprocess_env, use_compile_cache
from bbsmall_jax.train.data import BucketBatcher
from bbsmall_jax.train.loop import train
from bbsmall_jax.train.packing import PackedBatcher, pack
from bbsmall_jax.train.plan import default_plan
from bbsmall_jax.train.steps import _features, loss_sum

use_compile_cache()


def test_pack_fills_rows_first_fit_in_order():
    rng = np.random.default_rng(0)
    source, target = rng.integers(1, 9, 500), rng.integers(1, 5, 500)
    order = rng.permutation(500)
    rows = pack(source, target, order, 16, 8)
    assert sorted(i for row in rows for i in row) == list(range(500))  # each example once
    assert all(source[row].sum() <= 16 and target[row].sum() <= 8 for row in rows)
    position = {example: n for n, example in enumerate(order)}
    assert all(np.all(np.diff([position[i] for i in row]) > 0) for row in rows)  # in order within a row
    real = (source.sum() + target.sum()) / (len(rows) * 24)
    assert real > 0.9, real  # one example a row would be 41% real


def test_packed_plan_is_deterministic_and_covers_the_epoch():
    cfg, datasets, _ = shared_job(packing=True)
    batcher = PackedBatcher(datasets.train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0)
    again = PackedBatcher(datasets.train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0)
    plan = batcher.epoch_batches(0)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(plan, again.epoch_batches(0)))
    examples = np.concatenate([rows[rows >= 0] for _, rows in plan])
    assert len(set(examples.tolist())) == len(examples) > 0.9 * len(datasets.train)  # the remainder dropped
    assert not np.array_equal(batcher.epoch_batches(1)[0][1], plan[0][1])
    with pytest.raises(ValueError, match="for training"):
        PackedBatcher(datasets.train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0, drop_remainder=False)


def test_packed_rows_give_the_loss_gradients_and_logits_of_the_examples_alone():
    cfg, datasets, model_config = shared_job(packing=True)
    module = build_module(model_config, "seq2seq_lm")
    params = init_params(module, jax.random.PRNGKey(3))
    packer = PackedBatcher(datasets.train, 8, cfg.bucket_shapes, cfg.seed, 0)
    index, rows = packer.epoch_batches(0)[0]
    bucket = packer.buckets[index]
    assert (rows >= 0).sum(axis=1).min() >= 2  # every row packs several examples
    packed = {k: jnp.asarray(v) for k, v in packer.materialize(bucket, rows).items()}
    examples = rows[rows >= 0]
    alone = {k: jnp.asarray(v) for k, v in BucketBatcher(datasets.train, len(examples), cfg.bucket_shapes, cfg.seed, 0)
             .materialize(bucket, examples).items()}
    plan = default_plan()

    def loss_and_grads(batch):
        return jax.value_and_grad(lambda p: loss_sum(module, p, batch, None, plan=plan), has_aux=True)(params)

    (packed_loss, packed_count), packed_grads = loss_and_grads(packed)
    (alone_loss, alone_count), alone_grads = loss_and_grads(alone)
    assert int(packed_count) == int(alone_count)
    np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
    worst = max(float(jnp.abs(a - b).max() / (1.0 + jnp.abs(b).max()))
                for a, b in zip(jax.tree_util.tree_leaves(packed_grads), jax.tree_util.tree_leaves(alone_grads)))
    assert worst <= 1e-5, worst

    logits = lambda batch: module.apply({"params": params}, _features(module, params, batch, None, plan),
                                        method="logits")
    packed_logits, alone_logits = np.asarray(logits(packed)), np.asarray(logits(alone))
    segments, positions = np.asarray(packed["decoder_segment_ids"]), np.asarray(packed["decoder_positions"])
    n = 0
    for r, row in enumerate(rows):
        for segment in range(1, (row >= 0).sum() + 1):
            columns = np.flatnonzero(segments[r] == segment)
            np.testing.assert_array_equal(positions[r, columns], np.arange(len(columns)))
            np.testing.assert_allclose(packed_logits[r, columns], alone_logits[n, :len(columns)], atol=1e-5)
            n += 1


@pytest.fixture(scope="module")
def packed_losses(tmp_path_factory):
    """The losses of the shared job with packed rows, on this process's single device."""
    cfg, datasets, model_config = shared_job(packing=True)
    directory = tmp_path_factory.mktemp("packed")
    train(cfg, str(directory), datasets, model_config)
    return np.array([r["loss"] for r in read_metrics(directory)])


def test_packed_training_resumes_exactly(packed_losses, tmp_path):
    cfg, datasets, model_config = shared_job(packing=True)
    train(cfg.replace(max_steps=4), str(tmp_path), datasets, model_config)  # checkpoints at steps 3 and 4
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # killed before step 4's save completed
    train(cfg, str(tmp_path), datasets, model_config)
    resumed = np.array([r["loss"] for r in read_metrics(tmp_path)])
    assert len(resumed) == len(packed_losses) == cfg.max_steps
    np.testing.assert_allclose(resumed, packed_losses, rtol=1e-6, atol=1e-7)


def test_packed_training_on_eight_devices_with_and_without_fsdp(packed_losses, tmp_path):
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    worker = subprocess.run([sys.executable, "-m", "bbsmall_jax.testing.train_worker", "--output-dir",
                             str(tmp_path), "--fsdp", "both", "--packing"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert worker.returncode == 0, worker.stderr[-3000:]
    result = json.loads(worker.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    for name, losses in result["losses"].items():
        diff = np.abs(np.array(losses) - packed_losses).max()
        print(f"packed, 8 devices ({name}) vs 1 device: max loss difference {diff:.1e}")
        assert diff <= 1e-5
