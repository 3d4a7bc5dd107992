"""Test setup: JAX on the CPU, and the fixtures several test modules share (helpers: `bbsmall_jax.testing`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bbsmall_jax.generation.plan import PATH_VARIABLE  # noqa: E402

PROMPT_LENGTHS = [9, 5, 3, 7]


@pytest.fixture(params=["portable", "cpu"])
def decode_path(request, monkeypatch):
    """Run the test on each decoding path (`BBSMALL_DECODE_PATH`)."""
    monkeypatch.setenv(PATH_VARIABLE, request.param)
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
