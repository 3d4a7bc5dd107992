"""Test setup: JAX on the CPU, and the fixtures several test modules share (helpers: `bbsmall_jax.testing`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny, so compiling dominates their time: XLA's backend compiles without LLVM's
# optimizations (test_generation and test_cache from a cold cache: 219 s instead of 302 s). Subprocesses
# inherit the flag; results agree with transformers within the same tolerances.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bbsmall_jax.generation.generate import GenerationMixin  # noqa: E402

PROMPT_LENGTHS = [9, 5, 3, 7]


@pytest.fixture(params=["portable", "cpu"])
def decode_path(request, monkeypatch):
    """Run the test on each decoding path: every model whose own `decode_path` is unset decodes on it."""
    monkeypatch.setattr(GenerationMixin, "decode_path", request.param)
    return request.param


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers reference, ours) for the same random tiny encoder-decoder."""
    from bbsmall_jax import BlenderbotSmallForConditionalGeneration
    from bbsmall_jax.testing.reference_models import generation_reference

    directory = tmp_path_factory.mktemp("seq2seq")
    hf = generation_reference("seq2seq_lm", directory, seed=0)
    return hf, BlenderbotSmallForConditionalGeneration.from_pretrained(directory)


@pytest.fixture(scope="module")
def prompts():
    """A right-padded batch of 4 prompts of `PROMPT_LENGTHS` (pad_token_id 0) and its mask."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 101, (4, max(PROMPT_LENGTHS)))
    mask = (np.arange(ids.shape[1])[None] < np.asarray(PROMPT_LENGTHS)[:, None]).astype(np.int64)
    return ids * mask, mask


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random-weight tiny chat model with a vocabulary trained on chitchat utterances."""
    import chitchat_dataset

    import bbsmall_jax as bb
    from bbsmall_jax.text.vocab_training import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_chat")
    texts = [m["text"] for conv in list(chitchat_dataset.Dataset().values())[:300]
             for turn in conv["messages"] for m in turn]
    tokenizer = train_tokenizer(texts, 400, directory)
    config = bb.BlenderbotSmallConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=1,
                                      decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                      scale_embedding=True)
    model = bb.BlenderbotSmallForConditionalGeneration(config, seed=3)
    # Random weights: make special tokens unlikely so replies decode to non-empty text.
    model.params["final_logits_bias"] = model.params["final_logits_bias"].at[:4].set(-20.0)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def responder(model_dir):
    """A greedy, 8-token `Responder` over `model_dir`."""
    from bbsmall_jax.runtime.responder import Responder, load_chat_model

    model, tokenizer = load_chat_model(model_dir)
    return Responder(model, tokenizer, dict(num_beams=1, max_length=8, min_length=0))
