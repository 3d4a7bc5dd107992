"""`generate` against transformers on random-weight models: identical tokens, configs, sampling, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bbsmall_jax import BlenderbotSmallForCausalLM, BlenderbotSmallForConditionalGeneration, GenerationConfig
from bbsmall_jax.compilations import CompilationCounter
from bbsmall_jax.testing.reference_models import assert_same, generation_reference, random_hf_model, save_hf_model, to_torch

both_paths = pytest.mark.usefixtures("decode_path")  # a test that decodes runs on both decoding paths

CASES = [
    dict(max_length=20),
    dict(max_length=24, no_repeat_ngram_size=3, min_length=12, forced_eos_token_id=None),
    dict(num_beams=4, max_length=20),
    dict(num_beams=4, max_length=20, num_return_sequences=4, length_penalty=-0.7, min_length=6),
    dict(num_beams=4, max_length=24, no_repeat_ngram_size=3, min_length=8, length_penalty=0.65,
         num_return_sequences=2, early_stopping=True),
    dict(num_beams=4, max_length=20, early_stopping="never", length_penalty=1.5, forced_eos_token_id=None),
    dict(num_beams=10, max_length=28, no_repeat_ngram_size=3, min_length=20, length_penalty=0.65),
    dict(num_beams=10, max_length=28, no_repeat_ngram_size=3, min_length=5, length_penalty=2.0,
         num_return_sequences=3),
]


@both_paths
@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_tokens_identical_to_transformers(models, prompts, kwargs):
    hf, ours = models
    assert_same(hf, ours, *prompts, **kwargs)


def test_checkpoint_defaults_from_config_json(tmp_path):
    hf = random_hf_model(seed=5, init_std=0.3)
    legacy = dict(num_beams=10, min_length=20, max_length=128, length_penalty=0.65, no_repeat_ngram_size=3)
    save_hf_model(hf, tmp_path)
    (tmp_path / "generation_config.json").unlink()
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, **legacy}))
    ours = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    cfg = ours.generation_config
    assert {k: getattr(cfg, k) for k in legacy} == legacy
    assert cfg.forced_eos_token_id == 2 and cfg.decoder_start_token_id == 1 and cfg.pad_token_id == 0


def test_generation_config_round_trips_with_transformers(tmp_path):
    ours = GenerationConfig(num_beams=4, length_penalty=0.65, early_stopping="never", eos_token_id=[2, 3],
                            bad_words_ids=[[5], [6, 7]], max_new_tokens=9)
    ours.save_pretrained(tmp_path)
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.num_beams, theirs.length_penalty, theirs.early_stopping, theirs.eos_token_id) == \
        (4, 0.65, "never", [2, 3])
    theirs.save_pretrained(tmp_path / "back")
    again = GenerationConfig.from_pretrained(tmp_path / "back")
    assert again == ours
    assert "transformers_version" in again.extra


def test_save_and_load_keep_the_generation_config(models, tmp_path):
    _, ours = models
    ours.generation_config = ours.generation_config.replace(num_beams=3, min_length=4)
    try:
        ours.save_pretrained(tmp_path)
        loaded = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
        assert loaded.generation_config.num_beams == 3 and loaded.generation_config.min_length == 4
        hf_cfg = transformers.GenerationConfig.from_pretrained(tmp_path)
        assert hf_cfg.num_beams == 3
    finally:
        ours.generation_config = None


@both_paths
def test_generation_config_argument_and_kwargs_override_defaults(models, prompts):
    hf, ours = models
    ids, mask = prompts
    cfg = GenerationConfig(num_beams=4, max_length=20)
    with torch.no_grad():
        ref = hf.generate(to_torch(ids), attention_mask=to_torch(mask),
                          generation_config=transformers.GenerationConfig(num_beams=4, max_length=20),
                          num_return_sequences=2).numpy()
    got = np.asarray(ours.generate(ids, attention_mask=mask, generation_config=cfg, num_return_sequences=2))
    np.testing.assert_array_equal(got, ref)


@both_paths
def test_scores_match_transformers(models, prompts):
    hf, ours = models
    ids, mask = prompts
    for kwargs in (dict(max_length=20), dict(num_beams=4, max_length=20)):
        with torch.no_grad():
            ref = hf.generate(to_torch(ids), attention_mask=to_torch(mask), output_scores=True,
                              return_dict_in_generate=True, **kwargs)
        got = ours.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kwargs)
        np.testing.assert_array_equal(np.asarray(got.sequences), ref.sequences.numpy())
        assert len(got.scores) == len(ref.scores)
        for mine, theirs in zip(got.scores, ref.scores):
            theirs = theirs.numpy()
            np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs))
            finite = np.isfinite(theirs)
            np.testing.assert_allclose(np.asarray(mine)[finite], theirs[finite], atol=2e-4, rtol=1e-4)
        if "num_beams" in kwargs:
            np.testing.assert_allclose(got.sequences_scores, ref.sequences_scores.numpy(), atol=1e-4)


@both_paths
def test_params_argument_generates_with_those_weights(models, prompts, tmp_path):
    """The decoding copies of the weights are kept between calls; other params must not reuse them."""
    hf, ours = models
    other_hf = generation_reference("seq2seq_lm", tmp_path, seed=5)
    other = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = prompts
    kwargs = dict(num_beams=4, max_length=16)
    assert_same(hf, ours, ids, mask, **kwargs)
    with torch.no_grad():
        expected = other_hf.generate(to_torch(ids), attention_mask=to_torch(mask), **kwargs).numpy()
    got = np.asarray(ours.generate(ids, attention_mask=mask, params=other.params, **kwargs))
    np.testing.assert_array_equal(got, expected)
    assert_same(hf, ours, ids, mask, **kwargs)


@both_paths
def test_decoder_only_generation_matches_transformers(tmp_path):
    hf = generation_reference("decoder_only", tmp_path, seed=2)
    ours = BlenderbotSmallForCausalLM.from_pretrained(tmp_path)
    rng = np.random.default_rng(4)
    lengths = np.asarray([6, 4, 2])
    mask = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int64)  # left-padded, as transformers expects
    ids = rng.integers(3, 101, (3, 6)) * mask
    assert_same(hf, ours, ids, mask, max_new_tokens=10, no_repeat_ngram_size=2, repetition_penalty=1.3)
    assert_same(hf, ours, ids, mask, num_beams=3, max_length=16, num_return_sequences=2,
                encoder_no_repeat_ngram_size=2, bad_words_ids=[[5], [20, 21]])


SAMPLING = dict(max_length=24, no_repeat_ngram_size=3, forced_eos_token_id=None)  # the compiled greedy case 2


@both_paths
def test_sampling_top_k_1_is_greedy(models, prompts):
    _, ours = models
    greedy = np.asarray(ours.generate(*prompts, **SAMPLING))
    one = np.asarray(ours.generate(*prompts, do_sample=True, top_k=1, prng_key=jax.random.PRNGKey(3), **SAMPLING))
    np.testing.assert_array_equal(one, greedy)  # top_k=1 leaves only the argmax


@both_paths
def test_sampling_is_reproducible_and_restricted_to_the_top_k(models, prompts):
    _, ours = models

    def sample(seed, **kwargs):
        return ours.generate(*prompts, do_sample=True, top_k=3, num_return_sequences=2, output_scores=True,
                             return_dict_in_generate=True, prng_key=jax.random.PRNGKey(seed), **SAMPLING, **kwargs)

    first, again, other = sample(7), sample(7), sample(8, temperature=0.5)
    np.testing.assert_array_equal(first.sequences, again.sequences)
    assert first.sequences.shape[0] == 8 and not np.array_equal(first.sequences, other.sequences)
    for out in (first, other):
        sequences = np.asarray(out.sequences)
        for step, scores in enumerate(out.scores):
            kept = np.isfinite(np.asarray(scores))
            assert (kept.sum(-1) <= 3).all()
            chosen = sequences[:, step + 1]
            alive = chosen != 0  # finished rows are padded
            assert kept[np.arange(len(chosen)), chosen][alive].all()


@both_paths
def test_bf16_compute_generates(tmp_path, prompts):
    hf = random_hf_model(seed=6, init_std=0.3)
    save_hf_model(hf, tmp_path)
    model = BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    out = np.asarray(model.generate(*prompts, num_beams=2, max_length=10))
    assert out.shape[0] == 4 and out.shape[1] <= 10 and (out[:, 0] == 1).all()
    assert ((0 <= out) & (out < 101)).all()


BAD = [
    (dict(num_beams=0), "num_beams"),
    (dict(max_length=65), "max_position_embeddings"),
    (dict(max_new_tokens=70), "max_position_embeddings"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_id=101), "eos_token_id"),
    (dict(typical_p=0.5), "typical_p"),
    (dict(renormalize_logits=True), "renormalize_logits=True is not supported"),
    (dict(output_attentions=True), "output_attentions=True is not supported"),
    (dict(max_length=10, min_length=11), r"min_length \(11\) is larger than max_length \(10\)"),
    (dict(max_new_tokens=3, min_length=10), r"min_length \(10\) is larger than max_length \(4\)"),
    (dict(max_new_tokens=3, min_new_tokens=4), r"min_length \(5\) is larger than max_length \(4\)"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_settings_raise_before_compiling(models, prompts, kwargs, message):
    _, ours = models
    with CompilationCounter() as compiled, pytest.raises(ValueError, match=message):
        ours.generate(*prompts, **kwargs)
    assert compiled.count == 0


def test_unsupported_options_are_neutral_only_at_their_transformers_default():
    from bbsmall_jax.generation.prepare import neutral

    for option, value in [("renormalize_logits", False), ("typical_p", 1.0), ("typical_p", 1), ("num_beam_groups", 1),
                          ("epsilon_cutoff", 0), ("diversity_penalty", 0.0), ("min_p", None), ("token_healing", False)]:
        assert neutral(value, option), (option, value)
    for option, value in [("renormalize_logits", True), ("renormalize_logits", 0), ("typical_p", True),
                          ("num_beam_groups", True), ("epsilon_cutoff", False), ("typical_p", 0.0),
                          ("min_p", 0.0), ("suppress_tokens", []), ("output_attentions", 1)]:
        assert not neutral(value, option), (option, value)
    assert neutral(None) and not neutral(False)  # without the option's name only None is known to change nothing


@both_paths
def test_unsupported_options_as_keywords_are_neutral_at_their_default(models, prompts):
    hf, ours = models
    assert_same(hf, ours, *prompts, max_length=8, typical_p=1.0, renormalize_logits=False)
    with pytest.raises(ValueError, match="renormalize_logits=True is not supported"):
        ours.generate(*prompts, max_length=8, renormalize_logits=True)


@both_paths
def test_unsupported_option_in_a_generation_config_file(models, prompts):
    _, ours = models
    neutral = GenerationConfig.from_dict({"max_length": 6, "renormalize_logits": False, "typical_p": 1.0,
                                          "num_beam_groups": 1, "output_hidden_states": False})
    assert ours.generate(*prompts, generation_config=neutral).shape[1] <= 6
    with pytest.raises(ValueError, match="renormalize_logits=True is not supported"):
        ours.generate(*prompts, generation_config=GenerationConfig.from_dict({"renormalize_logits": True}))


def test_bad_inputs_raise(models):
    _, ours = models
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours.generate([[5, 6]], no_such_option=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate([[5, 600]])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(np.ones((1, 65), np.int64))


def test_empty_batch(models):
    _, ours = models
    with CompilationCounter() as compiled:
        out = ours.generate(np.zeros((0, 5), np.int64), num_beams=4)
    assert out.shape == (0, 1)
    assert compiled.count == 0
