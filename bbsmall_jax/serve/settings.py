"""Generation settings of a request: the server's defaults, overridden by the request's OpenAI fields."""

from __future__ import annotations

import dataclasses
from typing import Optional

from bbsmall_jax.generation.config import GenerationConfig
from bbsmall_jax.serve.schemas import ApiError, ChatCompletionRequest


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one `generate` call of a batch shares (hashable: part of the batching key)."""

    do_sample: bool
    num_beams: int
    temperature: Optional[float]  # sampling only
    top_p: Optional[float]  # sampling only
    max_length: int  # reply tokens + the decoder start token
    num_return_sequences: int  # rows generated per conversation
    seed: Optional[int]  # sampling only: a seeded request is generated alone, so the seed reproduces it
    min_length: Optional[int] = None  # None: the model's; set only to lower it to a shorter max_length

    @property
    def batchable(self) -> bool:
        """Whether other conversations may share this request's call (not for seeded sampling)."""
        return not (self.do_sample and self.seed is not None)

    def generate_kwargs(self) -> dict:
        """The `generate` keyword arguments that override the server's defaults (prng_key added by the caller)."""
        kwargs = dict(do_sample=self.do_sample, num_beams=self.num_beams, max_length=self.max_length,
                      num_return_sequences=self.num_return_sequences)
        if self.min_length is not None:
            kwargs.update(min_length=self.min_length)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The server's generation defaults (flags over the model's generation config) and its limits."""

    do_sample: bool
    num_beams: int
    temperature: float
    top_p: float
    max_length: int
    max_positions: int  # the decoder's positions: max_tokens + 1 may not exceed it
    min_length: int = 0  # the model's min_length (counting the decoder start token)
    strict_max_tokens: bool = False  # a max_tokens over the model's limit is a 400 rather than capped to it

    @classmethod
    def resolve(cls, generation_config: GenerationConfig, flag_kwargs: dict, max_length: int,
                max_positions: int, strict_max_tokens: bool = False) -> "Defaults":
        """Concrete defaults from the model's config and the flags' `generate` kwargs."""
        names = set(GenerationConfig.field_names())
        cfg = generation_config.replace(**{k: v for k, v in flag_kwargs.items() if k in names}).with_defaults()
        return cls(bool(cfg.do_sample), int(cfg.num_beams), float(cfg.temperature), float(cfg.top_p),
                   int(max_length), int(max_positions), int(cfg.min_length), strict_max_tokens)

    @property
    def max_tokens_limit(self) -> int:
        """The largest `max_tokens` a request may ask for."""
        return self.max_positions - 1

    def min_length_within(self, max_length: int) -> Optional[int]:
        """The min_length a reply of `max_length` gets: None (the model's) unless that is longer."""
        return max_length if self.min_length > max_length else None

    def default_settings(self) -> Settings:
        """The settings of a request that sets none of max_tokens, temperature, top_p, n, seed."""
        min_length = self.min_length_within(self.max_length)
        if self.do_sample:
            return Settings(True, 1, self.temperature, self.top_p, self.max_length, 1, None, min_length)
        return Settings(False, self.num_beams, None, None, self.max_length, 1, None, min_length)

    def for_request(self, request: ChatCompletionRequest) -> tuple[Settings, int]:
        """(Settings, copies) for a request; `copies` > 1 repeats a deterministic reply for `n` choices."""
        n = request.n or 1
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            if self.strict_max_tokens:
                param = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"
                raise ApiError(400, f"Invalid value for '{param}': {max_tokens} is more than this model's limit of "
                               f"{self.max_tokens_limit} tokens", param, "invalid_value")
            max_tokens = self.max_tokens_limit  # capped: a reply that reaches it finishes with "length"
        max_length = self.max_length if max_tokens is None else max_tokens + 1
        min_length = self.min_length_within(max_length)  # max_tokens caps the reply, min_length or not
        greedy = request.temperature == 0 or request.top_p == 0
        sampled = not greedy and (request.temperature is not None or request.top_p is not None)
        do_sample = False if greedy else (True if sampled else self.do_sample)
        num_beams = 1 if greedy or sampled else self.num_beams
        if do_sample:
            temperature = self.temperature if request.temperature is None else float(request.temperature)
            top_p = self.top_p if request.top_p is None else float(request.top_p)
            return Settings(True, 1, temperature, top_p, max_length, n, request.seed, min_length), 1
        if num_beams > 1:
            if n > num_beams:
                raise ApiError(400, f"Invalid value for 'n': {n} is more than the {num_beams} beams this server "
                               "searches (ask for sampling with a temperature for more)", "n", "invalid_value")
            return Settings(False, num_beams, None, None, max_length, n, None, min_length), 1
        return Settings(False, 1, None, None, max_length, 1, None, min_length), n
