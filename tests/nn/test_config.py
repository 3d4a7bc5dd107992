"""BlenderbotSmallConfig: defaults equal transformers', the real checkpoint's config.json loads, bad values raise."""

import dataclasses
import json

import pytest
import transformers

from bbsmall_jax import BlenderbotSmallConfig
# The facebook/blenderbot_small-90M config.json, legacy keys and generation defaults included.
REAL_90M_CONFIG = {
    "_num_labels": 3, "activation_dropout": 0.0, "activation_function": "gelu", "add_bias_logits": False,
    "add_final_layer_norm": False, "architectures": ["BlenderbotSmallForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 1, "classif_dropout": 0.0, "d_model": 512,
    "decoder_attention_heads": 16, "decoder_ffn_dim": 2048, "decoder_layerdrop": 0.0, "decoder_layers": 8,
    "decoder_start_token_id": 1, "do_blenderbot_90_layernorm": True, "dropout": 0.1,
    "encoder_attention_heads": 16, "encoder_ffn_dim": 2048, "encoder_layerdrop": 0.0, "encoder_layers": 8,
    "eos_token_id": 2, "extra_pos_embeddings": 0, "force_bos_token_to_be_generated": False,
    "forced_eos_token_id": 2, "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}, "init_std": 0.02,
    "is_encoder_decoder": True, "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    "layernorm_variant": "xlm", "length_penalty": 0.65, "max_length": 128, "max_position_embeddings": 512,
    "min_length": 20, "model_type": "blenderbot-small", "no_repeat_ngram_size": 3, "normalize_before": False,
    "normalize_embedding": True, "num_beams": 10, "num_hidden_layers": 8, "pad_token_id": 0,
    "scale_embedding": True, "static_position_embeddings": False, "unk_token_id": 3, "vocab_size": 54944,
}


def test_defaults_match_transformers():
    ours = BlenderbotSmallConfig()
    reference = transformers.BlenderbotSmallConfig()
    for field in dataclasses.fields(BlenderbotSmallConfig):
        if field.name in ("extra", "scale_decoder_embedding"):
            continue
        assert getattr(ours, field.name) == getattr(reference, field.name), field.name


def test_real_checkpoint_config_loads_and_keeps_legacy_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(REAL_90M_CONFIG))
    config = BlenderbotSmallConfig.from_json_file(path)
    assert (config.vocab_size, config.d_model, config.scale_embedding) == (54944, 512, True)
    assert config.extra["normalize_before"] is False and config.extra["num_beams"] == 10
    assert config.embed_scale == pytest.approx(512 ** 0.5)
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in REAL_90M_CONFIG.items():
        if key == "num_hidden_layers":  # an alias of encoder_layers, which is written
            continue
        assert written[key] == value, key
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").vocab_size == 54944


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=100, encoder_attention_heads=16), "encoder_attention_heads"),
    (dict(decoder_attention_heads=3), "decoder_attention_heads"),
    (dict(encoder_layers=0), "encoder_layers"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(activation_function="gelu_fancy"), "activation_function"),
    (dict(dropout=1.5), "dropout"),
    (dict(pad_token_id=60000), "pad_token_id"),
    (dict(eos_token_id=[2, 99999]), "eos_token_id"),
])
def test_invalid_values_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BlenderbotSmallConfig(**changes)


def test_malformed_and_foreign_config_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        BlenderbotSmallConfig.from_json_file(bad)
    bart = tmp_path / "bart.json"
    bart.write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match="bart"):
        BlenderbotSmallConfig.from_json_file(bart)


def test_transformers_5_flag_round_trips(tmp_path):
    config = BlenderbotSmallConfig(scale_embedding=True, scale_decoder_embedding=False)
    assert config.decoder_embed_scale == 1.0
    config.save_pretrained(tmp_path)
    assert BlenderbotSmallConfig.from_pretrained(tmp_path).scale_decoder_embedding is False
    assert "scale_decoder_embedding" not in BlenderbotSmallConfig().to_dict()
