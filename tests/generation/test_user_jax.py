"""The model and `generate` inside the user's own JAX programs (`jit`, `grad`, `pmap`, `shard_map`), and
transformers' Flax surface on our classes (`encode`/`decode`/`init_cache`, mapping outputs, `_do_init`...)."""

import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bbsmall_jax as bb
from bbsmall_jax.nn.model import shift_tokens_right
from bbsmall_jax.testing.reference_models import TINY, to_torch
from bbsmall_jax.train.steps import loss_sum

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


@pytest.fixture(scope="module")
def seq2seq():
    return bb.BlenderbotSmallForConditionalGeneration(bb.BlenderbotSmallConfig(**dict(TINY, init_std=0.3)), seed=2)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(4)
    ids = rng.integers(3, TINY["vocab_size"], (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None] < np.array([[9], [6], [4]])).astype(np.int32)
    labels = rng.integers(3, TINY["vocab_size"], (3, 7)).astype(np.int32)
    labels[2, 5:] = -100
    return ids * mask, mask, labels


def traced_counter(function):
    """`jax.jit(function)` and a list that grows by one each time jit traces it."""
    traces = []

    def counted(*args):
        traces.append(1)
        return function(*args)
    return jax.jit(counted), traces


def test_forward_inside_jit_equals_the_untraced_call_and_compiles_once(seq2seq, batch):
    ids, mask, labels = batch
    decoder_ids = shift_tokens_right(jnp.asarray(np.where(labels < 0, 0, labels)), 0, 1)
    expected = seq2seq(ids, mask, decoder_input_ids=decoder_ids, labels=labels)
    jitted, traces = traced_counter(lambda p, i, m, d, y: seq2seq(i, m, decoder_input_ids=d, labels=y, params=p))
    for _ in range(2):
        got = jitted(seq2seq.params, ids, mask, decoder_ids, labels)
    assert len(traces) == 1
    np.testing.assert_allclose(got.logits, expected.logits, atol=1e-6)
    np.testing.assert_allclose(got.loss, expected.loss, atol=1e-6)

    causal = bb.BlenderbotSmallForCausalLM(bb.BlenderbotSmallConfig(**TINY), seed=3)
    expected = causal(ids, mask).logits
    np.testing.assert_allclose(jax.jit(lambda i, m: causal(i, m).logits)(ids, mask), expected, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(max_length=12), dict(max_length=12, num_beams=3, num_return_sequences=2,
                                                                 no_repeat_ngram_size=2),
                                      dict(max_length=12, do_sample=True, top_k=8)], ids=["greedy", "beam", "sample"])
def test_generate_inside_jit_gives_the_untraced_tokens_padded_to_max_length(seq2seq, batch, settings):
    ids, mask, _ = batch
    key = jax.random.PRNGKey(7)
    expected = np.asarray(seq2seq.generate(ids, mask, prng_key=key, **settings))
    jitted, traces = traced_counter(lambda p, i, m, k: seq2seq.generate(i, m, params=p, prng_key=k, **settings))
    for _ in range(2):
        got = np.asarray(jitted(seq2seq.params, ids, mask, key))
    assert len(traces) == 1
    pad = seq2seq.generation_config.pad_token_id
    assert got.shape == (expected.shape[0], settings["max_length"])
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == pad).all()


def test_decoder_only_generate_inside_jit(batch):
    ids, mask, _ = batch
    causal = bb.BlenderbotSmallForCausalLM(bb.BlenderbotSmallConfig(**dict(TINY, init_std=0.3)), seed=5)
    left_padded = np.stack([np.roll(row, (m == 0).sum()) for row, m in zip(ids, mask)])
    left_mask = np.stack([np.roll(m, (m == 0).sum()) for m in mask])
    expected = np.asarray(causal.generate(left_padded, left_mask, max_new_tokens=5))
    got = np.asarray(jax.jit(lambda i, m: causal.generate(i, m, max_new_tokens=5))(left_padded, left_mask))
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)


def test_grad_through_the_model_in_the_users_jit_equals_the_train_steps(batch):
    """Dropout on: the same key gives the same masks in both, so the gradients agree. `final_logits_bias` is a
    buffer in transformers' PyTorch class, so our train step holds it fixed; a user's `jax.grad` sees a param."""
    ids, mask, labels = batch
    model = bb.BlenderbotSmallForConditionalGeneration(bb.BlenderbotSmallConfig(**dict(TINY, dropout=0.1)), seed=4)
    key = jax.random.PRNGKey(11)

    @jax.jit
    def users_step(params, ids, mask, labels, key):
        loss = lambda p: model(ids, mask, labels=labels, params=p, train=True, dropout_rng=key).loss
        return jax.grad(loss)(params)

    def ours(params):
        total, count = loss_sum(model.module, params, dict(input_ids=ids, attention_mask=mask, labels=labels), key)
        return total / count

    got, expected = users_step(model.params, ids, mask, labels, key), jax.jit(jax.grad(ours))(model.params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        if "final_logits_bias" in jax.tree_util.keystr(path):
            continue
        np.testing.assert_allclose(got_leaf := _at(got, path), leaf, atol=1e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
        assert got_leaf.shape == leaf.shape


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_incremental_decoding_equals_the_full_forward_and_transformers(models, prompts):
    """transformers' Flax recipe (`encode`, `init_cache`, `decode` with positions and a cache-length mask), one
    token at a time and then two at once, against our full decode and transformers' PyTorch forward."""
    hf, ours = models
    ids, mask = prompts
    rng = np.random.default_rng(3)
    decoder_ids = np.concatenate([np.ones((4, 1), np.int64), rng.integers(3, 101, (4, 6))], axis=1)  # [4, 7]
    with torch.no_grad():
        reference = hf(input_ids=to_torch(ids), attention_mask=to_torch(mask),
                       decoder_input_ids=to_torch(decoder_ids)).logits.numpy()
    encoded = ours.encode(ids, mask)
    full = ours.decode(decoder_ids, encoded, encoder_attention_mask=mask).logits
    np.testing.assert_allclose(full, reference, atol=1e-4)

    cache = ours.init_cache(4, 10, encoded)
    cache_mask = np.ones((4, 10), np.int32)
    steps = []
    for t in range(5):
        out = ours.decode(decoder_ids[:, t:t + 1], encoded, encoder_attention_mask=mask,
                          decoder_attention_mask=cache_mask, past_key_values=cache,
                          decoder_position_ids=np.full((4, 1), t))
        steps.append(out.logits)
        cache = out.past_key_values
    out = ours.decode(decoder_ids[:, 5:7], encoded, encoder_attention_mask=mask, decoder_attention_mask=cache_mask,
                      past_key_values=cache)  # positions continue from the cache's index
    steps.append(out.logits)
    incremental = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(incremental, full, atol=1e-5)
    np.testing.assert_allclose(incremental, reference, atol=1e-4)
    with pytest.raises(ValueError, match="holds 7 of 10 positions: 4 more do not fit"):
        ours.decode(decoder_ids[:, :4], encoded, encoder_attention_mask=mask, past_key_values=out.past_key_values)
    overflowing = jax.jit(lambda c: ours.decode(decoder_ids[:, :4], encoded, encoder_attention_mask=mask,
                                                past_key_values=c).logits)(out.past_key_values)
    assert np.isnan(overflowing).all()  # inside a trace: NaN, not a clamped write's plausible logits


def test_pmap_and_shard_map_over_eight_devices():
    """In a subprocess with 8 forced CPU devices: the forward and every strategy of `generate`, mapped over
    the devices by the user's `pmap` and `shard_map`, equal the calls made on each device's rows outside."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    done = subprocess.run([sys.executable, "-m", "bbsmall_jax.testing.user_transforms"], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8 and all(row["devices"] == 8 for row in rows)
    for row in rows:
        if row["check"] == "forward":
            assert row["max_difference"] <= 1e-6, row
        else:
            assert row["same_tokens"] and row["shape"] == [16, 10], row


def test_outputs_read_as_mappings_and_tuples(seq2seq, batch):
    ids, mask, labels = batch
    out = seq2seq(ids, mask, labels=labels, output_attentions=True)
    assert list(out.keys()) == ["loss", "logits", "decoder_attentions", "cross_attentions",
                                "encoder_last_hidden_state", "encoder_attentions"]
    assert out["logits"] is out.logits and out[1] is out.logits and "past_key_values" not in out
    as_tuple = seq2seq(ids, mask, labels=labels, output_attentions=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out)
    for got, expected in zip(jax.tree_util.tree_leaves(as_tuple), jax.tree_util.tree_leaves(out.to_tuple())):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(KeyError, match="has no 'past_key_values'"):
        out["past_key_values"]


def test_config_takes_transformers_arguments_and_runtime_flags(batch):
    ids, mask, labels = batch
    config = bb.BlenderbotSmallConfig(**dict(TINY, d_model=16), initializer_range=0.02, num_hidden_layers=2)
    assert config.initializer_range == 0.02 and config.hidden_size == 16 and config.num_attention_heads == 4
    assert config.output_hidden_states is False and config.return_dict is True
    model = bb.BlenderbotSmallModel(config)
    config.output_hidden_states = True  # a default of the calls, as in transformers
    out = model(ids, mask, decoder_input_ids=labels.clip(0))
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3
    assert model(ids, mask, decoder_input_ids=labels.clip(0), output_hidden_states=False).encoder_hidden_states is None
    config.return_dict = False
    assert isinstance(model(ids, mask, decoder_input_ids=labels.clip(0)), tuple)
    with pytest.raises(AttributeError, match="d_model fixes the model's shapes"):
        config.d_model = 32
    config.forced_eos_token_id = 9  # generation defaults only: settable, and checked
    assert bb.BlenderbotSmallForConditionalGeneration(config).generation_config.forced_eos_token_id == 9
    with pytest.raises(ValueError, match="eos_token_id must be a token id in \\[0, 101\\), got 500"):
        config.eos_token_id = 500
    assert config.eos_token_id == 2
    assert hash(config) == hash(config.replace())  # run-time flags are not part of its identity


def test_transformers_flax_utilities(tmp_path, batch):
    ids, mask, labels = batch
    config = bb.BlenderbotSmallConfig(**TINY)
    half_compute = bb.BlenderbotSmallForConditionalGeneration(config, dtype=jnp.float16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half_compute.params)} == {jnp.dtype(jnp.float32)}
    model = bb.BlenderbotSmallForConditionalGeneration(config)
    half = model.to_bf16(model.params)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    mask_tree = jax.tree_util.tree_map_with_path(lambda path, _: "final_logits_bias" not in str(path), model.params)
    kept = model.to_fp16(model.params, mask_tree)
    assert kept["final_logits_bias"].dtype == jnp.float32 and kept["shared"]["embedding"].dtype == jnp.float16
    assert model.to_fp32(half)["shared"]["embedding"].dtype == jnp.float32

    model.save_pretrained(tmp_path / "bf16", params=half)
    assert bb.BlenderbotSmallForConditionalGeneration.from_pretrained(
        tmp_path / "bf16").params["shared"]["embedding"].dtype == jnp.bfloat16

    bare = bb.BlenderbotSmallForConditionalGeneration(config, _do_init=False)
    with pytest.raises(ValueError, match="_do_init=False"):
        bare.params
    with pytest.raises(ValueError, match="_do_init=False"):
        bare.params = model.params
    params = bare.init_weights(bare.key, bare.input_shape)
    assert set(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.shape, params))) == set(
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda s: s.shape, bare.params_shape_tree)))
    np.testing.assert_allclose(bare(ids, mask, labels=labels, params=model.params).logits,
                               model(ids, mask, labels=labels).logits, atol=1e-6)
    model.save_pretrained(tmp_path / "saved")
    loaded, loaded_params = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path / "saved",
                                                                                       _do_init=False)
    partial = {k: v for k, v in loaded_params.items() if k != "final_logits_bias"}
    filled = loaded.init_weights(loaded.key, params=partial)
    np.testing.assert_array_equal(filled["shared"]["embedding"], model.params["shared"]["embedding"])
    assert filled["final_logits_bias"].shape == (TINY["vocab_size"],)

    assert bb.BlenderbotSmallForConditionalGeneration.can_generate() and not bb.BlenderbotSmallModel.can_generate()
    assert model.main_input_name == "input_ids" and isinstance(model.module, model.module_class)
    names = list(inspect.signature(model.__call__).parameters)
    assert names[:4] == ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"]
    assert "max_length" not in inspect.signature(model.generate).parameters  # settings are keywords


def test_checks_under_tracing_still_name_the_argument(seq2seq, batch):
    ids, mask, _ = batch
    with pytest.raises(ValueError, match="attention_mask has shape \\(3, 8\\)"):
        jax.jit(lambda i, m: seq2seq(i, m, decoder_input_ids=i).logits)(ids, mask[:, :8])
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        jax.jit(lambda i: seq2seq(i, decoder_input_ids=ids).logits)(ids.astype(np.float32))


def test_the_flax_fine_tuning_example_trains_and_evaluates(tmp_path):
    """`examples/finetune_flax.py` on the tiny config over 2 forced devices: its loss falls."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "finetune_flax.py"), "--steps", "30",
                           "--output", str(tmp_path / "tuned")], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["last_loss"] < 0.8 * report["first_loss"], report
    assert report["eval_rows"] == report["devices"] * 2 and report["devices"] == 2
    assert os.path.isfile(tmp_path / "tuned" / "model.safetensors")


def test_gradient_checkpointing_keeps_outputs_and_gradients(batch):
    ids, mask, labels = batch
    config = bb.BlenderbotSmallConfig(**dict(TINY, dropout=0.1))
    plain, remat = (bb.BlenderbotSmallForConditionalGeneration(config, seed=6) for _ in range(2))
    remat.enable_gradient_checkpointing()
    key = jax.random.PRNGKey(2)
    outputs = [m(ids, mask, labels=labels, output_attentions=True) for m in (plain, remat)]
    assert outputs[0].keys() == outputs[1].keys()
    for a, b in zip(*(jax.tree_util.tree_leaves(o.to_tuple()) for o in outputs)):
        np.testing.assert_array_equal(a, b)
    grads = [jax.jit(jax.grad(lambda p, m=m: m(ids, mask, labels=labels, params=p, train=True,
                                                 dropout_rng=key).loss))(m.params) for m in (plain, remat)]
    for a, b in zip(*map(jax.tree_util.tree_leaves, grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    traced = [str(jax.make_jaxpr(jax.grad(lambda p, m=m: m(ids, mask, labels=labels, params=p).loss))(m.params))
              for m in (plain, remat)]
    assert "remat" not in traced[0] and traced[1].count("remat") >= 4  # one per layer
