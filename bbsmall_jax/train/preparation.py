"""Run setup: the model config, the tokenizer and tokenized datasets of a run, and the final export."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from bbsmall_jax.atomic import atomic_directory, write_atomic
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.runtime.coordination import say
from bbsmall_jax.runtime.examples import TokenizedExamples, tokenize_examples
from bbsmall_jax.train import corpus as corpus_lib, data as data_lib
from bbsmall_jax.train.config import ConfigError, TrainConfig


@dataclasses.dataclass
class Datasets:
    """Tokenized training and validation examples plus the tokenizer that made them (None: synthetic data).
    A sharded corpus's training examples are a stream, read and tokenized as training goes."""

    train: TokenizedExamples | corpus_lib.ShardedCorpus
    # A sharded corpus's: a function reading them, then (`read_validation_ahead`) a Future
    valid: TokenizedExamples | Callable[[], TokenizedExamples] | concurrent.futures.Future
    tokenizer: Any = None

    def read_validation_ahead(self) -> None:
        """Start reading the validation examples in a background thread, if they are still to be read."""
        if callable(self.valid):
            reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="validation-reader")
            self.valid = reader.submit(self.valid)
            reader.shutdown(wait=False)

    def validation(self) -> TokenizedExamples:
        """The validation examples (read now, or waited for, if they are not yet)."""
        self.read_validation_ahead()
        return self.valid.result() if isinstance(self.valid, concurrent.futures.Future) else self.valid


def model_config_of(cfg: TrainConfig) -> BlenderbotSmallConfig:
    """`init`'s config.json (a local directory, or a hub id from the cache or the hub) or the defaults, with
    `cfg.model` applied."""
    return cfg.model_config(None if cfg.init is None else BlenderbotSmallConfig.from_pretrained(cfg.init))


def build_model_config(cfg: TrainConfig, output_dir: str, resuming: bool) -> BlenderbotSmallConfig:
    """The model config: `init`'s config.json (or the defaults) with `cfg.model` applied.

    It is kept in OUTPUT/model_config.json, so that resuming needs neither the hub nor `init`.
    """
    path = os.path.join(output_dir, "model_config.json")
    if resuming and os.path.isfile(path):
        return BlenderbotSmallConfig.from_json_file(path)
    config = model_config_of(cfg)
    if jax.process_index() == 0:
        write_atomic(path, json.dumps(config.to_dict(), indent=2, sort_keys=True))
    return config


def prepare_datasets(cfg: TrainConfig, output_dir: str, resuming: bool,
                     model_config: BlenderbotSmallConfig) -> Datasets:
    """Load examples, get the tokenizer (saved under OUTPUT/tokenizer, reused on resume), tokenize. A sharded
    corpus (`corpus.py`) is not read here: its training set is this process's stream of its shards."""
    if corpus_lib.is_sharded(cfg.data):
        train_examples = None
        train_shards, read_valid = corpus_lib.split_shards(cfg.data, cfg.valid_data)
    else:
        train_examples, valid_examples = data_lib.load_examples(
            cfg.data, None, 0.0 if cfg.valid_data else cfg.valid_fraction, cfg.seed)
        if cfg.valid_data:
            valid_examples = corpus_lib.read_examples(cfg.valid_data)
    tokenizer = _tokenizer(cfg, output_dir, resuming, model_config, train_examples)
    tokenize = lambda examples: tokenize_examples(
        examples, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.separator, cfg.add_end)
    if train_examples is None:
        train = corpus_lib.ShardedCorpus(train_shards, jax.process_index(), jax.process_count(), cfg.seed, tokenize)
        return Datasets(train, lambda: tokenize(read_valid()), tokenizer)
    return Datasets(tokenize(train_examples), tokenize(valid_examples), tokenizer)


def _tokenizer(cfg: TrainConfig, output_dir: str, resuming: bool, model_config: BlenderbotSmallConfig,
               train_examples: Optional[list]):
    """The run's tokenizer: OUTPUT/tokenizer on resume, else `tokenizer` or `init`'s, else one trained on the
    training examples; saved to OUTPUT/tokenizer."""
    from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
    from bbsmall_jax.text.vocab_training import train_tokenizer

    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    if resuming and os.path.isdir(tokenizer_dir):
        tokenizer = BlenderbotSmallTokenizer.from_pretrained(tokenizer_dir)
    else:
        if cfg.tokenizer or cfg.init:
            tokenizer = BlenderbotSmallTokenizer.from_pretrained(cfg.tokenizer or cfg.init)
        elif train_examples is None:
            raise ConfigError(f"data {cfg.data} is a sharded corpus, read as training goes: give `tokenizer` (or "
                              "`init`) rather than training a vocabulary on it")
        else:
            texts = sorted({t for ex in train_examples for t in (*ex.context, ex.response)})
            order = np.random.default_rng(cfg.seed).permutation(len(texts))[:cfg.tokenizer_train_texts]
            say(f"training a {model_config.vocab_size}-token vocabulary on {len(order)} utterances")
            tokenizer = train_tokenizer([texts[i] for i in sorted(order)], model_config.vocab_size)
        if jax.process_index() == 0:
            with atomic_directory(tokenizer_dir) as tmp:
                tokenizer.save_pretrained(tmp)
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}")
    return tokenizer


def export(directory: str, model_config: BlenderbotSmallConfig, host_params: dict, tokenizer) -> str:
    """Write the final model (`save_pretrained`, HF format) and tokenizer, atomically (tmp dir + rename)."""
    from bbsmall_jax.pretrained import BlenderbotSmallForConditionalGeneration

    with atomic_directory(directory) as tmp:
        BlenderbotSmallForConditionalGeneration(model_config, host_params).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory
