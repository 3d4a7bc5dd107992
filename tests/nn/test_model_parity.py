"""Parity of all three heads with transformers' PyTorch classes on random-weight models (float32, 1e-4)."""

import math

import numpy as np
import pytest
import torch

import bbsmall_jax as bb
from bbsmall_jax.testing.reference_models import (random_hf_model, save_hf_model, scale_reference_decoder_embeddings,
                                                  to_torch)
from bbsmall_jax.testing.shapes import FULL_90M

ATOL = 1e-4

# Right-padded batch of different lengths; decoder inputs right-padded too.
INPUT_IDS = np.array([[5, 17, 33, 8, 41, 2], [9, 10, 2, 0, 0, 0], [60, 61, 62, 63, 2, 0]])
DECODER_IDS = np.array([[1, 4, 5, 90, 2], [1, 7, 2, 0, 0], [1, 11, 12, 13, 14]])
LABELS = np.array([[4, 5, 90, 2, -100], [7, 2, -100, -100, -100], [11, 12, 13, 14, 2]])

OURS = {"seq2seq": bb.BlenderbotSmallModel, "seq2seq_lm": bb.BlenderbotSmallForConditionalGeneration,
        "decoder_only": bb.BlenderbotSmallForCausalLM}


def mask_of(ids):
    return (ids != 0).astype(np.int64)


def max_diff(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref.detach().double().numpy()).max())


def load_pair(tmp_path, head, **overrides):
    """(reference, ours) with the same random weights, the reference patched to scale decoder embeddings."""
    reference = random_hf_model(head, **overrides)
    directory = save_hf_model(reference, tmp_path / head)
    scale_reference_decoder_embeddings(reference)
    return reference, OURS[head].from_pretrained(directory)


def assert_all_close(ours_tuple, ref_tuple, what):
    assert len(ours_tuple) == len(ref_tuple), what
    for i, (a, b) in enumerate(zip(ours_tuple, ref_tuple)):
        assert max_diff(a, b) <= ATOL, f"{what}[{i}]"


@pytest.mark.parametrize("scale_embedding", [True, False])
def test_conditional_generation_logits_loss_hidden_states_attentions(tmp_path, scale_embedding):
    reference, ours = load_pair(tmp_path, "seq2seq_lm", scale_embedding=scale_embedding)
    assert np.abs(np.asarray(ours.params["final_logits_bias"])).max() > 0.1
    out = ours(input_ids=INPUT_IDS, attention_mask=mask_of(INPUT_IDS), decoder_input_ids=DECODER_IDS,
               decoder_attention_mask=mask_of(DECODER_IDS), labels=LABELS, output_hidden_states=True,
               output_attentions=True)
    with torch.no_grad():
        ref = reference(input_ids=to_torch(INPUT_IDS), attention_mask=to_torch(mask_of(INPUT_IDS)),
                        decoder_input_ids=to_torch(DECODER_IDS), decoder_attention_mask=to_torch(mask_of(DECODER_IDS)),
                        labels=to_torch(LABELS), output_hidden_states=True, output_attentions=True)
    assert max_diff(out.logits, ref.logits) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL
    assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) <= ATOL
    assert_all_close(out.encoder_hidden_states, ref.encoder_hidden_states, "encoder_hidden_states")
    assert_all_close(out.decoder_hidden_states, ref.decoder_hidden_states, "decoder_hidden_states")
    assert_all_close(out.encoder_attentions, ref.encoder_attentions, "encoder_attentions")
    assert_all_close(out.decoder_attentions, ref.decoder_attentions, "decoder_attentions")
    assert_all_close(out.cross_attentions, ref.cross_attentions, "cross_attentions")


def test_labels_only_builds_decoder_inputs_with_shift_tokens_right(tmp_path):
    reference, ours = load_pair(tmp_path, "seq2seq_lm")
    out = ours(input_ids=INPUT_IDS, attention_mask=mask_of(INPUT_IDS), labels=LABELS)
    with torch.no_grad():
        ref = reference(input_ids=to_torch(INPUT_IDS), attention_mask=to_torch(mask_of(INPUT_IDS)),
                        labels=to_torch(LABELS))
    assert max_diff(out.logits, ref.logits) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


def test_bare_model_outputs(tmp_path):
    reference, ours = load_pair(tmp_path, "seq2seq")
    out = ours(input_ids=INPUT_IDS, attention_mask=mask_of(INPUT_IDS), decoder_input_ids=DECODER_IDS,
               output_hidden_states=True)
    with torch.no_grad():
        ref = reference(input_ids=to_torch(INPUT_IDS), attention_mask=to_torch(mask_of(INPUT_IDS)),
                        decoder_input_ids=to_torch(DECODER_IDS), output_hidden_states=True)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= ATOL
    assert max_diff(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) <= ATOL
    assert_all_close(out.decoder_hidden_states, ref.decoder_hidden_states, "decoder_hidden_states")


def test_causal_lm_with_and_without_encoder_states_logits_to_keep_and_labels(tmp_path):
    reference, ours = load_pair(tmp_path, "decoder_only")
    ids, mask = DECODER_IDS, mask_of(DECODER_IDS)
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    encoder_states = np.random.default_rng(0).normal(size=(3, 6, 32)).astype(np.float32)
    encoder_mask = mask_of(INPUT_IDS)
    with torch.no_grad():
        ref_plain = reference(input_ids=to_torch(ids), attention_mask=to_torch(mask), labels=to_torch(labels),
                              output_attentions=True)
        ref_cross = reference(input_ids=to_torch(ids), attention_mask=to_torch(mask),
                              encoder_hidden_states=to_torch(encoder_states, torch.float32),
                              encoder_attention_mask=to_torch(encoder_mask), output_attentions=True)
        ref_last = reference(input_ids=to_torch(ids), attention_mask=to_torch(mask), logits_to_keep=2)
    plain = ours(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    assert max_diff(plain.logits, ref_plain.logits) <= ATOL
    assert abs(float(plain.loss) - float(ref_plain.loss)) <= ATOL
    assert plain.cross_attentions is None
    cross = ours(input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder_states,
                 encoder_attention_mask=encoder_mask, output_attentions=True)
    assert max_diff(cross.logits, ref_cross.logits) <= ATOL
    assert_all_close(cross.cross_attentions, ref_cross.cross_attentions, "cross_attentions")
    last = ours(input_ids=ids, attention_mask=mask, logits_to_keep=2)
    assert last.logits.shape == (3, 2, 101)
    assert max_diff(last.logits, ref_last.logits) <= ATOL


def test_inputs_embeds_and_precomputed_encoder_outputs(tmp_path):
    reference, ours = load_pair(tmp_path, "seq2seq_lm")
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(3, 6, 32)).astype(np.float32)
    decoder_embeds = rng.normal(size=(3, 5, 32)).astype(np.float32)
    with torch.no_grad():  # the patch scales the reference's decoder ids only; embeddings passed in are ours to scale
        ref = reference(inputs_embeds=to_torch(embeds, torch.float32), attention_mask=to_torch(mask_of(INPUT_IDS)),
                        decoder_inputs_embeds=to_torch(decoder_embeds * math.sqrt(32), torch.float32))
    out = ours(inputs_embeds=embeds, attention_mask=mask_of(INPUT_IDS), decoder_inputs_embeds=decoder_embeds)
    assert max_diff(out.logits, ref.logits) <= ATOL
    again = ours(encoder_outputs=(np.asarray(out.encoder_last_hidden_state),), attention_mask=mask_of(INPUT_IDS),
                 decoder_inputs_embeds=decoder_embeds)
    assert max_diff(again.logits, ref.logits) <= ATOL


@pytest.mark.parametrize("head", ["seq2seq_lm", "decoder_only"])
@pytest.mark.parametrize("scale_decoder_embedding", [True, False])
def test_decoder_embeddings_passed_in_are_scaled_as_transformers_4_52_or_5(tmp_path, head, scale_decoder_embedding):
    """transformers 4.46-4.52 multiply the decoder's input by sqrt(d_model) after choosing between ids and
    embeddings, so embeddings passed in are scaled too; 5.x never scales them. The reference is an
    unpatched 5.x model, given the embeddings times sqrt(d_model) to stand for 4.52."""
    reference = random_hf_model(head)  # default initialisation: embeddings of std 0.02, as trained ones are small
    directory = save_hf_model(reference, tmp_path / head)
    config = bb.BlenderbotSmallConfig.from_pretrained(directory).replace(scale_decoder_embedding=scale_decoder_embedding)
    ours = OURS[head].from_pretrained(directory, config=config)
    embeds = np.asarray(ours.params["shared"]["embedding"])[DECODER_IDS]  # what embed_tokens(ids) gives
    scaled = embeds * math.sqrt(32)
    name = "decoder_inputs_embeds" if head == "seq2seq_lm" else "inputs_embeds"
    common = dict(input_ids=INPUT_IDS, attention_mask=mask_of(INPUT_IDS)) if head == "seq2seq_lm" else {}
    out = ours(**common, **{name: embeds}).logits
    with torch.no_grad():
        as_4_52, as_5 = (reference(**{k: to_torch(v) for k, v in common.items()},
                                   **{name: to_torch(e, torch.float32)}).logits for e in (scaled, embeds))
    expected, other = (as_4_52, as_5) if scale_decoder_embedding else (as_5, as_4_52)
    assert max_diff(out, expected) <= ATOL
    assert max_diff(out, other) > 3 * ATOL  # the two semantics differ by more than the tolerance: it can fail
    by_ids = ours(**common, **{name.replace("inputs_embeds", "input_ids"): DECODER_IDS}).logits
    assert max_diff(by_ids, expected) <= ATOL  # embed_tokens(ids) passed in gives what the ids give


def test_transformers_5_numerics_without_decoder_scale(tmp_path):
    """`scale_decoder_embedding=False` reproduces unpatched transformers >= 4.53 exactly."""
    reference = random_hf_model("seq2seq_lm")
    directory = save_hf_model(reference, tmp_path / "m")
    config = bb.BlenderbotSmallConfig.from_pretrained(directory).replace(scale_decoder_embedding=False)
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory, config=config)
    with torch.no_grad():
        ref = reference(input_ids=to_torch(INPUT_IDS), decoder_input_ids=to_torch(DECODER_IDS))
    assert max_diff(ours(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits, ref.logits) <= ATOL
    default = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
    assert max_diff(default(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits, ref.logits) > 1e-3


def test_round_trip_through_our_save_pretrained(tmp_path):
    reference = random_hf_model("seq2seq_lm")
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(save_hf_model(reference, tmp_path / "hf"))
    ours.save_pretrained(tmp_path / "ours")
    import transformers

    reloaded = transformers.BlenderbotSmallForConditionalGeneration.from_pretrained(
        tmp_path / "ours", attn_implementation="eager").eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    with torch.no_grad():
        a = reference(input_ids=to_torch(INPUT_IDS), decoder_input_ids=to_torch(DECODER_IDS)).logits
        b = reloaded(input_ids=to_torch(INPUT_IDS), decoder_input_ids=to_torch(DECODER_IDS)).logits
    assert torch.equal(a, b)
    saved = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert np.array_equal(saved(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits,
                          ours(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits)


@pytest.mark.parametrize("head", ["seq2seq", "decoder_only"])
def test_round_trip_other_heads(tmp_path, head):
    import transformers

    reference = random_hf_model(head)
    ours = OURS[head].from_pretrained(save_hf_model(reference, tmp_path / "hf"))
    ours.save_pretrained(tmp_path / "ours")
    cls = type(reference)
    reloaded = cls.from_pretrained(tmp_path / "ours")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert isinstance(reloaded, cls) and transformers.AutoConfig.from_pretrained(tmp_path / "ours").vocab_size == 101


def test_bf16_compute_close_to_float32(tmp_path):
    reference = random_hf_model("seq2seq_lm")
    directory = save_hf_model(reference, tmp_path / "m")
    f32 = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
    bf16 = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory, dtype="bfloat16")
    a = np.asarray(f32(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits)
    b = np.asarray(bf16(input_ids=INPUT_IDS, decoder_input_ids=DECODER_IDS).logits)
    assert b.dtype == np.float32  # logits stay float32
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_full_90m_shape_parity(tmp_path):
    reference = random_hf_model("seq2seq_lm", **FULL_90M)
    directory = save_hf_model(reference, tmp_path / "m")
    scale_reference_decoder_embeddings(reference)
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
    ids = np.array([[5, 17, 33, 8, 41, 2, 0, 0], [900, 54000, 7, 2, 0, 0, 0, 0]])
    decoder = np.array([[1, 4, 5, 90], [1, 54943, 3, 0]])
    out = ours(input_ids=ids, attention_mask=mask_of(ids), decoder_input_ids=decoder,
               decoder_attention_mask=mask_of(decoder), labels=np.where(decoder == 0, -100, decoder))
    with torch.no_grad():
        ref = reference(input_ids=to_torch(ids), attention_mask=to_torch(mask_of(ids)),
                        decoder_input_ids=to_torch(decoder), decoder_attention_mask=to_torch(mask_of(decoder)),
                        labels=to_torch(np.where(decoder == 0, -100, decoder)))
    assert out.logits.shape == (2, 4, 54944)
    assert max_diff(out.logits, ref.logits) <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL
