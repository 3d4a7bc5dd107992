"""Loading a chat model by name (or the embedded demo) and turning dialogue contexts into replies."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bbsmall_jax.errors import UsageError
from bbsmall_jax.generation.config import GLOBAL_DEFAULTS, GenerationConfig
from bbsmall_jax.pretrained import BlenderbotSmallForConditionalGeneration
from bbsmall_jax.runtime.models import model_directory
from bbsmall_jax.runtime.scoring import TokenLogProbs, reply_token_log_probs
from bbsmall_jax.startup_cache import cache_dir as compilation_cache_dir
from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer


def enable_compilation_cache(directory: Optional[str] = None) -> str:
    """Persist XLA compilations on disk so a second run skips compiling (`BBSMALL_CACHE_DIR` overrides)."""
    import jax

    directory = compilation_cache_dir(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small programs too: a warm start compiles none
    return directory


def load_chat_model(name: Optional[str] = None, dtype: str = "auto", decode_path: Optional[str] = None):
    """(model, tokenizer) from a local directory, a hub id, or the embedded demo model (`name` None or "demo");
    `dtype` "auto" computes in bfloat16 on GPU/TPU and float32 on the CPU; the model decodes on `decode_path`
    (None: the backend's own)."""
    import jax

    from bbsmall_jax.runtime.precision import compute_dtype

    dtype = compute_dtype(dtype, jax.default_backend())
    directory = model_directory(name)
    if not os.path.isfile(os.path.join(directory, "vocab.json")):
        raise FileNotFoundError(f"{name or directory} has no tokenizer files (vocab.json, merges.txt)")
    model = BlenderbotSmallForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    model.decode_path = decode_path
    return model, BlenderbotSmallTokenizer.from_pretrained(directory)


@dataclass(frozen=True)
class Reply:
    """One generated reply: its text, its tokens and why it ended."""

    text: str
    token_ids: tuple[int, ...]  # generated tokens: the start token and padding dropped, the final EOS kept
    finish_reason: str  # "stop" (the model ended it) or "length" (it reached the length limit)
    log_probs: Optional[TokenLogProbs] = None  # of `token_ids`, when asked for (`Responder.with_log_probs`)


class Responder:
    """Replies to dialogue contexts: format and left-truncate the turns, generate, decode."""

    def __init__(self, model, tokenizer, generation_kwargs: Optional[dict] = None,
                 max_context_tokens: Optional[int] = None, turn_separator: str = "\n"):
        self.model, self.tokenizer = model, tokenizer
        self.generation_kwargs = dict(generation_kwargs or {})
        tokenless = sorted(set(range(model.config.vocab_size)) - set(tokenizer.get_vocab().values()))
        if tokenless:  # a model vocabulary padded past the tokenizer's: never generate what cannot be decoded
            self.generation_kwargs["bad_words_ids"] = [*map(list, self.generation_kwargs.get("bad_words_ids") or []),
                                                       *([i] for i in tokenless)]
        limit = model.config.max_position_embeddings
        if max_context_tokens is not None and (isinstance(max_context_tokens, bool) or not isinstance(
                max_context_tokens, int) or not 1 <= max_context_tokens <= limit):
            raise UsageError(f"the context limit (--max-context, max_context_tokens) must be an integer in "
                             f"[1, {limit}], the model's positions; got {max_context_tokens!r}")
        self.max_context_tokens = limit if max_context_tokens is None else max_context_tokens
        self.turn_separator = turn_separator

    def settings(self) -> dict:
        """What the replies depend on, as JSON data: the weights file, the config, dtype, generation and context."""
        model, source = self.model, getattr(self.model, "_loaded_from", None)
        config = model.config.identity().encode()
        raw = {"model": source and os.path.realpath(source), "config_sha256": hashlib.sha256(config).hexdigest(),
               "dtype": str(np.dtype(model.dtype)), "generation": self.generation_kwargs,
               "max_context_tokens": self.max_context_tokens, "turn_separator": self.turn_separator}
        return json.loads(json.dumps(raw, sort_keys=True, default=lambda value: np.asarray(value).tolist()))

    def context_ids(self, turns: Sequence[str]) -> list[int]:
        """Token ids of a context, oldest turns dropped to fit the model."""
        return self.tokenizer.encode_conversation(list(turns), max_length=self.max_context_tokens,
                                                  turn_separator=self.turn_separator)

    def reply_ids(self, contexts: Sequence[list[int]], **overrides) -> list[list[int]]:
        """Generate for a batch of id contexts (right-padded here; `generate` buckets the shapes)."""
        width = max(1, max(len(ids) for ids in contexts))
        input_ids = np.full((len(contexts), width), self.tokenizer.pad_token_id, np.int32)
        attention_mask = np.zeros_like(input_ids)
        for row, ids in enumerate(contexts):
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        output = self.model.generate(input_ids, attention_mask=attention_mask,
                                     **{**self.generation_kwargs, **overrides})
        sequences = np.asarray(getattr(output, "sequences", output))
        return [list(row) for row in sequences]

    def decode(self, ids: list[int]) -> str:
        """Readable reply text (special tokens dropped, "don ' t" -> "don't")."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).strip()

    def reply(self, contexts: Sequence[Sequence[str]], **overrides) -> list[str]:
        """Replies to a batch of contexts, each a list of turns (oldest first)."""
        ids = [self.context_ids(turns) for turns in contexts]
        return [self.decode(row) for row in self.reply_ids(ids, **overrides)]

    def max_reply_length(self, **overrides) -> int:
        """The `max_length` a call with these overrides decodes to (start token included), as `generate`
        resolves it for the encoder-decoder: max_new_tokens + 1, else max_length, else the global default + 1."""
        settings = {**self.generation_kwargs, **overrides}
        names = set(GenerationConfig.field_names())
        cfg = self.model.generation_config.replace(**{k: v for k, v in settings.items() if k in names})
        if cfg.max_new_tokens is not None:
            return cfg.max_new_tokens + 1
        if cfg.max_length is None:
            return min(GLOBAL_DEFAULTS["max_length"] + 1, self.model.config.max_position_embeddings)
        return cfg.max_length

    def _eos_ids(self, **overrides) -> set[int]:
        """The ids that end a reply under these settings."""
        value = {**self.generation_kwargs, **overrides}.get("eos_token_id", self.model.generation_config.eos_token_id)
        if value is None:
            value = self.model.config.eos_token_id
        return set(value) if isinstance(value, (list, tuple)) else {value}

    def finished_reply(self, row: Sequence[int], max_length: int, eos_ids: set[int]) -> Reply:
        """A Reply from one generated row [start, tokens..., EOS, padding...] decoded to `max_length`."""
        generated = [int(t) for t in row[1:max_length]]
        end = next((i for i, token in enumerate(generated) if token in eos_ids), None)
        if end is not None:
            generated = generated[:end + 1]
        limited = end is None or end + 2 >= max_length  # EOS at the last position is the forced one
        return Reply(self.decode(generated), tuple(generated), "length" if limited else "stop")

    def replies(self, contexts: Sequence[list[int]], **overrides) -> list[list[Reply]]:
        """Replies to a batch of id contexts in one `generate` call: for each context its
        `num_return_sequences` replies (one for greedy search), with token ids and finish reasons."""
        rows = self.finished_replies(self.reply_ids(contexts, **overrides), **overrides)
        per_context = len(rows) // max(len(contexts), 1)
        return [rows[i * per_context:(i + 1) * per_context] for i in range(len(contexts))]

    def finished_replies(self, rows: Sequence[Sequence[int]], **overrides) -> list[Reply]:
        """Replies from generated rows [start, tokens..., EOS, ...] decoded with these settings."""
        max_length, eos_ids = self.max_reply_length(**overrides), self._eos_ids(**overrides)
        return [self.finished_reply(row, max_length, eos_ids) for row in rows]

    def with_log_probs(self, contexts: Sequence[list[int]], replies: Sequence[Reply]) -> list[Reply]:
        """`replies[i]` (to the id context `contexts[i]`) with the model's log-probability of each of its tokens
        and of the most likely alternatives (`runtime.scoring.reply_token_log_probs`), in one call."""
        scored = reply_token_log_probs(self.model, list(contexts), [list(reply.token_ids) for reply in replies])
        return [dataclasses.replace(reply, log_probs=log_probs) for reply, log_probs in zip(replies, scored)]
