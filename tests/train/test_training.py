"""Training: gradients and loss curves against PyTorch, exact resume, divergence, devices and processes."""

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import torch

from bbsmall_jax import BlenderbotSmallForConditionalGeneration
from bbsmall_jax.checkpoint.names import flax_to_hf
from bbsmall_jax.nn.layer_stacks import stack_layers, unstack_layers
from bbsmall_jax.nn.model import build_module, cross_entropy_loss, init_params
from bbsmall_jax.train import data as data_lib
from bbsmall_jax.train.checkpoints import CheckpointStore
from bbsmall_jax.train.config import ConfigError
from bbsmall_jax.train.flops import peak_flops, train_flops
from bbsmall_jax.train.loop import DivergedError, TrainingError, train
from bbsmall_jax.train.loss import lm_head_loss, tile_count
from bbsmall_jax.train.plan import TrainingPlan, choose_plan
from bbsmall_jax.train.program import build_program
from bbsmall_jax.train.sharding import make_mesh
from bbsmall_jax.train.summaries import TAGS
from bbsmall_jax.train.steps import (abstract_state, init_state, learning_rate_schedule, loss_sum, make_eval_step,
                                     make_optimizer, make_train_step, zero_frozen)
from bbsmall_jax.testing import loopback_coordinator
from bbsmall_jax.testing.reference_models import random_hf_model, save_hf_model, scale_reference_decoder_embeddings
from bbsmall_jax.testing.training import (read_metrics, read_tensorboard, shared_job, subprocess_env,
                                          synthetic_datasets, tiny_config, torch_reference_losses, use_compile_cache)

WORKER = ["-m", "bbsmall_jax.testing.train_worker"]
FAST_COMPILE = "--xla_backend_optimization_level=0"  # subprocesses compile afresh: less compile time, slower steps

use_compile_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random-weight transformers model (decoder embeddings scaled as the checkpoint) and ours, same weights."""
    directory = tmp_path_factory.mktemp("hf")
    hf = random_hf_model(seed=0, encoder_layers=1, decoder_layers=1)  # one layer a side: quicker XLA:CPU compiles
    save_hf_model(hf, directory)
    scale_reference_decoder_embeddings(hf)
    return hf, BlenderbotSmallForConditionalGeneration.from_pretrained(directory)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """Output directory of the shared job run on this process's single device."""
    cfg, datasets, model_config = shared_job()
    directory = tmp_path_factory.mktemp("one_device")
    train(cfg, str(directory), datasets, model_config)
    return directory


@pytest.fixture(scope="module")
def one_device_losses(one_device_run):
    return np.array([r["loss"] for r in read_metrics(one_device_run)])


def _batches(cfg, datasets, count):
    batcher = data_lib.BucketBatcher(datasets.train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, 0)
    return [batcher.materialize(p.bucket, p.rows) for p, _ in zip(batcher.schedule(), range(count))]


# The accelerators' plan (layers under lax.scan, the vocabulary-tiled loss, rbg dropout keys) run on the CPU in
# float32, with tiles small enough that the tiny vocabulary of 101 is walked in 4 (the last one padded).
ACCELERATOR_PLAN = dataclasses.replace(choose_plan("tpu"), loss_vocab_tile=30, scan_layers=True)


@pytest.mark.parametrize("plan", [None, TrainingPlan(loss="plain", flat_dense=False), ACCELERATOR_PLAN],
                         ids=["default", "plain", "accelerator"])
def test_gradients_match_pytorch(reference, plan):
    """The default plan (on CPU: the fused loss, Dense layers over rows), the model's own logits and layers, and
    the plan GPU and TPU get."""
    hf, ours = reference
    cfg = tiny_config(label_smoothing=0.1)
    batch = _batches(cfg, synthetic_datasets(), 1)[0]
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # padding on both sides
    module = ours.module if plan is None else build_module(ours.config, "seq2seq_lm", **plan.module_options())
    stacked = plan is not None and plan.stacks_layers(ours.config)  # the accelerators' state: layers stacked
    assert stacked == (plan is ACCELERATOR_PLAN)
    params = stack_layers(ours.params) if stacked else ours.params

    def mean_loss(params):
        total, count = loss_sum(module, params, batch, None, cfg.label_smoothing, plan)
        return total / count

    grads = unstack_layers(jax.device_get(zero_frozen(jax.grad(mean_loss)(params))))
    grads = flax_to_hf(grads, ours.config, "seq2seq_lm")
    hf.zero_grad()
    tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    logits = hf(**tensors).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tensors["labels"].flatten(),
                                             label_smoothing=cfg.label_smoothing)
    loss.backward()
    scale = max(float(p.grad.abs().max()) for p in hf.parameters())
    worst, compared = 0.0, 0
    for name, param in hf.named_parameters():
        expected, diff = param.grad.numpy(), np.abs(grads[name] - param.grad.numpy()).max()
        if name.endswith("k_proj.bias"):  # zero in exact arithmetic (softmax ignores a per-query constant)
            assert diff <= 1e-6 * scale
            continue
        worst, compared = max(worst, float(diff / np.abs(expected).max())), compared + 1
    print(f"max relative gradient difference over {compared} tensors: {worst:.2e}")
    assert worst <= 1e-4


def test_eval_step_and_its_context_gain_match_pytorch(tmp_path):
    """The summed NLL of a batch, and under each row's neighbour's context, equal transformers'."""
    hf = random_hf_model(seed=1, encoder_layers=1, decoder_layers=1, init_std=0.3)  # its context matters
    save_hf_model(hf, tmp_path)
    scale_reference_decoder_embeddings(hf)
    ours = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    batch = _batches(tiny_config(), synthetic_datasets(), 1)[0]
    total, count, shuffled = jax.jit(make_eval_step(ours.module))(ours.params, batch)

    def torch_nll_sum(input_ids, attention_mask):
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in
                   dict(input_ids=input_ids, attention_mask=attention_mask, labels=batch["labels"]).items()}
        with torch.no_grad():
            logits = hf.eval()(**tensors).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tensors["labels"].flatten(),
                                                       reduction="sum"))

    want = torch_nll_sum(batch["input_ids"], batch["attention_mask"])
    want_shuffled = torch_nll_sum(np.roll(batch["input_ids"], -1, 0), np.roll(batch["attention_mask"], -1, 0))
    print(f"eval NLL {float(total):.4f} (transformers {want:.4f}), under other contexts {float(shuffled):.4f} "
          f"(transformers {want_shuffled:.4f})")
    assert int(count) == int((batch["labels"] != -100).sum())
    np.testing.assert_allclose([float(total), float(shuffled)], [want, want_shuffled], rtol=1e-5)
    assert abs(want_shuffled - want) > 1e-2 * want  # the contexts differ, so the NLL does


def test_scanned_layers_equal_the_layer_loop():
    """`scan_layers` (the accelerators' plan) computes what the Python loop over layers does, gradients too."""
    config = tiny_config(model={"encoder_layers": 3, "decoder_layers": 3, "d_model": 32}).model_config()
    batch = _batches(tiny_config(), synthetic_datasets(), 1)[0]
    looped, scanned = (build_module(config, "seq2seq_lm", scan_layers=scan) for scan in (False, True))
    params = init_params(looped, jax.random.PRNGKey(0))
    grad = lambda module: jax.jit(jax.value_and_grad(lambda p: loss_sum(module, p, batch, None)[0]))(params)
    (want, want_grads), (have, have_grads) = grad(looped), grad(scanned)
    # The layers kept stacked (the accelerators' train state): the scan runs over that stack as it is.
    stacked, stacked_grads = jax.jit(jax.value_and_grad(lambda p: loss_sum(scanned, p, batch, None)[0]))(
        stack_layers(params))
    for have, have_grads in ((have, have_grads), (stacked, unstack_layers(stacked_grads))):
        np.testing.assert_allclose(have, want, rtol=1e-6)
        assert jax.tree_util.tree_structure(have_grads) == jax.tree_util.tree_structure(want_grads)
        for w, h in zip(jax.tree_util.tree_leaves(want_grads), jax.tree_util.tree_leaves(have_grads)):
            np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-6 * (1.0 + float(np.abs(w).max())))
    with_dropout = jax.jit(lambda p, key: loss_sum(scanned, p, batch, key)[0])(params, jax.random.PRNGKey(1))
    assert np.isfinite(with_dropout) and with_dropout != have  # dropout keys reach every scanned layer


def test_fused_loss_equals_the_plain_one():
    rng = np.random.default_rng(0)
    hidden, table, bias = (jax.numpy.asarray(rng.normal(size=shape), "float32") for shape in ((37, 16), (101, 16), (101,)))
    some = np.where(rng.random(37) < 0.6, rng.integers(0, 101, 37), -100)  # 5 chunks of 8, the last one partial
    label_sets = jax.numpy.asarray(np.stack([some, np.full(37, -100)]), "int32")  # some labels; none

    def plain(hidden, table, bias, labels, smoothing):
        count = (labels != -100).sum()
        return cross_entropy_loss(hidden @ table.T + bias, labels, smoothing) * count, count

    def fused(hidden, table, bias, labels, smoothing, vocab_tile=0):
        return lm_head_loss(hidden, table, bias, labels, smoothing, chunk_rows=8, vocab_tile=vocab_tile)

    def tiled(hidden, table, bias, labels, smoothing):  # 101 is prime: 4 tiles of 26 columns, the last short
        return fused(hidden, table, bias, labels, smoothing, vocab_tile=30)

    def every_row(hidden, table, bias, labels, smoothing):  # the accelerators' loss: one chunk, unsorted
        return lm_head_loss(hidden, table, bias, labels, smoothing, chunk_rows=0, vocab_tile=30)

    def all_cases(loss):  # (sum, count) and the gradients of 3 x the sum, with and without label smoothing
        def run(hidden, table, bias):
            return [jax.value_and_grad(lambda h, t, b: (lambda v, n: (3.0 * v, n))(*loss(h, t, b, labels, smoothing)),
                                       (0, 1, 2), has_aux=True)(hidden, table, bias)
                    for labels in label_sets for smoothing in (0.0, 0.1)]
        return jax.jit(run)(hidden, table, bias)

    # 101 is prime: 4 tiles, the last short; 54,944 = 34 x 1,616 (a multiple of 16) before 32 x 1,717
    assert tile_count(101, 30) == 4 and tile_count(54944, 2048) == 34 and tile_count(54944, 4096) == 17
    assert tile_count(100, 30) == 4  # divides, though 25 is no multiple of 16
    want_cases = all_cases(plain)
    for candidate in (fused, tiled, every_row):
        for labels in label_sets:  # the loss alone (evaluation), without the forward pass that also differentiates
            np.testing.assert_allclose(jax.jit(candidate, static_argnums=4)(hidden, table, bias, labels, 0.1)[0],
                                       plain(hidden, table, bias, labels, 0.1)[0], rtol=1e-6, atol=1e-5)
        for ((want, want_count), want_grads), ((have, have_count), have_grads) in zip(want_cases, all_cases(candidate)):
            np.testing.assert_allclose(have, want, rtol=1e-6)
            assert int(have_count) == int(want_count)
            for w, h in zip(want_grads, have_grads):
                np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-6 * (1.0 + float(np.abs(w).max())))


def test_model_flops_and_peaks():
    config = tiny_config().model_config()  # d_model 32, FFN 64, vocabulary 101, two layers a side
    s, t, d, f, v = 16, 8, 32, 64, 101
    encoder = 2 * (2 * s * (4 * d * d + 2 * d * f) + 2 * 2 * s * s * d)
    decoder = 2 * (2 * t * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * 2 * s * d * d + 2 * 2 * t * t * d
                   + 2 * 2 * t * s * d)
    assert train_flops(config, 3, s, t) == 3 * 3 * (encoder + decoder + 2 * t * d * v)
    assert peak_flops("NVIDIA H100 80GB HBM3") == (989e12, "NVIDIA H100 80GB HBM3, dense bf16")
    assert peak_flops("TPU v5 lite")[0] == 197e12 and peak_flops("TPU v5")[0] == 459e12
    assert peak_flops("cpu")[0] is None and peak_flops("cpu", 1e12) == (1e12, "given")


def test_loss_curve_matches_pytorch_adamw(reference, tmp_path):
    hf, ours = reference
    cfg = tiny_config(max_steps=20, warmup_steps=4, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                      grad_accum_steps=2, batch_size=8, eval_every=20, save_every=20, peak_flops=1e12)
    datasets = synthetic_datasets()
    train(cfg, str(tmp_path), datasets, ours.config, host_params=jax.device_get(ours.params))
    records = read_metrics(tmp_path)
    assert all(0 < r["mfu"] < 1 for r in records)  # model FLOPs at the batch shapes over the given peak (1 TFLOP/s)
    losses = [r["loss"] for r in records]
    expected = torch_reference_losses(copy.deepcopy(hf), _batches(cfg, datasets, 20), cfg)
    diff = np.abs(np.array(losses) - np.array(expected)).max()
    print(f"20 AdamW steps: losses {expected[0]:.4f} -> {expected[-1]:.4f}, max difference {diff:.2e}")
    assert len(losses) == 20 and expected[-1] < expected[0] - 0.3
    assert diff <= 1e-4



def test_resume_is_exact_after_a_kill(one_device_run, tmp_path):
    cfg, datasets, model_config = shared_job()  # dropout 0.1: the RNG must resume too
    expected = read_metrics(one_device_run)
    run = tmp_path / "killed"
    train(cfg.replace(max_steps=4), str(run), datasets, model_config)  # checkpoints at steps 3 and 4
    # A kill after step 4 and before its save completed: step 4's checkpoint is a partial temporary directory.
    shutil.rmtree(run / "checkpoints" / "4")
    (run / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir()
    (run / "checkpoints" / "4.orbax-checkpoint-tmp" / "partial").write_text("cut")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    train(cfg, str(run), datasets, model_config)  # the same command again resumes from step 3
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert_tensorboard_equals_metrics(run, resumed)  # step 4, logged twice, once in the reader's view
    for key in ("loss", "grad_norm", "eval_loss"):
        a = np.array([r.get(key, 0.0) for r in expected])
        b = np.array([r.get(key, 0.0) for r in resumed])
        print(f"resume: max |{key} difference| {np.abs(a - b).max():.1e}")
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert os.path.isfile(run / "final" / "model.safetensors")

    with pytest.raises(ConfigError, match="different training config.*learning_rate"):
        train(cfg.replace(learning_rate=1e-2), str(run), datasets, model_config)
    with pytest.raises(ConfigError, match="total_schedule_steps.*set decay_steps"):
        train(cfg.replace(max_steps=20, decay_steps=0), str(run), datasets, model_config)
    assert train(cfg.replace(max_steps=8), str(run), datasets, model_config).step == 8  # training on


def assert_tensorboard_equals_metrics(run, records: list[dict]) -> None:
    """Every metrics.jsonl value is the TensorBoard scalar of its tag at its step, and no step repeats."""
    scalars = read_tensorboard(str(run))
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_sec", "eval/loss",
            "eval/perplexity", "eval/context_gain"} <= set(scalars)
    for name, tag in TAGS.items():
        expected = [(r["step"], r[name]) for r in records if name in r]
        steps = [step for step, _ in scalars.get(tag, [])]
        assert steps == [step for step, _ in expected], (tag, steps)
        np.testing.assert_allclose([v for _, v in scalars.get(tag, [])], [v for _, v in expected], rtol=1e-6)


def test_profile_steps_write_a_trace_and_nothing_when_off(tmp_path, monkeypatch):
    cfg, datasets, model_config = shared_job()
    started, start_trace = [], jax.profiler.start_trace
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: (started.append(a), start_trace(*a, **k))[1])
    train(cfg.replace(max_steps=2), str(tmp_path / "plain"), datasets, model_config)
    assert started == [] and not (tmp_path / "plain" / "tensorboard" / "plugins").exists()
    train(cfg.replace(max_steps=3, profile_steps=[2, 3]), str(tmp_path / "profiled"), datasets, model_config)
    assert len(started) == 1
    traces = list((tmp_path / "profiled" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("*.trace.json.gz"))  # Perfetto's
    assert_tensorboard_equals_metrics(tmp_path / "profiled", read_metrics(tmp_path / "profiled"))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """Output directory of the shared job stopped after step 4 (checkpoints of steps 3 and 4)."""
    cfg, datasets, model_config = shared_job()
    directory = tmp_path_factory.mktemp("four_steps")
    train(cfg.replace(max_steps=4), str(directory), datasets, model_config)
    return directory


def _largest_ocdbt_file(step_dir) -> str:
    data_files = [os.path.join(d, f) for d, _, files in os.walk(step_dir / "state") for f in files
                  if os.sep + "d" + os.sep in os.path.join(d, f)]
    return max(data_files, key=os.path.getsize)


def _truncate_largest_ocdbt_file(step_dir):
    largest = _largest_ocdbt_file(step_dir)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _overwrite_middle_of_largest_ocdbt_file(data: bytes):
    """8 bytes overwritten in the middle of the largest array file: values that still read, but wrong (zeros
    are finite; 0xff bytes make NaNs)."""
    def damage(step_dir):
        largest = _largest_ocdbt_file(step_dir)
        with open(largest, "r+b") as f:
            f.seek(os.path.getsize(largest) // 2)
            f.write(data)
    return damage


@pytest.mark.parametrize("damage, reason", [
    (_truncate_largest_ocdbt_file, "error while reading array"),
    (_overwrite_middle_of_largest_ocdbt_file(b"\x00" * 8), "ChecksumError: array "),
    (_overwrite_middle_of_largest_ocdbt_file(b"\xff" * 8), "ChecksumError: array "),
    (lambda step_dir: (step_dir / "meta" / "metadata").write_text('{"step": 4, "epo'), "JSONDecodeError"),
])
def test_corrupt_latest_checkpoint_warns_and_resumes_from_the_one_before(four_steps, one_device_run, tmp_path,
                                                                         capsys, damage, reason):
    cfg, datasets, model_config = shared_job()
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    damage(run / "checkpoints" / "4")
    capsys.readouterr()
    assert train(cfg, str(run), datasets, model_config).step == 6
    err = capsys.readouterr().err
    assert f"warning: the checkpoint of step 4 in {run / 'checkpoints'} cannot be restored" in err
    assert reason in err and "resuming from the checkpoint of step 3" in err
    assert "Traceback" not in err
    assert (run / "corrupt_checkpoints" / "4").is_dir()  # kept for inspection, out of the way of the new step 4
    expected, resumed = read_metrics(one_device_run), read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in expected], rtol=1e-6, atol=1e-7)


def test_no_restorable_checkpoint_is_an_error_naming_them(four_steps, tmp_path):
    cfg, datasets, model_config = shared_job()
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    for step in (3, 4):
        (run / "checkpoints" / str(step) / "meta" / "metadata").write_text("[")
    with pytest.raises(TrainingError, match=r"none of the checkpoints in .*checkpoints can be restored \(steps 4, 3;"):
        train(cfg, str(run), datasets, model_config)
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "4"]  # nothing moved or deleted


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg, datasets, model_config = shared_job()
    cfg = cfg.replace(learning_rate=1e6, warmup_steps=4, max_grad_norm=0.0, save_every=1, max_steps=12)
    with pytest.raises(DivergedError, match=r"NaN or infinite values at step \d+.*last good checkpoint, step") as err:
        train(cfg, str(tmp_path), datasets, model_config)
    print(err.value)
    store = CheckpointStore(str(tmp_path / "checkpoints"), 2)
    try:
        latest = store.latest_step()
        module = build_module(model_config, "seq2seq_lm")
        state = store.restore(latest, abstract_state(module, make_optimizer(cfg), make_mesh(), False))
    finally:
        store.close()
    assert f"step {latest}," in str(err.value)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_stacked_train_state_resumes_exactly_from_per_layer_checkpoints(tmp_path):
    """The accelerators' program keeps each stack's layers stacked in the train state; its checkpoints hold
    them per layer under the usual names, and a step after save and restore equals the step without."""
    cfg = tiny_config(dtype="float32", model={"encoder_layers": 2, "decoder_layers": 3})
    program = build_program(cfg, cfg.model_config(), make_mesh(), "gpu")  # GPU's plan, on the CPU
    assert program.stacked and "layers" in program.abstract["params"]["encoder"]
    state = init_state(program.module, program.optimizer, program.abstract, cfg.seed, stacked=True)
    batches = [{k: v[None] for k, v in b.items()} for b in _batches(cfg, synthetic_datasets(), 2)]  # [1, B, L]
    state, _ = program.train_step(state, batches[0])
    saved = program.to_checkpoint(state)
    per_layer = program.checkpoint_abstract
    assert jax.tree_util.tree_structure(saved) == jax.tree_util.tree_structure(per_layer)
    assert sorted(flax_to_hf(saved["params"], cfg.model_config(), "seq2seq_lm")) == sorted(
        flax_to_hf(unstack_layers(jax.device_get(state["params"])), cfg.model_config(), "seq2seq_lm"))
    store = CheckpointStore(str(tmp_path / "checkpoints"), 2)
    try:
        store.save(1, saved, {"step": 1, "epoch": 0, "index": 1})
        store.manager.wait_until_finished()
        restored = program.from_checkpoint(store.restore(1, per_layer))
    finally:
        store.close()
    want, want_metrics = program.train_step(state, batches[1])
    have, have_metrics = program.train_step(restored, batches[1])
    assert float(have_metrics["loss"]) == float(want_metrics["loss"])
    for w, h in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(have)):
        np.testing.assert_array_equal(np.asarray(h), np.asarray(w))


def _run_worker(args, env):
    return subprocess.Popen([sys.executable, *WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_eight_devices_match_one_device(one_device_losses, tmp_path):
    env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    result = _result(_run_worker(["--output-dir", str(tmp_path), "--fsdp", "off"], env))  # FSDP: 2-process test
    assert result["devices"] == 8
    for name, losses in result["losses"].items():
        diff = np.abs(np.array(losses) - one_device_losses).max()
        print(f"8 devices ({name}) vs 1 device: max loss difference {diff:.1e}")
        assert diff <= 1e-5


def test_two_processes_match_one_process(one_device_losses, tmp_path):
    coordinator = loopback_coordinator()
    if coordinator is None:
        pytest.skip("the host name does not resolve to a loopback address; CPU collectives would leave loopback")
    flags = ["--output-dir", str(tmp_path), "--fsdp", "on", "--coordinator", coordinator, "--num-processes", "2"]
    env = subprocess_env(XLA_FLAGS=FAST_COMPILE)
    workers = [_run_worker(flags + ["--process-id", str(i)], env) for i in range(2)]
    result = _result(workers[0])
    _, err = workers[1].communicate(timeout=300)
    assert workers[1].returncode == 0, err[-3000:]
    assert result["processes"] == 2 and result["devices"] == 2
    diff = np.abs(np.array(result["losses"]["fsdp_True"]) - one_device_losses).max()
    print(f"2 processes (FSDP over both) vs 1 process: max loss difference {diff:.1e}")
    assert diff <= 1e-5
    assert os.path.isfile(tmp_path / "fsdp_True" / "final" / "model.safetensors")


def test_remat_and_bf16_compute(reference):
    hf, ours = reference
    cfg = tiny_config()
    batch = _batches(cfg, synthetic_datasets(), 1)[0]
    hf.zero_grad()
    expected_loss = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).loss
    expected_loss.backward()
    expected_norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in hf.parameters())))
    state = {"params": ours.params, "step": jax.numpy.zeros((), "int32"), "rng": jax.random.PRNGKey(0)}

    def one_step(dtype, remat, accum=1):
        module = build_module(ours.config, "seq2seq_lm", jax.numpy.dtype(dtype))
        optimizer = make_optimizer(cfg)
        step = jax.jit(make_train_step(module, optimizer, learning_rate_schedule(cfg), remat=remat))
        accum_batch = {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in batch.items()}  # [accum, B / accum, T]
        return jax.device_get(step(dict(state, opt_state=optimizer.init(ours.params)), accum_batch))

    remat_state, remat = one_step("float32", "full", accum=2)  # and two micro-batches
    np.testing.assert_allclose([remat["loss"], remat["grad_norm"]], [expected_loss.item(), expected_norm], rtol=1e-5)
    bf16_state, bf16 = one_step("bfloat16", "dots")
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(bf16_state["params"]))  # f32 master params
    assert abs(bf16["loss"] - expected_loss.item()) < 2e-2 and abs(bf16["grad_norm"] / expected_norm - 1) < 5e-2


def test_sigterm_checkpoints_and_stops(tmp_path):
    cfg, datasets, model_config = shared_job()
    cfg = cfg.replace(max_steps=10_000, save_every=10_000)  # only the signal makes it save

    def send_sigterm_after_step_2():
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_step_2, daemon=True).start()
    result = train(cfg, str(tmp_path), datasets, model_config)
    assert result.status == "stopped" and result.step >= 2 and result.export_dir is None
    store = CheckpointStore(str(tmp_path / "checkpoints"), 2)
    try:
        assert store.latest_step() == result.step
        assert store.read_meta(result.step)["index"] == result.step  # the data position came along
    finally:
        store.close()
