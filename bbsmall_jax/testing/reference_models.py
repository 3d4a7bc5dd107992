"""Random-weight transformers reference models for parity tests (built in the test, never downloaded)."""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers

from bbsmall_jax.testing.shapes import TINY

HF_CLASSES = {
    "seq2seq": transformers.BlenderbotSmallModel,
    "seq2seq_lm": transformers.BlenderbotSmallForConditionalGeneration,
    "decoder_only": transformers.BlenderbotSmallForCausalLM,
}


class _ScaledEmbedding(torch.nn.Module):
    """The shared embedding times a constant: how the checkpoint (and transformers < 4.53) embeds decoder tokens."""

    def __init__(self, embedding: torch.nn.Embedding, scale: float):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a registered submodule: state_dict keys stay unchanged
        self.scale = scale

    def forward(self, ids):
        return self.embedding(ids) * self.scale


def scale_reference_decoder_embeddings(model) -> None:
    """Make a transformers 5.x model scale its decoder token embeddings as the checkpoint was trained.

    transformers >= 4.53 dropped the multiplication by sqrt(d_model) in the decoder; our default keeps
    it (see DESIGN.md). Patching the reference lets parity tests use `scale_embedding=True`.
    """
    if not model.config.scale_embedding:
        return
    decoder = getattr(model, "model", model).decoder
    if not isinstance(decoder.embed_tokens, _ScaledEmbedding):
        decoder.embed_tokens = _ScaledEmbedding(decoder.embed_tokens, math.sqrt(model.config.d_model))


def random_hf_model(head: str = "seq2seq_lm", seed: int = 0, logits_bias: bool = True, **overrides):
    """A transformers model with random weights (eager attention, eval mode), decoder not yet patched.

    `logits_bias` fills `final_logits_bias` with non-zero values so the LM head's bias is exercised.
    """
    config = transformers.BlenderbotSmallConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = HF_CLASSES[head](config).eval()
    if head == "seq2seq_lm" and logits_bias:
        with torch.no_grad():
            model.final_logits_bias.normal_(0.0, 0.5)
    return model


def save_hf_model(model, directory) -> str:
    """`save_pretrained` the model into `directory`; call it before `scale_reference_decoder_embeddings`."""
    model.save_pretrained(directory)
    return str(directory)


def to_torch(array, dtype=torch.long):
    """numpy/JAX array -> torch tensor."""
    return torch.tensor(np.asarray(array), dtype=dtype)


def generation_reference(head: str, directory, seed: int):
    """A random transformers model whose outputs vary with the input and end at varied lengths, saved to
    `directory` (for ours to load) and then patched to scale its decoder embeddings as the checkpoint does."""
    hf = random_hf_model(head, seed=seed, logits_bias=False, init_std=0.3)
    if head == "seq2seq_lm":
        with torch.no_grad():
            hf.final_logits_bias.normal_(0.0, 0.5)
            hf.final_logits_bias[0, 2] = 3.0  # EOS often competitive: hypotheses finish at varied lengths
    save_hf_model(hf, directory)
    scale_reference_decoder_embeddings(hf)
    return hf


def assert_same(hf, ours, ids, mask, **kwargs) -> np.ndarray:
    """Our `generate` gives exactly transformers' tokens for these inputs and settings; returns them."""
    with torch.no_grad():
        ref = hf.generate(to_torch(ids), attention_mask=to_torch(mask), **kwargs).numpy()
    got = np.asarray(ours.generate(ids, attention_mask=mask, **kwargs))
    assert got.shape == ref.shape, (kwargs, got, ref)
    np.testing.assert_array_equal(got, ref, err_msg=str(kwargs))
    return got
