"""TrainConfig: the training run's settings, read from YAML with `key=value` overrides; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Optional

import yaml

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.records import SEPARATORS

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16")
REMAT = ("none", "dots", "full")
# Fields that may change when a run resumes: they do not alter the trajectory of the params.
RESUMABLE_FIELDS = ("max_steps", "save_every", "keep_checkpoints", "log_every", "eval_every",
                    "eval_batches", "progress", "prefetch", "peak_flops", "fsdp", "profile_steps")


class ConfigError(UsageError):
    """A training config that cannot be used; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `model` holds `BlenderbotSmallConfig` fields."""

    # model and initialisation
    model: dict = dataclasses.field(default_factory=dict)  # architecture (from scratch) or overrides of `init`'s
    init: Optional[str] = None  # pretrained directory or hub id; None trains from scratch
    tokenizer: Optional[str] = None  # tokenizer directory; None: `init`'s, or one trained on the training texts
    tokenizer_train_texts: int = 50000  # how many training utterances a new vocabulary is learnt from
    dtype: str = "auto"  # compute dtype: auto (bfloat16 on GPU and TPU, float32 on CPU); params stay float32
    remat: str = "none"  # none | dots (keep matmul outputs, recompute the rest) | full (recompute all)
    # data
    # "chitchat", a JSONL file (read whole), or a sharded corpus streamed as training goes: a directory or glob
    # of .jsonl, .jsonl.gz and .parquet shards (train/corpus.py)
    data: str = "chitchat"
    # JSONL file or sharded corpus; None splits `valid_fraction` of `data` off by conversation (a sharded
    # corpus: holds its last shard out)
    valid_data: Optional[str] = None
    valid_fraction: float = 0.05
    separator: str = "newline"  # how context turns are joined: newline (ParlAI) or end_start (`__end__ __start__`)
    add_end: bool = False  # append `__end__` to each context
    max_source_length: int = 128
    max_target_length: int = 64
    buckets: tuple = ()  # ((source_len, target_len), ...) ascending; () -> derived from the max lengths
    batch_size: int = 32  # examples (rows, with packing) per optimizer step, over all devices and accumulation steps
    packing: bool = False  # several examples per row, masked apart by segment (train/packing.py)
    grad_accum_steps: int = 1
    # optimisation
    learning_rate: float = 1e-4
    schedule: str = "linear"  # linear | cosine | constant decay after warmup
    warmup_steps: int = 0
    decay_steps: int = 0  # length of warmup + decay; 0 -> max_steps
    end_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    seed: int = 0
    # run length, logging, checkpoints
    max_steps: int = 1000
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0  # 0: the whole validation set
    save_every: int = 500
    keep_checkpoints: int = 3
    progress: bool = True
    prefetch: int = 4  # batches prepared ahead in a background thread
    peak_flops: float = 0.0  # one device's peak FLOP/s for the logged MFU; 0: from a table of accelerators
    profile_steps: tuple = ()  # [start, stop]: trace steps start..stop (1-based, inclusive) into tensorboard/
    # sharding
    # shard params and optimizer state over the data axis as well as the batch: true, false, or auto (on
    # GPU and TPU with several devices; leaves too small to be worth a collective stay replicated)
    fsdp: Any = "auto"

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(tuple(b) for b in self.buckets))
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "profile_steps", _profile_steps(self.profile_steps))
        for name, allowed in (("schedule", SCHEDULES), ("dtype", DTYPES), ("remat", REMAT),
                              ("separator", SEPARATORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("max_source_length", "max_target_length", "batch_size", "grad_accum_steps", "max_steps",
                     "log_every", "eval_every", "save_every", "keep_checkpoints", "tokenizer_train_texts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "decay_steps", "eval_batches", "seed", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "adam_eps", "peak_flops"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a finite non-negative number, got {getattr(self, name)!r}")
        for name in ("valid_fraction", "label_smoothing", "adam_b1", "adam_b2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not _is_number(self.end_learning_rate_ratio) or not 0 <= self.end_learning_rate_ratio <= 1:
            raise ConfigError(f"end_learning_rate_ratio must be in [0, 1], got {self.end_learning_rate_ratio!r}")
        for name in ("progress", "add_end", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.fsdp, bool) or self.fsdp == "auto"):
            raise ConfigError(f"fsdp must be true, false or auto, got {self.fsdp!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps "
                              f"({self.grad_accum_steps})")
        if self.decay_steps and self.decay_steps < self.warmup_steps:
            raise ConfigError(f"decay_steps ({self.decay_steps}) is shorter than warmup_steps ({self.warmup_steps})")
        for bucket in self.buckets:
            if len(bucket) != 2 or not all(isinstance(n, int) and n > 0 for n in bucket):
                raise ConfigError(f"buckets: each bucket is [source_len, target_len], got {list(bucket)}")
        if list(self.buckets) != sorted(self.buckets) or len(set(self.buckets)) != len(self.buckets):
            raise ConfigError(f"buckets must be distinct and ascending, got {[list(b) for b in self.buckets]}")
        if self.buckets and self.buckets[-1] != (self.max_source_length, self.max_target_length):
            raise ConfigError(f"the last bucket must be [max_source_length, max_target_length] = "
                              f"[{self.max_source_length}, {self.max_target_length}], got {list(self.buckets[-1])}")
        model_fields = {f.name for f in dataclasses.fields(BlenderbotSmallConfig)} - {"extra"}
        for key in self.model:
            if key not in model_fields:
                raise ConfigError(f"unknown model config key 'model.{key}'")
        if self.init is None:
            self.model_config()  # validates the architecture now, not after the data is loaded

    @property
    def bucket_shapes(self) -> tuple[tuple[int, int], ...]:
        """The (source_len, target_len) batch shapes, ascending."""
        if self.buckets:
            return self.buckets
        s, t = self.max_source_length, self.max_target_length
        shapes = {(max(s // 4, 1), max(t // 4, 1)), (max(s // 2, 1), max(t // 2, 1)), (s, t)}
        return tuple(sorted(shapes))

    def uses_fsdp(self, backend: str, devices: int) -> bool:
        """Whether params and optimizer state are sharded: `fsdp`, with auto resolved for `backend`."""
        if self.fsdp == "auto":
            return backend != "cpu" and devices > 1
        return self.fsdp

    @property
    def total_schedule_steps(self) -> int:
        """Steps over which the learning rate warms up and decays."""
        return self.decay_steps or self.max_steps

    def model_config(self, base: Optional[BlenderbotSmallConfig] = None) -> BlenderbotSmallConfig:
        """The model config: `base` (a pretrained one) or the defaults, with `model` applied."""
        try:
            return (base or BlenderbotSmallConfig()).replace(**self.model)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from err

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON friendly)."""
        out = dataclasses.asdict(self)
        out["buckets"] = [list(b) for b in self.buckets]
        return out

    def trajectory_dict(self) -> dict[str, Any]:
        """The fields that determine the params' trajectory (what a resumed run must share)."""
        out = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}
        out["total_schedule_steps"] = self.total_schedule_steps
        return out

    def fingerprint(self) -> str:
        """A short hash of `trajectory_dict`."""
        blob = json.dumps(self.trajectory_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save_yaml(self, path: str | os.PathLike) -> None:
        """Write the config as YAML (atomically)."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading `1e6` and `3E-4` as floats (YAML 1.1 wants a dot; 1.2 and Python do not)."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _profile_steps(value) -> tuple:
    """`profile_steps` as () or (start, stop) with 1 <= start <= stop; ConfigError otherwise."""
    steps = tuple(value) if isinstance(value, (list, tuple)) else value
    if steps == () or (isinstance(steps, tuple) and len(steps) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in steps) and 1 <= steps[0] <= steps[1]):
        return steps
    raise ConfigError(f"profile_steps must be [start, stop] with 1 <= start <= stop (the steps to trace), or [] "
                      f"for none; got {value!r}")


def read_yaml(text_or_stream):
    """YAML with numbers read as numbers, whether or not they have a dot."""
    return yaml.load(text_or_stream, Loader=_YamlLoader)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(name: str, value):
    """Numbers as the field's type: an int where a float is meant (`learning_rate: 1`), a whole float for an int."""
    field_type = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    if field_type == "float" and _is_number(value):
        return float(value)
    if field_type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if field_type == "Optional[str]" and value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a dict; an unknown key raises naming it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown config key {key!r}")
    if not isinstance(data.get("model", {}), dict):
        raise ConfigError(f"{source}: 'model' must be a mapping of BlenderbotSmallConfig fields")
    values = {k: _coerce(k, v) for k, v in data.items()}
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` (value parsed as YAML; `model.key=value` for model fields)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return key, value


def load_config(path: Optional[str | os.PathLike], overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when `path` is None) and apply overrides.

    Override keys are config keys, or `model.FIELD` for a model field.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = read_yaml(f) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {source}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    data = dict(data)
    data["model"] = dict(data.get("model") or {}) if isinstance(data.get("model", {}), dict) else data["model"]
    for key, value in (overrides or {}).items():
        if key.startswith("model."):
            if not isinstance(data["model"], dict):
                raise ConfigError(f"{source}: 'model' must be a mapping")
            data["model"][key[len("model."):]] = value
        else:
            data[key] = value
    return config_from_dict(data, source)
