"""The static KV cache: step-by-step decoding equals the full decoder; beam reorder; no recompilation per length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForCausalLM, BlenderbotSmallForConditionalGeneration
from bbsmall_jax.generation.plan import PORTABLE, choose_plan
from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.compilations import CompilationCounter
from bbsmall_jax.testing.shapes import TINY


@pytest.fixture(params=["portable", "cpu"])
def plan(request):
    """Each decoding path's way of running a step (its layer functions and cache layout)."""
    return PORTABLE if request.param == "portable" else choose_plan("cpu", jnp.float32, rows=2)


def plan_cache(plan, cache: KVCache) -> KVCache:
    """`cache` (empty so far) laid out as the plan's."""
    rows, length = cache.rows, cache.max_length
    empty = KVCache.empty(BlenderbotSmallConfig(**TINY), rows, length, cache.entries.dtype, plan.time_major_cache)
    return cache.replace(entries=empty.entries, time_major=plan.time_major_cache)


@pytest.fixture(scope="module")
def seq2seq():
    return BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**TINY), seed=3)


def test_step_by_step_with_cache_equals_full_decoder(seq2seq, plan):
    module, variables = plan.decoding_module(seq2seq.module), {"params": seq2seq.params}
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 101, (2, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    decoder_ids = jnp.asarray(rng.integers(3, 101, (2, 6)), jnp.int32)
    encoded = module.apply(variables, ids, mask, method="encode").last_hidden_state
    full = module.apply(variables, decoder_input_ids=decoder_ids, encoder_hidden_states=encoded,
                        encoder_attention_mask=mask, method="decode").last_hidden_state
    full_logits = module.apply(variables, full, method="logits")

    cache = module.apply(variables, 2, 10, encoded, mask, method="init_cache")
    assert cache.entries.shape == (2, 2, 2, 10, 32)  # [keys/values, layers, batch, max_len, heads * head_dim]
    cache = plan_cache(plan, cache)
    assert cache.entries.shape == ((10, 4, 2, 32) if plan.time_major_cache else (2, 2, 2, 10, 32))

    def decode(tokens, cache):
        out = module.apply(variables, decoder_input_ids=tokens, cache=cache, method="decode")
        return module.apply(variables, out.last_hidden_state, method="logits"), out.cache

    step = jax.jit(decode)

    logits, cache = step(decoder_ids[:, :2], cache)  # a two-token prefill, then one token per step
    steps = [logits]
    for t in range(2, 6):
        logits, cache = step(decoder_ids[:, t:t + 1], cache)
        steps.append(logits)
    assert int(cache.index) == 6
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_logits, atol=1e-5, rtol=1e-5)


def test_decoder_only_step_by_step_with_cache_equals_full_decoder(plan):
    model = BlenderbotSmallForCausalLM(BlenderbotSmallConfig(**TINY), seed=4)
    module, variables = plan.decoding_module(model.module), {"params": model.params}
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 101, (2, 5)), jnp.int32)
    full = module.apply(variables, ids, method="decode").last_hidden_state
    cache = module.apply(variables, 2, 8, method="init_cache")
    step = jax.jit(lambda tokens, cache: module.apply(variables, input_ids=tokens, cache=cache, method="decode"))
    hidden = []
    for t in range(5):
        out = step(ids[:, t:t + 1], cache)
        hidden.append(out.last_hidden_state)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(hidden, axis=1), full, atol=1e-5, rtol=1e-5)


def test_cached_attention_weights_match_the_full_decoder(seq2seq, plan):
    """One-token steps read the cache through growing windows; their weights still cover the whole buffer."""
    module, variables = plan.decoding_module(seq2seq.module), {"params": seq2seq.params}
    rng = np.random.default_rng(2)
    encoded = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
    decoder_ids = jnp.asarray(rng.integers(3, 101, (2, 9)), jnp.int32)
    full = module.apply(variables, decoder_input_ids=decoder_ids, encoder_hidden_states=encoded,
                        method="decode", output_attentions=True).attentions  # per layer [B, H, T, T]
    cache = module.apply(variables, 2, 12, encoded, method="init_cache")
    step = jax.jit(lambda tokens, cache: module.apply(variables, decoder_input_ids=tokens, cache=cache,
                                                      method="decode", output_attentions=True))
    for t in range(9):
        out = step(decoder_ids[:, t:t + 1], cache)
        cache = out.cache
        for layer, weights in enumerate(out.attentions):  # [B, H, 1, 12]
            np.testing.assert_allclose(weights[:, :, 0, :t + 1], full[layer][:, :, t, :t + 1], atol=1e-6)
            np.testing.assert_array_equal(weights[:, :, 0, t + 1:], 0.0)


@pytest.mark.parametrize("time_major", [False, True])
def test_reorder_gathers_self_attention_only(time_major):
    config = BlenderbotSmallConfig(**TINY)
    cache = KVCache.empty(config, 3, 4, time_major=time_major)
    values = jnp.arange(cache.entries.size, dtype=jnp.float32).reshape(cache.entries.shape)
    cross = jnp.ones((2, 3, 5, 4, 8))
    cache = cache.replace(entries=values, cross_key=cross, cross_value=cross)
    moved = cache.reorder(jnp.asarray([2, 2, 0]))
    for layer in range(2):
        for got, expected in zip(moved.history(layer, 4), cache.history(layer, 4)):
            np.testing.assert_array_equal(got, expected[jnp.asarray([2, 2, 0])])
    assert moved.cross_key is cache.cross_key


@pytest.mark.parametrize("time_major", [False, True])
def test_history_reads_what_was_written(time_major):
    config = BlenderbotSmallConfig(**TINY)
    rng = np.random.default_rng(4)
    cache = KVCache.empty(config, 3, 6, time_major=time_major).tracking_origins()
    written = [rng.normal(size=(2, 2, 3, 1, 4, 8)).astype(np.float32) for _ in range(4)]  # [K/V, L, B, 1, H, Dh]
    rows = jnp.asarray([1, 1, 0])
    for step, new in enumerate(written):
        cache = cache.write(jnp.asarray(new[0]), jnp.asarray(new[1]))
        if step == 1:
            cache = cache.reorder(rows)
    for layer in range(2):
        keys, values = cache.history(layer, 4)  # [B, 4, D]
        by_position = cache.history_by_position(layer)  # [K, B, D]
        np.testing.assert_array_equal(by_position[0][:4], np.swapaxes(keys, 0, 1))
        for row in range(3):
            source = int(rows[row])
            expected = [written[t][:, layer, source if t < 2 else row, 0].reshape(2, -1) for t in range(4)]
            np.testing.assert_array_equal(keys[row], np.stack([e[0] for e in expected]))
            np.testing.assert_array_equal(values[row], np.stack([e[1] for e in expected]))


def test_reorder_through_origins_equals_moving_the_buffers(seq2seq, plan):
    """Beam search's cache keeps entries in place and follows `origins`; decoding must see the same history
    as with the buffers physically gathered, in the windowed one-token path and the multi-token path."""
    module, variables = plan.decoding_module(seq2seq.module), {"params": seq2seq.params}
    rng = np.random.default_rng(5)
    encoded = jnp.asarray(rng.normal(size=(3, 4, 32)), jnp.float32)
    step = jax.jit(lambda tokens, cache: module.apply(variables, decoder_input_ids=tokens, cache=cache,
                                                      method="decode"))
    moved = plan_cache(plan, module.apply(variables, 3, 12, encoded, method="init_cache"))
    tracked = moved.tracking_origins()
    for t in range(7):
        tokens = jnp.asarray(rng.integers(3, 101, (3, 1)), jnp.int32)
        out_moved, out_tracked = step(tokens, moved), step(tokens, tracked)
        np.testing.assert_array_equal(out_tracked.last_hidden_state, out_moved.last_hidden_state)
        rows = jnp.asarray(rng.integers(0, 3, 3), jnp.int32)
        moved, tracked = out_moved.cache.reorder(rows), out_tracked.cache.reorder(rows)
        assert tracked.entries is out_tracked.cache.entries  # only the origins moved
    for layer in range(2):
        for got, expected in zip(tracked.history(layer, 7), moved.history(layer, 7)):
            np.testing.assert_array_equal(got, expected)
    tokens = jnp.asarray(rng.integers(3, 101, (3, 2)), jnp.int32)  # two tokens: the full-buffer path
    np.testing.assert_allclose(step(tokens, tracked).last_hidden_state, step(tokens, moved).last_hidden_state,
                               atol=1e-6, rtol=1e-6)


def test_cross_entries_shared_by_groups_of_rows_equal_one_per_row(seq2seq, plan):
    """Generation keeps one cross-attention entry per batch element for all its beams."""
    module, variables = plan.decoding_module(seq2seq.module), {"params": seq2seq.params}
    rng = np.random.default_rng(6)
    encoded = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    mask = jnp.asarray([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    shared = module.apply(variables, 2, 8, encoded, mask, method="init_cache")
    shared = plan_cache(plan, KVCache.empty(seq2seq.config, 6, 8)).replace(  # 3 rows per batch element
        cross_key=shared.cross_key, cross_value=shared.cross_value, encoder_mask=shared.encoder_mask)
    per_row = shared.replace(cross_key=jnp.repeat(shared.cross_key, 3, axis=1),
                             cross_value=jnp.repeat(shared.cross_value, 3, axis=1),
                             encoder_mask=jnp.repeat(shared.encoder_mask, 3, axis=0))
    step = jax.jit(lambda tokens, cache: module.apply(variables, decoder_input_ids=tokens, cache=cache,
                                                      method="decode", output_attentions=True))
    for length in (2, 1, 1):  # a prefill (the batched product), then one-token steps
        tokens = jnp.asarray(rng.integers(3, 101, (6, length)), jnp.int32)
        ours, reference = step(tokens, shared), step(tokens, per_row)
        np.testing.assert_allclose(ours.last_hidden_state, reference.last_hidden_state, atol=1e-6, rtol=1e-6)
        for got, expected in zip(ours.cross_attentions, reference.cross_attentions):
            np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(ours.cross_attentions[0])[3:, :, :, 3:], 0.0)  # padding
        shared, per_row = ours.cache, reference.cache


def test_lengths_in_one_bucket_do_not_recompile(seq2seq):
    rng = np.random.default_rng(2)
    kwargs = dict(num_beams=2, max_new_tokens=6, no_repeat_ngram_size=2)
    seq2seq.generate(rng.integers(3, 101, (3, 5)), **kwargs)
    with CompilationCounter() as compiled:
        for batch, length in ((4, 9), (3, 16), (4, 12), (3, 11)):
            ids = rng.integers(3, 101, (batch, length))
            mask = np.ones_like(ids)
            mask[0, length // 2:] = 0
            seq2seq.generate(ids, attention_mask=mask, min_length=length % 5, length_penalty=0.5 + length / 10,
                             **kwargs)
    assert compiled.count == 0  # batch bucket 4, source bucket 16: one program
    with CompilationCounter() as compiled:
        seq2seq.generate(rng.integers(3, 101, (3, 17)), **kwargs)  # the next source bucket compiles once
    assert compiled.count == 1


def test_padding_to_a_bucket_does_not_change_results(seq2seq):
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 101, (3, 6))
    kwargs = dict(num_beams=2, max_new_tokens=6, no_repeat_ngram_size=2)
    together = np.asarray(seq2seq.generate(ids, **kwargs))
    for row in range(3):
        alone = np.asarray(seq2seq.generate(ids[row:row + 1], **kwargs))
        np.testing.assert_array_equal(alone[0], together[row, :alone.shape[1]])
        assert (together[row, alone.shape[1]:] == 2).all()  # beam search pads with EOS when pad_token_id is 0
