"""Checkpoint conversion: every weights format, strict coverage, and clear errors on bad checkpoints and inputs."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import bbsmall_jax as bb
from bbsmall_jax.checkpoint.names import flax_to_hf, hf_to_flax
from bbsmall_jax.nn.model import build_module, param_shapes
from bbsmall_jax.testing.reference_models import random_hf_model, save_hf_model, to_torch

IDS = np.array([[5, 17, 33, 8, 2], [9, 10, 2, 0, 0]])
DECODER = np.array([[1, 4, 5], [1, 7, 2]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = random_hf_model("seq2seq_lm", scale_embedding=False)
    save_hf_model(model, directory)
    with torch.no_grad():
        logits = model(input_ids=to_torch(IDS), decoder_input_ids=to_torch(DECODER)).logits.numpy()
    return directory, model, logits


def our_logits(model):
    return np.asarray(model(input_ids=IDS, decoder_input_ids=DECODER).logits)


def copy_config(src, dst):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        (dst / "config.json").write_text(f.read())


def test_pytorch_bin_loads_through_torch(hf_dir, tmp_path):
    directory, model, expected = hf_dir
    copy_config(directory, tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # with every tied copy, like old exports
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    assert np.abs(our_logits(ours) - expected).max() <= 1e-4


def test_old_transformers_flax_msgpack_loads(hf_dir, tmp_path):
    """transformers 4.x Flax exports: {"model": {..., "layers": {"0": ...}}, "final_logits_bias": [1, V]}."""
    from flax.serialization import msgpack_serialize

    directory, model, expected = hf_dir
    copy_config(directory, tmp_path)
    tree: dict = {}
    for name, tensor in model.state_dict().items():
        if name in ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
            continue
        *modules, leaf = name.split(".")
        value = tensor.numpy()
        if leaf == "weight":
            if modules[-1] in ("shared", "embed_positions"):
                leaf = "embedding"
            elif "norm" in modules[-1]:
                leaf = "scale"
            else:
                leaf, value = "kernel", value.T
        node = tree
        for key in modules:
            node = node.setdefault(key, {})
        node[leaf] = value
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    assert np.abs(our_logits(ours) - expected).max() <= 1e-4


def test_sharded_safetensors_load(hf_dir, tmp_path):
    directory, _, expected = hf_dir
    copy_config(directory, tmp_path)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    assert np.abs(our_logits(ours) - expected).max() <= 1e-4


def test_tied_weights_written_once(hf_dir, tmp_path):
    directory, _, _ = hf_dir
    bb.BlenderbotSmallForConditionalGeneration.from_pretrained(directory).save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.shared.weight" in names
    assert not names & {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}


def test_conversion_round_trip_is_exact(hf_dir):
    directory, _, _ = hf_dir
    config = bb.BlenderbotSmallConfig.from_pretrained(directory)
    state = load_file(os.path.join(directory, "model.safetensors"))
    back = flax_to_hf(hf_to_flax(state, config, "seq2seq_lm", param_shapes(build_module(config, "seq2seq_lm"))), config, "seq2seq_lm")
    assert set(back) == set(state)
    for name in state:
        assert np.array_equal(back[name], state[name]), name


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("model.encoder.layers.1.fc2.bias"), "missing tensor encoder.layers.1.fc2.bias"),
    (lambda s: s.update({"model.encoder.layers.7.fc1.weight": np.zeros((4, 4), np.float32)}),
     "unexpected tensor encoder.layers.7.fc1.weight"),
    (lambda s: s.update({"model.decoder.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}),
     "decoder.layers.0.self_attn.q_proj.weight has shape"),
])
def test_bad_checkpoints_raise_naming_the_tensor(hf_dir, damage, message):
    directory, _, _ = hf_dir
    config = bb.BlenderbotSmallConfig.from_pretrained(directory)
    state = load_file(os.path.join(directory, "model.safetensors"))
    damage(state)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        hf_to_flax(state, config, "seq2seq_lm", param_shapes(build_module(config, "seq2seq_lm")))


def _damaged_copy(directory, target, name, change):
    """A copy of the checkpoint in `directory` with tensor `name` changed by `change`."""
    copy_config(directory, target)
    state = load_file(os.path.join(directory, "model.safetensors"))
    state[name] = change(state[name].copy())
    save_file(state, os.path.join(target, "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda w: (w.__setitem__((3, 5), np.nan), w)[1], r"holds 1 NaN or infinite values \(the first at index \(3, 5\)\)"),
    (lambda w: np.full_like(w, np.inf), r"holds 2048 NaN or infinite values \(the first at index \(0, 0\)\)"),
    (lambda w: w.astype(np.int64), r"has dtype int64, expected a floating-point type"),
])
def test_unusable_weight_values_are_refused_naming_the_tensor(hf_dir, tmp_path, change, message):
    directory, _, _ = hf_dir
    name = "model.decoder.layers.1.fc1.weight"  # [64, 32]
    _damaged_copy(directory, tmp_path, name, change)
    with pytest.raises(ValueError, match=r"model\.safetensors: checkpoint cannot be loaded as a seq2seq_lm model of this config: tensor "
                                         r"decoder\.layers\.1\.fc1\.weight " + message):
        bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)


def test_malformed_weights_file_and_missing_files(hf_dir, tmp_path):
    directory, _, _ = hf_dir
    copy_config(directory, tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        bb.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path)


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch"):
        bb.BlenderbotSmallForConditionalGeneration.from_pretrained("nobody-here/no-such-model-xyz")


def test_seq2seq_checkpoint_loads_as_causal_lm_and_bare_model(hf_dir):
    directory, model, _ = hf_dir
    causal = bb.BlenderbotSmallForCausalLM.from_pretrained(directory)
    assert np.array_equal(causal.params["shared"]["embedding"], model.model.shared.weight.detach().numpy())
    bare = bb.BlenderbotSmallModel.from_pretrained(directory)
    assert "final_logits_bias" not in bare.params


@pytest.fixture(scope="module")
def tiny_model(hf_dir):
    return bb.BlenderbotSmallForConditionalGeneration.from_pretrained(hf_dir[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=[[5, 101, 2]], decoder_input_ids=[[1]]), "input_ids holds id 101"),
    (dict(input_ids=[[5, -1, 2]], decoder_input_ids=[[1]]), "input_ids holds id -1"),
    (dict(input_ids=[[5, 6]], decoder_input_ids=[[1, 500]]), "decoder_input_ids holds id 500"),
    (dict(input_ids=[[5, 6]], decoder_input_ids=[[1, 4]], labels=[[4, 200]]), "labels holds id 200"),
    (dict(input_ids=np.ones((1, 65), int), decoder_input_ids=[[1]]), "max_position_embeddings=64"),
    (dict(input_ids=[[5, 6]], decoder_input_ids=np.ones((1, 65), int)), "decoder_input_ids has length 65"),
    (dict(input_ids=[[5, 6]], attention_mask=[[1, 1, 1]], decoder_input_ids=[[1]]), "attention_mask has shape"),
    (dict(input_ids=[[5, 6]], decoder_input_ids=[[1, 2]], decoder_attention_mask=[[1]]),
     "decoder_attention_mask has shape"),
    (dict(input_ids=[[5, 6]], inputs_embeds=np.zeros((1, 2, 32)), decoder_input_ids=[[1]]), "not both"),
    (dict(input_ids=[[5, 6]]), "pass decoder_input_ids or decoder_inputs_embeds"),
    (dict(input_ids=[[5.5, 6]], decoder_input_ids=[[1]]), "integer"),
    (dict(inputs_embeds=np.full((1, 2, 32), np.nan), decoder_input_ids=[[1]]), "NaN"),
    (dict(input_ids=[[5, 6]], decoder_input_ids=[[1]], train=True), "dropout_rng"),
    (dict(input_ids=np.zeros((0, 3), int), decoder_input_ids=np.zeros((0, 1), int)),
     "input_ids has batch size 0: pass at least one sequence"),
    (dict(inputs_embeds=np.zeros((0, 3, 32)), decoder_input_ids=[[1]]), "inputs_embeds has batch size 0"),
    (dict(input_ids=[[5, 6]], decoder_inputs_embeds=np.zeros((0, 1, 32))), "decoder_inputs_embeds has batch size 0"),
    (dict(encoder_outputs=(np.zeros((0, 3, 32)),), decoder_input_ids=np.zeros((0, 1), int)),
     "encoder_outputs.last_hidden_state has batch size 0"),
])
def test_bad_inputs_raise_clear_errors(tiny_model, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_model(**kwargs)


def test_causal_lm_bad_inputs(hf_dir):
    causal = bb.BlenderbotSmallForCausalLM.from_pretrained(hf_dir[0])
    with pytest.raises(ValueError, match="input_ids has batch size 0"):
        causal(input_ids=np.zeros((0, 2), int))
    with pytest.raises(ValueError, match="encoder_attention_mask was given without"):
        causal(input_ids=[[1, 2]], encoder_attention_mask=[[1]])
    with pytest.raises(ValueError, match="input_ids holds id 999"):
        causal(input_ids=[[1, 999]])
