"""Decoding loops against stub logits with hand-worked expected outputs (t5x style), and the processors vs HF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from bbsmall_jax.generation import cpu_path
from bbsmall_jax.generation import logits_processors as lp
from bbsmall_jax.generation import search as decoding
from bbsmall_jax.generation.plan import PORTABLE
PAD, START, EOS, A, B, C = 0, 1, 2, 3, 4, 5
VOCAB = 6
NEG_INF = -np.inf


def stub_step(table):
    """step_fn whose log-probabilities depend only on the last token: table[last] ([V] log-probs)."""
    table = np.asarray(table, np.float64)
    table = jnp.asarray(np.log(table / table.sum(-1, keepdims=True)), jnp.float32)

    def step_fn(tokens, cache):
        return table[tokens[:, 0]], cache + 1  # the "cache" counts steps
    return step_fn


def search_inputs(batch_rows, max_length, length_penalty=1.0, min_length=0, length=16):
    return decoding.SearchInputs(
        processors=lp.ProcessorInputs(
            max_length=jnp.int32(max_length), min_length=jnp.int32(min_length), repetition_penalty=jnp.float32(1),
            temperature=jnp.float32(1), top_p=jnp.float32(1), prompt_ignore=jnp.zeros(batch_rows, jnp.int32),
            encoder_ids=jnp.zeros((1, 0), jnp.int32), encoder_length=jnp.int32(0)),
        prompt_length=jnp.int32(1), max_length=jnp.int32(max_length),
        length_denominators=jnp.asarray(decoding.length_denominators(length_penalty, length + 1)),
        length_penalty=jnp.float32(length_penalty), valid=jnp.ones(1, bool), rng=jax.random.PRNGKey(0))


def start_sequences(rows, length=16):
    return jnp.full((rows, length), EOS, jnp.int32).at[:, 0].set(START)


# Transition probabilities P(next | last). From START: A 0.5, B 0.4, EOS 0.1. After A: EOS 0.9.
# After B: C 0.9. After C: EOS 0.95.
TABLE = np.full((VOCAB, VOCAB), 1e-6)
TABLE[START, [A, B, EOS]] = [0.5, 0.4, 0.1]
TABLE[A, EOS] = 0.9
TABLE[A, B] = 0.1
TABLE[B, C] = 0.9
TABLE[B, EOS] = 0.1
TABLE[C, EOS] = 0.95
TABLE[C, A] = 0.05
TABLE[EOS, EOS] = 1.0
TABLE[PAD, PAD] = 1.0


def test_greedy_stub_picks_the_argmax_and_stops_at_eos():
    spec = decoding.SearchSpec("greedy", lp.ProcessorSpec(eos_token_ids=(EOS,)), eos_token_ids=(EOS,),
                               pad_token_id=PAD)
    state = decoding.sample(start_sequences(1), search_inputs(1, 8), jnp.int32(0), stub_step(TABLE), spec, VOCAB)
    assert int(state.cur_len) == 3  # START A EOS
    np.testing.assert_array_equal(state.sequences[0, :3], [START, A, EOS])
    assert int(state.cache) == 2


def test_greedy_min_length_blocks_eos_then_pads():
    spec = decoding.SearchSpec("greedy", lp.ProcessorSpec(eos_token_ids=(EOS,)), eos_token_ids=(EOS,),
                               pad_token_id=PAD)
    # min_length 3 bans EOS at lengths 1 and 2: START A B (after A, B is the best non-EOS), then C, EOS
    state = decoding.sample(start_sequences(1), search_inputs(1, 8, min_length=3), jnp.int32(0),
                            stub_step(TABLE), spec, VOCAB)
    np.testing.assert_array_equal(state.sequences[0, :int(state.cur_len)], [START, A, B, C, EOS])


def test_plain_python_loop_steps_the_same_body():
    spec = decoding.SearchSpec("greedy", lp.ProcessorSpec(eos_token_ids=(EOS,)), eos_token_ids=(EOS,),
                               pad_token_id=PAD)
    inputs = search_inputs(1, 8, min_length=3)
    state = decoding.init_sampling_state(start_sequences(1), inputs, jnp.int32(0), spec, VOCAB)
    while decoding.sampling_cond(state):
        state = decoding.sampling_body(state, stub_step(TABLE), spec, inputs)
    np.testing.assert_array_equal(state.sequences[0, :int(state.cur_len)], [START, A, B, C, EOS])


def run_beam(num_beams, max_length, length_penalty=1.0, early_stopping=False, forced_eos=()):
    spec = decoding.SearchSpec("beam", lp.ProcessorSpec(eos_token_ids=(EOS,), forced_eos_token_ids=forced_eos),
                               eos_token_ids=(EOS,), pad_token_id=PAD, num_beams=num_beams,
                               early_stopping=early_stopping)
    inputs = search_inputs(num_beams, max_length, length_penalty)
    return decoding.beam_search(start_sequences(num_beams), inputs, jnp.int32(0), stub_step(TABLE),
                                lambda cache, rows, cur: cache, spec, VOCAB)


def test_beam_stub_hand_worked_scores():
    # Two beams, length_penalty 1, 2K = 4 candidates kept per step.
    # Step 1 (from START): A (.5), B (.4), EOS (.1), ... EOS is 3rd, not in the top K=2: it does not
    #   finish (and cannot live on). Live: A (log .5), B (log .4).
    # Step 2: A EOS (.45) is 1st: finishes with log(.45)/2 = -0.399. B C (.36) and A B (.05) live;
    #   B EOS (.04) is 4th: dropped.
    # Step 3: B C EOS (.342) is 1st: finishes with log(.342)/3 = -0.358, which now ranks first.
    #   Both slots are finished and the best live beam, log(.045)/3 = -1.03, cannot beat -0.399: done.
    state = run_beam(2, 8)
    np.testing.assert_array_equal(state.sequences[0, 0, :4], [START, B, C, EOS])
    np.testing.assert_array_equal(state.sequences[0, 1, :3], [START, A, EOS])
    np.testing.assert_allclose(state.scores[0], [np.log(.342) / 3, np.log(.45) / 2], rtol=1e-4)
    np.testing.assert_array_equal(state.lengths[0], [3, 2])
    assert int(state.cur_len) == 4


def test_beam_length_penalty_zero_prefers_the_most_probable_sequence():
    # length_penalty 0: raw log-probabilities; .45 (A EOS) beats .342 (B C EOS)
    state = run_beam(2, 8, length_penalty=0.0)
    np.testing.assert_array_equal(state.sequences[0, 0, :3], [START, A, EOS])
    np.testing.assert_allclose(state.scores[0, 0], np.log(.45), rtol=1e-4)


def test_beam_max_length_ends_live_beams_and_forced_eos():
    # max_length 2: one step; every candidate hits the length limit; forced EOS makes EOS the only choice
    state = run_beam(2, 2, forced_eos=(EOS,))
    np.testing.assert_array_equal(state.sequences[0, 0, :2], [START, EOS])
    assert int(state.cur_len) == 2
    np.testing.assert_allclose(state.scores[0, 0], 0.0, atol=1e-6)  # log-prob 0 after forcing


def test_beam_early_stopping_true_stops_once_num_beams_finished():
    state = run_beam(1, 8, early_stopping=True)
    # One beam, 2 candidates. Step 1: A (.5), B (.4); nothing finishes; A lives.
    # Step 2: A EOS (.45) is first: it finishes, every slot is full, and early_stopping=True stops.
    np.testing.assert_array_equal(state.sequences[0, 0, :3], [START, A, EOS])
    assert int(state.cur_len) == 3


def hf_apply(processor, ids, scores):
    return processor(torch.tensor(np.asarray(ids), dtype=torch.long), torch.tensor(np.asarray(scores))).numpy()


@pytest.fixture(scope="module")
def random_case():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (4, 9)).astype(np.int32)
    scores = rng.normal(size=(4, 12)).astype(np.float32)
    return ids, scores


@pytest.mark.parametrize("token_mask", [None, lp.compared_token_mask], ids=["scatter", "compare"])
def test_processors_match_transformers(random_case, token_mask):
    ids, scores = random_case
    cur = ids.shape[1]
    padded = np.concatenate([ids, np.zeros((4, 5), np.int32)], axis=1)  # our buffers run past cur_len
    for n in (1, 2, 3):
        np.testing.assert_array_equal(lp.no_repeat_ngram(jnp.asarray(scores), padded, jnp.int32(cur), n, token_mask),
                                      hf_apply(hf.NoRepeatNGramLogitsProcessor(n), ids, scores))
    encoder = np.random.default_rng(1).integers(0, 8, (2, 7)).astype(np.int32)
    for n in (1, 2, 3):
        ours = lp.encoder_no_repeat_ngram(jnp.asarray(scores), padded, jnp.int32(cur), n, encoder, jnp.int32(7),
                                          token_mask)
        ref = hf_apply(hf.EncoderNoRepeatNGramLogitsProcessor(n, torch.tensor(encoder, dtype=torch.long)), ids,
                       scores)
        np.testing.assert_array_equal(ours, ref)
    ours = lp.repetition_penalty(jnp.asarray(scores), padded, jnp.int32(cur), jnp.float32(1.5),
                                 jnp.zeros(4, jnp.int32), token_mask)
    np.testing.assert_allclose(ours, hf_apply(hf.RepetitionPenaltyLogitsProcessor(1.5), ids, scores), rtol=1e-6)
    words = ((7,), (ids[0, -1], 3), (1, 2, 5))
    ours = lp.bad_words(jnp.asarray(scores), padded, jnp.int32(cur), words)
    ref = hf_apply(hf.NoBadWordsLogitsProcessor([list(map(int, w)) for w in words]), ids, scores)
    np.testing.assert_array_equal(ours, ref)


def test_compared_token_mask_bans_what_the_scatter_bans():
    """The portable plan's scatter-free n-gram ban and penalty marks equal the scatter's on random data."""
    rng = np.random.default_rng(2)
    vocab = 50
    sequences = jnp.asarray(rng.integers(0, 6, (8, 40)), jnp.int32)  # few tokens: many repeated n-grams
    scores = jnp.asarray(rng.normal(size=(8, vocab)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab + 3, (8, 17)), jnp.int32)  # ids >= vocab mark nothing
    scattered = jnp.zeros((8, vocab), bool).at[jnp.arange(8)[:, None], ids].set(True, mode="drop")
    np.testing.assert_array_equal(lp.compared_token_mask(ids, vocab), scattered)
    for n in (1, 2, 3, 4):
        for cur in (0, 1, n, 23, 40):
            ours = lp.no_repeat_ngram(scores, sequences, jnp.int32(cur), n, lp.compared_token_mask)
            np.testing.assert_array_equal(ours, lp.no_repeat_ngram(scores, sequences, jnp.int32(cur), n))
    ours = lp.repetition_penalty(scores, sequences, jnp.int32(30), jnp.float32(1.3), jnp.arange(8, dtype=jnp.int32),
                                 lp.compared_token_mask)
    np.testing.assert_array_equal(ours, lp.repetition_penalty(scores, sequences, jnp.int32(30), jnp.float32(1.3),
                                                              jnp.arange(8, dtype=jnp.int32)))


@pytest.mark.parametrize("levels", [None, 3])  # 3 levels: ties everywhere, broken by the flat index
def test_per_beam_top_k_equals_the_flat_top_k(levels):
    rng = np.random.default_rng(8)
    shape = (3, 4, 70)  # [B, K, V]
    scores = rng.normal(size=shape) if levels is None else rng.integers(0, levels, shape).astype(float)
    scores[:, :, ::5] = -np.inf
    scores[1, 2:] = -np.inf  # whole beams out
    scores = jnp.asarray(scores, jnp.float32)
    values, ids = decoding._per_beam_top_k(scores, 8, PORTABLE)
    expected_values, expected_ids = jax.lax.top_k(scores.reshape(3, -1), 8)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(ids, expected_ids)


def test_top_k_and_top_p_restrict_the_support_like_transformers(random_case):
    _, scores = random_case
    for k in (1, 3, 12):
        np.testing.assert_array_equal(lp.top_k(jnp.asarray(scores), k),
                                      hf_apply(hf.TopKLogitsWarper(k), np.zeros((4, 1)), scores))
    for p in (0.05, 0.5, 0.9, 1.0):
        for keep in (1, 3):
            ours = np.asarray(lp.top_p(jnp.asarray(scores), jnp.float32(p), keep))
            ref = hf_apply(hf.TopPLogitsWarper(p, min_tokens_to_keep=keep), np.zeros((4, 1)), scores)
            np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
            assert (np.isfinite(ours).sum(-1) >= keep).all()


@pytest.mark.parametrize("scores", [
    np.random.default_rng(0).normal(size=(5, 100)),
    np.random.default_rng(1).integers(0, 3, (4, 9)),  # ties: the first maximum wins
    np.full((2, 7), -np.inf),
    [[1.0, np.nan, 3.0, np.nan]],  # a NaN counts as the maximum, as in jnp.argmax
])
def test_first_argmax_is_argmax(scores):
    scores = jnp.asarray(scores, jnp.float32)
    np.testing.assert_array_equal(cpu_path.first_argmax(scores), jnp.argmax(scores, axis=-1))


@pytest.mark.parametrize("shape, count, block, levels", [
    ((3, 1000), 20, 32, None),  # 1000 is not a multiple of the block: the padding is never picked
    ((2, 640), 20, 32, 4),  # many ties: lower indices first, as jax.lax.top_k
    ((2, 96), 20, 8, 2),  # ties everywhere
    ((1, 50), 20, 32, None),  # fewer blocks than count: plain top_k
])
def test_blockwise_top_k_is_top_k(shape, count, block, levels):
    rng = np.random.default_rng(7)
    scores = rng.normal(size=shape) if levels is None else rng.integers(0, levels, shape).astype(float)
    scores[:, ::7] = -np.inf  # banned tokens
    scores = jnp.asarray(scores, jnp.float32)
    values, ids = cpu_path.blockwise_top_k(scores, count, block)
    expected_values, expected_ids = jax.lax.top_k(scores, count)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(ids, expected_ids)


def test_blockwise_top_k_breaks_ties_across_blocks_by_index():
    # blocks [1, 5] [1, 0] [9, 1]: the third best is the 1 at index 0, though its block ranks second
    values, ids = cpu_path.blockwise_top_k(jnp.asarray([[1.0, 5.0, 1.0, 0.0, 9.0, 1.0]]), 3, block=2)
    np.testing.assert_array_equal(values, [[9.0, 5.0, 1.0]])
    np.testing.assert_array_equal(ids, [[4, 1, 0]])
