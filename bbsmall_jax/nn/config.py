"""BlenderbotSmallConfig: the frozen model configuration, read from and written to HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Union

from bbsmall_jax.errors import UsageError, UsageTypeError
from bbsmall_jax.jsonfiles import read_json_object, write_json_file

logger = logging.getLogger(__name__)

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh", "sigmoid")

# Aliases transformers resolves through `attribute_map`.
_ATTRIBUTE_MAP = {
    "num_attention_heads": "encoder_attention_heads",
    "hidden_size": "d_model",
    "num_hidden_layers": "encoder_layers",
}


# Run-time settings transformers' configs carry for every model; kept in `extra` when set.
_RUNTIME_DEFAULTS = {"output_attentions": False, "output_hidden_states": False, "return_dict": True}
# Fields that only seed a model's generation defaults (`GenerationConfig.from_model_config`): settable.
_GENERATION_DEFAULTS = ("bos_token_id", "eos_token_id", "forced_eos_token_id")


@dataclasses.dataclass(init=False, eq=True, unsafe_hash=True)
class BlenderbotSmallConfig:
    """Every parameter of transformers' `BlenderbotSmallConfig`, with the same defaults.

    `scale_decoder_embedding` is ours: True multiplies the decoder's token embeddings by
    `sqrt(d_model)` (when `scale_embedding`) as the checkpoint was trained (ParlAI, transformers
    4.46-4.52 and the 4.x Flax port). transformers >= 4.53 (and 5.x) drop that multiplication; set
    False to reproduce their numbers. Keys of a `config.json` that are not fields (legacy keys of
    the real checkpoint such as `normalize_before`, generation defaults, `id2label`) are kept in
    `extra` and written back unchanged.

    As transformers' configs, it takes unknown keyword arguments (`initializer_range=0.02`) and keeps them
    as attributes, answers to the aliases `hidden_size`, `num_attention_heads` and `num_hidden_layers`, and
    takes run-time settings as attributes (`config.output_hidden_states = True`; with `output_attentions`
    and `return_dict`, they are the defaults of the model's calls). `bos_token_id`, `eos_token_id` and
    `forced_eos_token_id`, read by generation only, can be set too. The other fields fix the model's
    shapes and semantics: they cannot be set on a built config (use `replace`).
    """

    vocab_size: int = 50265
    max_position_embeddings: int = 512
    encoder_layers: int = 8
    encoder_ffn_dim: int = 2048
    encoder_attention_heads: int = 16
    decoder_layers: int = 8
    decoder_ffn_dim: int = 2048
    decoder_attention_heads: int = 16
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    use_cache: bool = True
    is_encoder_decoder: bool = True
    activation_function: str = "gelu"
    d_model: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    decoder_start_token_id: int | None = 1
    scale_embedding: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: Union[int, list[int], None] = 2
    forced_eos_token_id: Union[int, list[int], None] = 2
    is_decoder: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_embedding: bool = True
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __init__(self, *args, **kwargs):
        fields = [f for f in dataclasses.fields(self) if f.name != "extra"]
        if len(args) > len(fields):
            raise UsageTypeError(f"BlenderbotSmallConfig takes at most {len(fields)} positional arguments")
        values = dict(zip((f.name for f in fields), args))
        for name in set(values) & set(kwargs):
            raise UsageTypeError(f"BlenderbotSmallConfig got two values for {name!r}")
        values.update(kwargs)
        extra = dict(values.pop("extra", None) or {})
        for alias, name in _ATTRIBUTE_MAP.items():
            if alias in values:
                values.setdefault(name, values.pop(alias))
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            object.__setattr__(self, f.name, values.pop(f.name, default))
        extra.update(values)  # what is not a field is kept, as transformers keeps it
        object.__setattr__(self, "extra", extra)
        self.__post_init__()

    def __getattr__(self, name: str):  # only asked for what is not a field
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        if name in _ATTRIBUTE_MAP:
            return getattr(self, _ATTRIBUTE_MAP[name])
        if name in _RUNTIME_DEFAULTS:
            return _RUNTIME_DEFAULTS[name]
        raise AttributeError(f"BlenderbotSmallConfig has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _GENERATION_DEFAULTS:  # read by generation only, never by the model's computation
            for token in value if isinstance(value, (list, tuple)) else [value]:
                self._check_token_id(name, token)
            object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)
            return
        if name in _ATTRIBUTE_MAP or name in {f.name for f in dataclasses.fields(self)}:
            raise dataclasses.FrozenInstanceError(
                f"BlenderbotSmallConfig.{_ATTRIBUTE_MAP.get(name, name)} fixes the model's shapes or semantics and "
                f"cannot change on a built config; use config.replace({_ATTRIBUTE_MAP.get(name, name)}=...)")
        self.extra[name] = value

    def __delattr__(self, name: str) -> None:
        if name not in self.extra:
            raise AttributeError(f"BlenderbotSmallConfig has no run-time attribute {name!r} to delete")
        del self.extra[name]

    def __post_init__(self):
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(getattr(self, name), list):  # tuples keep the config hashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("vocab_size", "max_position_embeddings", "encoder_layers", "encoder_ffn_dim",
                     "encoder_attention_heads", "decoder_layers", "decoder_ffn_dim",
                     "decoder_attention_heads", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"BlenderbotSmallConfig.{name} must be a positive integer, got {value!r}")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise UsageError(
                    f"BlenderbotSmallConfig.d_model ({self.d_model}) must be divisible by {name} "
                    f"({getattr(self, name)})")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                     "decoder_layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UsageError(f"BlenderbotSmallConfig.{name} must be in [0, 1), got {value!r}")
        if self.init_std <= 0:
            raise UsageError(f"BlenderbotSmallConfig.init_std must be positive, got {self.init_std!r}")
        if self.activation_function not in ACTIVATIONS:
            raise UsageError(
                f"BlenderbotSmallConfig.activation_function {self.activation_function!r} is not one of "
                f"{', '.join(ACTIVATIONS)}")
        for name in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
            self._check_token_id(name, getattr(self, name))
        for name in ("eos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                self._check_token_id(name, token)

    def _check_token_id(self, name: str, value) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
            raise UsageError(
                f"BlenderbotSmallConfig.{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    @property
    def embed_scale(self) -> float:
        """Multiplier of token embeddings: sqrt(d_model) when `scale_embedding`, else 1."""
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @property
    def decoder_embed_scale(self) -> float:
        """Multiplier of the decoder's token embeddings (see `scale_decoder_embedding`)."""
        return self.embed_scale if self.scale_decoder_embedding else 1.0

    def replace(self, **changes) -> "BlenderbotSmallConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ----

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlenderbotSmallConfig":
        """Build from a `config.json` dict; unknown keys go to `extra`."""
        data = dict(data)
        if not isinstance(data.get("extra", {}), dict):
            data.pop("extra")
        config = cls(**data)
        if config.extra:
            logger.debug("config keys kept but not used by the model: %s", sorted(config.extra))
        return config

    def identity(self) -> str:
        """The config as one canonical JSON string: the key of what is built or compiled from it."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict transformers reads (`extra` keys merged back in)."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            if f.name == "scale_decoder_embedding" and self.scale_decoder_embedding:
                continue  # our own flag: written only when it departs from the checkpoint's semantics
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["model_type"] = "blenderbot-small"
        out.setdefault("architectures", ["BlenderbotSmallForConditionalGeneration"])
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BlenderbotSmallConfig":
        """Read an HF `config.json`; a malformed file raises naming the file."""
        data = read_json_object(path)
        model_type = data.get("model_type")
        if model_type not in (None, "blenderbot-small", "blenderbot_small"):
            raise UsageError(f"{path}: model_type is {model_type!r}, expected 'blenderbot-small'")
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `config.json` into `directory`; returns its path."""
        return write_json_file(directory, "config.json", self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> "BlenderbotSmallConfig":
        """Read `config.json` from a directory, a file or a hub id."""
        from bbsmall_jax.hub import resolve_file

        return cls.from_json_file(resolve_file(path_or_hub_id, "config.json"))
