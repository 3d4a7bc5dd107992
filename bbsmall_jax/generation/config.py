"""GenerationConfig: decoding settings, read from and written to HF `generation_config.json`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

from bbsmall_jax.jsonfiles import read_json_object, write_json_file
from bbsmall_jax.nn.config import BlenderbotSmallConfig

TokenIds = Union[int, tuple, None]

# transformers' global defaults, applied to whatever neither the model nor the caller set.
GLOBAL_DEFAULTS = dict(
    max_length=20, min_length=0, do_sample=False, early_stopping=False, num_beams=1, temperature=1.0, top_k=50,
    top_p=1.0, repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0, num_return_sequences=1, output_scores=False, return_dict_in_generate=False,
    use_cache=True)

# Generation options transformers has that this implementation does not, with the default that leaves
# generation unchanged (transformers 4.x writes these into generation_config.json; 5.x leaves them None).
# Any other value is an error.
UNSUPPORTED = dict(
    typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, min_p=None, top_h=None, diversity_penalty=0.0,
    num_beam_groups=1, penalty_alpha=None, constraints=None, force_words_ids=None, sequence_bias=None,
    suppress_tokens=None, begin_suppress_tokens=None, encoder_repetition_penalty=1.0, guidance_scale=None,
    exponential_decay_length_penalty=None, renormalize_logits=False, remove_invalid_values=False,
    prompt_lookup_num_tokens=None, max_time=None, stop_strings=None, watermarking_config=None, dola_layers=None,
    output_attentions=False, output_hidden_states=False, output_logits=None, low_memory=None, token_healing=False)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The decoding settings `generate` understands, with HF names; None means "not set".

    Unset values fall back to the model's generation config, then to transformers' global defaults
    (`GLOBAL_DEFAULTS`). Keys of a `generation_config.json` that are not fields are kept in `extra`
    and written back unchanged.
    """

    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_length: Optional[int] = None
    min_new_tokens: Optional[int] = None
    early_stopping: Union[bool, str, None] = None
    do_sample: Optional[bool] = None
    num_beams: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    length_penalty: Optional[float] = None
    no_repeat_ngram_size: Optional[int] = None
    encoder_no_repeat_ngram_size: Optional[int] = None
    bad_words_ids: Optional[tuple] = None
    num_return_sequences: Optional[int] = None
    output_scores: Optional[bool] = None
    return_dict_in_generate: Optional[bool] = None
    use_cache: Optional[bool] = None
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: TokenIds = None
    bos_token_id: Optional[int] = None
    eos_token_id: TokenIds = None
    pad_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(getattr(self, name), list):  # tuples keep the config hashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.bad_words_ids, list):
            object.__setattr__(self, "bad_words_ids", tuple(tuple(w) if isinstance(w, list) else w
                                                            for w in self.bad_words_ids))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def update(self, other: "GenerationConfig") -> "GenerationConfig":
        """A copy where every field `other` sets overrides this one's."""
        changes = {k: getattr(other, k) for k in self.field_names() if getattr(other, k) is not None}
        return self.replace(**changes, extra={**self.extra, **other.extra})

    def with_defaults(self) -> "GenerationConfig":
        """A copy with transformers' global defaults for every unset field that has one."""
        return self.replace(**{k: v for k, v in GLOBAL_DEFAULTS.items() if getattr(self, k) is None})

    # ---- HF generation_config.json ----

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Build from a `generation_config.json` dict; unknown keys go to `extra`."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The `generation_config.json` dict: every set field plus `extra`."""
        out: dict[str, Any] = dict(self.extra)
        for name in self.field_names():
            value = getattr(self, name)
            if value is None:
                continue
            if name == "bad_words_ids":
                value = [list(w) for w in value]
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_model_config(cls, config: BlenderbotSmallConfig) -> "GenerationConfig":
        """The defaults a checkpoint without `generation_config.json` implies (as transformers derives them).

        Token ids come from the config's fields; legacy generation keys of `config.json` (the real
        checkpoint has `num_beams`, `min_length`, `max_length`, `length_penalty`,
        `no_repeat_ngram_size`, ...) live in `config.extra`.
        """
        names = set(cls.field_names())
        values = {k: v for k, v in config.extra.items() if k in names and v is not None}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                     "forced_eos_token_id"):
            if getattr(config, name) is not None:
                values[name] = getattr(config, name)
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GenerationConfig":
        """Read a `generation_config.json`; a malformed file raises naming the file."""
        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GenerationConfig":
        """Read `generation_config.json` from a directory (or the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, "generation_config.json")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `generation_config.json` into `directory`; returns its path."""
        return write_json_file(directory, "generation_config.json", self.to_dict())
