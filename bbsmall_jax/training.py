"""Training: loss, AdamW, sharded train/eval steps over a device mesh, orbax checkpoints and the training loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import data as data_lib
from .config import BlenderbotSmallConfig
from .model import build_module, cross_entropy_loss, init_params, shift_tokens_right
from .train_config import ConfigError, TrainConfig

DATA_AXIS = "data"
FROZEN_PARAMS = ("final_logits_bias",)  # a buffer in transformers: never trained
DECAYED_LEAVES = ("kernel", "embedding")  # no weight decay on biases and LayerNorm scales (as HF's Trainer)
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}

State = dict  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite."""


# ---- mesh and sharding ----

def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over every device of every process, ordered by process so each one's rows are contiguous."""
    devices = sorted(devices if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def leaf_spec(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> P:
    """Replicated, or (FSDP) sharded over the data axis along the largest dimension it divides."""
    n = mesh.shape[DATA_AXIS]
    dims = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not fsdp or n == 1 or not dims:
        return P()
    axis = max(dims, key=lambda i: shape[i])
    return P(*[DATA_AXIS if i == axis else None for i in range(len(shape))])


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (a pure function of each shape)."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), mesh, fsdp)),
                                  abstract_tree)


def local_rows(mesh: Mesh, rows: int) -> np.ndarray:
    """Indices of the batch rows (axis sharded over `data`) that this process's devices hold, in order."""
    index_map = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((rows,))
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else rows) for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


# ---- optimizer ----

def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear or cosine decay to `end_learning_rate_ratio`, or constant."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(cfg.total_schedule_steps - warmup, 1)
    end = peak * cfg.end_learning_rate_ratio
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    else:
        decay = optax.constant_schedule(peak)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def weight_decay_mask(params):
    """True for matrices and embeddings, False for biases, LayerNorm scales and frozen params."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED_LEAVES, params)


def zero_frozen(grads):
    """Zero the gradients of params transformers keeps as buffers (`final_logits_bias`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if _leaf_name(path) in FROZEN_PARAMS else g, grads)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices and embeddings)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


# ---- loss and steps ----

def loss_sum(module, params, batch: dict, dropout_rng: Optional[jax.Array], label_smoothing: float = 0.0):
    """(sum of per-token losses, number of target tokens) of one batch; dropout on when a key is given."""
    config = module.config
    labels = batch["labels"]  # [B, T], -100 on padding
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids, deterministic=dropout_rng is None,
                       rngs={} if dropout_rng is None else {"dropout": dropout_rng})
    count = (labels != -100).sum()
    return cross_entropy_loss(out.logits, labels, label_smoothing) * count, count


def make_train_step(module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float = 0.0, remat: str = "none") -> Callable:
    """`step(state, batch) -> (state, metrics)`; batch arrays are [accum, micro_batch, length].

    Gradients of the accumulation steps are summed and divided by the total number of target tokens,
    so the update equals that of one batch of all the examples.
    """
    def micro_loss(params, micro_batch, rng):
        return loss_sum(module, params, micro_batch, rng, label_smoothing)

    if remat != "none":
        micro_loss = jax.checkpoint(micro_loss, policy=REMAT_POLICIES[remat])
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: State, batch: dict):
        params = state["params"]
        step_rng = jax.random.fold_in(state["rng"], state["step"])

        def accumulate(carry, xs):
            grads, total, count = carry
            index, micro_batch = xs
            (value, n), g = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, index))
            return (jax.tree_util.tree_map(jnp.add, grads, g), total + value, count + n), None

        if batch["labels"].shape[0] == 1:  # no accumulation: skip the loop and the zero-filled accumulator
            (total, count), grads = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], batch), step_rng)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                (jnp.arange(batch["labels"].shape[0]), batch))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = zero_frozen(jax.tree_util.tree_map(lambda g: g / denom, grads))
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=state["step"] + 1)
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"]), "target_tokens": count}
        return new_state, metrics

    return step


def make_eval_step(module) -> Callable:
    """`eval_step(params, batch) -> (summed token NLL, token count)`, no dropout, no smoothing."""
    return lambda params, batch: loss_sum(module, params, batch, None)


# ---- checkpoints ----

class CheckpointStore:
    """Orbax checkpoints of the train state plus JSON metadata (config, data position), last K kept.

    Orbax writes each step into a temporary directory and renames it when complete, so a kill
    mid-save leaves the previous checkpoints usable.
    """

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> State:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def save(self, step: int, state: State, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: dict, cfg: TrainConfig, output_dir: str) -> None:
    """Raise naming the differing keys when a checkpoint was written under another config."""
    current = json.loads(json.dumps(cfg.trajectory_dict(), default=str))
    previous = saved.get("config", {})
    if saved.get("fingerprint") == cfg.fingerprint() and previous == current:
        return
    keys = sorted(set(previous) | set(current))
    diffs = [f"{k}: {previous.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)"
             for k in keys if previous.get(k) != current.get(k)]
    hint = ""
    if any(d.startswith("total_schedule_steps") for d in diffs) and not cfg.decay_steps:
        hint = (" The learning-rate schedule spans max_steps; to train longer without changing it, set "
                "decay_steps to the original max_steps.")
    raise ConfigError(f"{output_dir} holds checkpoints of a different training config ({'; '.join(diffs)}). "
                      f"Use another --output-dir, or delete {os.path.join(output_dir, 'checkpoints')} to start "
                      f"over.{hint}")


# ---- metrics ----

class MetricsLog:
    """OUTPUT/metrics.jsonl, one JSON object per logged step; records past the resume step are dropped."""

    def __init__(self, path: str, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if isinstance(record, dict) and record.get("step", math.inf) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# ---- state ----

def abstract_state(module, optimizer, mesh: Mesh, fsdp: bool):
    """ShapeDtypeStructs with shardings of the whole train state."""
    params = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    shapes = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    shardings = tree_shardings(shapes, mesh, fsdp)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def init_state(module, optimizer, abstract, seed: int, host_params: Optional[dict] = None) -> State:
    """A fresh train state: params from `host_params` (pretrained) or initialised with `seed`."""
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    if host_params is None:
        params = jax.jit(lambda key: init_params(module, key), out_shardings=shardings["params"])(init_key)
    else:
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(s.shape, s.sharding,
                                                      lambda idx, x=x: np.asarray(x, s.dtype)[idx]),
            host_params, abstract["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    replicate = lambda x, s: jax.make_array_from_callback(s.shape, s.sharding, lambda idx: np.asarray(x)[idx])
    return {"params": params, "opt_state": opt_state, "step": replicate(np.int32(0), abstract["step"]),
            "rng": replicate(np.asarray(dropout_key, np.uint32), abstract["rng"])}


def gather_params(params, mesh: Mesh) -> dict:
    """The params as host numpy arrays (collective: every process must call it)."""
    replicated = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), replicated)


# ---- the run ----

@dataclasses.dataclass
class TrainResult:
    """How a run ended."""

    step: int
    status: str  # "completed" | "stopped" (signal)
    export_dir: Optional[str]
    eval_loss: Optional[float] = None


@dataclasses.dataclass
class Datasets:
    """Tokenized training and validation examples plus the tokenizer that made them (None: synthetic data)."""

    train: data_lib.TokenizedExamples
    valid: data_lib.TokenizedExamples
    tokenizer: Any = None


class _Stopper:
    """Turns SIGTERM (preemption) into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # Several processes stop together through JAX's preemption sync point instead (see `train`).
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


def _kept_message(last_good: Optional[int], directory: str) -> str:
    if last_good is None:
        return "No checkpoint had been saved yet. Lower learning_rate or raise warmup_steps."
    return (f"The last good checkpoint, step {last_good}, is kept in {directory}; lower learning_rate or raise "
            "warmup_steps, then rerun to resume from it.")


def _say(message: str) -> None:
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def build_model_config(cfg: TrainConfig, output_dir: str, resuming: bool) -> BlenderbotSmallConfig:
    """The model config: `init`'s config.json (or the defaults) with `cfg.model` applied.

    It is kept in OUTPUT/model_config.json, so that resuming needs neither the hub nor `init`.
    """
    path = os.path.join(output_dir, "model_config.json")
    if resuming and os.path.isfile(path):
        return BlenderbotSmallConfig.from_json_file(path)
    if cfg.init is None:
        config = cfg.model_config()
    else:
        config = cfg.model_config(BlenderbotSmallConfig.from_pretrained(cfg.init))
    if jax.process_index() == 0:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    return config


def prepare_datasets(cfg: TrainConfig, output_dir: str, resuming: bool,
                     model_config: BlenderbotSmallConfig) -> Datasets:
    """Load examples, get the tokenizer (saved under OUTPUT/tokenizer, reused on resume), tokenize."""
    from .tokenizer import BlenderbotSmallTokenizer
    from .tokenizer_training import train_tokenizer

    train_examples, valid_examples = data_lib.load_examples(cfg.data, cfg.valid_data, cfg.valid_fraction, cfg.seed)
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    if resuming and os.path.isdir(tokenizer_dir):
        tokenizer = BlenderbotSmallTokenizer.from_pretrained(tokenizer_dir)
    else:
        if cfg.tokenizer or cfg.init:
            tokenizer = BlenderbotSmallTokenizer.from_pretrained(cfg.tokenizer or cfg.init)
        else:
            texts = sorted({t for ex in train_examples for t in (*ex.context, ex.response)})
            order = np.random.default_rng(cfg.seed).permutation(len(texts))[:cfg.tokenizer_train_texts]
            _say(f"training a {model_config.vocab_size}-token vocabulary on {len(order)} utterances")
            tokenizer = train_tokenizer([texts[i] for i in sorted(order)], model_config.vocab_size)
        if jax.process_index() == 0:
            tmp = tokenizer_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            os.replace(tmp, tokenizer_dir)
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}")
    tokenize = lambda examples: data_lib.tokenize_examples(
        examples, tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.separator, cfg.add_end)
    return Datasets(tokenize(train_examples), tokenize(valid_examples), tokenizer)


def export(directory: str, model_config: BlenderbotSmallConfig, host_params: dict, tokenizer) -> str:
    """Write the final model (`save_pretrained`, HF format) and tokenizer, atomically (tmp dir + rename)."""
    from .modeling import BlenderbotSmallForConditionalGeneration

    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    BlenderbotSmallForConditionalGeneration(model_config, host_params).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


class _Feeder:
    """Planned batches -> global arrays sharded over the data axis, each process materialising only its rows."""

    def __init__(self, mesh: Mesh, micro: int, accum: int):
        self.mesh, self.micro, self.accum = mesh, micro, accum
        self.mine = local_rows(mesh, micro)

    def train_batch(self, batcher: data_lib.Batcher, planned: data_lib.PlannedBatch):
        rows = planned.rows.reshape(self.accum, self.micro)[:, self.mine]  # [A, local rows]
        local = batcher.materialize(planned.bucket, rows.reshape(-1))
        local = {k: v.reshape(rows.shape + v.shape[1:]) for k, v in local.items()}  # [A, local rows, L]
        shapes = {k: (self.accum, self.micro, v.shape[-1]) for k, v in local.items()}
        sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        return planned, jax.make_array_from_process_local_data(sharding, local, shapes)

    def eval_batch(self, batcher: data_lib.Batcher, planned: data_lib.PlannedBatch):
        local = batcher.materialize(planned.bucket, planned.rows[self.mine])  # [local rows, L]
        shapes = {k: (self.micro, v.shape[-1]) for k, v in local.items()}
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(DATA_AXIS)), local, shapes)


def _raise_if_diverged(host_metrics: list[tuple[int, dict]], last_good: Optional[int], directory: str) -> None:
    for step, m in host_metrics:
        if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
            raise DivergedError(f"NaN or infinite values at step {step} (loss {float(m['loss'])}, gradient norm "
                                f"{float(m['grad_norm'])}); stopping. " + _kept_message(last_good, directory))


def evaluate(eval_step, params, batcher: data_lib.Batcher, max_batches: int, to_device) -> float:
    """Mean token NLL over the validation batches (all, or the first `max_batches` of a fixed order)."""
    count = len(batcher) if not max_batches else min(max_batches, len(batcher))
    sums = [eval_step(params, to_device(p)) for p in itertools.islice(batcher.plan(), count)]
    total, tokens = (float(sum(np.asarray(s[i], np.float64) for s in sums)) for i in (0, 1))
    return total / max(tokens, 1.0)


def train(cfg: TrainConfig, output_dir: str, datasets: Optional[Datasets] = None,
          model_config: Optional[BlenderbotSmallConfig] = None, host_params: Optional[dict] = None) -> TrainResult:
    """Train (or resume) into `output_dir`: checkpoints/, metrics.jsonl, tokenizer/, final/ (HF format).

    `datasets`, `model_config` and `host_params` let tests run on synthetic data and given weights;
    by default they come from `cfg` (data, init or model, tokenizer).
    """
    from tqdm import tqdm

    is_main = jax.process_index() == 0
    os.makedirs(output_dir, exist_ok=True)
    mesh = make_mesh()
    n_devices = mesh.shape[DATA_AXIS]
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro % n_devices:
        raise ConfigError(f"batch_size / grad_accum_steps = {micro} examples per micro-batch must be divisible "
                          f"by the {n_devices} devices")
    store = CheckpointStore(os.path.join(output_dir, "checkpoints"), cfg.keep_checkpoints)
    batches = None
    try:
        latest = store.latest_step()
        meta = store.read_meta(latest) if latest is not None else None
        if meta is not None:
            check_compatible(meta, cfg, output_dir)
        model_config = model_config or build_model_config(cfg, output_dir, latest is not None)
        if max(cfg.max_source_length, cfg.max_target_length) > model_config.max_position_embeddings:
            raise ConfigError(f"max_source_length/max_target_length ({cfg.max_source_length}/{cfg.max_target_length})"
                              f" exceed the model's max_position_embeddings ({model_config.max_position_embeddings})")
        datasets = datasets or prepare_datasets(cfg, output_dir, latest is not None, model_config)
        _barrier("datasets")
        if is_main:
            cfg.save_yaml(os.path.join(output_dir, "train_config.yaml"))

        module = build_module(model_config, "seq2seq_lm", jnp.dtype(cfg.dtype), jnp.float32)
        optimizer, schedule = make_optimizer(cfg), learning_rate_schedule(cfg)
        abstract = abstract_state(module, optimizer, mesh, cfg.fsdp)
        if latest is not None:
            _say(f"resuming from the checkpoint of step {latest} in {store.directory}")
            state = store.restore(latest, abstract)
            position = data_lib.Position(meta["epoch"], meta["index"])
        else:
            if host_params is None and cfg.init is not None:
                from .modeling import BlenderbotSmallForConditionalGeneration

                host_params = jax.device_get(
                    BlenderbotSmallForConditionalGeneration.from_pretrained(cfg.init, config=model_config).params)
            state = init_state(module, optimizer, abstract, cfg.seed, host_params)
            position = data_lib.Position()
        step = latest or 0

        state_shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
        replicated = NamedSharding(mesh, P())
        train_step = jax.jit(make_train_step(module, optimizer, schedule, cfg.label_smoothing, cfg.remat),
                             in_shardings=(state_shardings, NamedSharding(mesh, P(None, DATA_AXIS))),
                             out_shardings=(state_shardings, replicated), donate_argnums=0)
        all_finite = jax.jit(_all_finite, in_shardings=(state_shardings["params"],), out_shardings=replicated)
        eval_step = jax.jit(make_eval_step(module), in_shardings=(state_shardings["params"],
                                                                  NamedSharding(mesh, P(DATA_AXIS))),
                            out_shardings=replicated)

        pad = model_config.pad_token_id
        train_batches = data_lib.Batcher(datasets.train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, pad)
        valid_batches = data_lib.Batcher(datasets.valid, micro, cfg.bucket_shapes, cfg.seed, pad,
                                         drop_remainder=False)
        feeder = _Feeder(mesh, micro, cfg.grad_accum_steps)
        to_eval_batch = lambda planned: feeder.eval_batch(valid_batches, planned)

        metrics_log = MetricsLog(os.path.join(output_dir, "metrics.jsonl"), step, is_main)
        if step >= cfg.max_steps:
            _say(f"the checkpoint is at step {step} >= max_steps={cfg.max_steps}: nothing to train")
        batches = data_lib.Prefetcher((feeder.train_batch(train_batches, p) for p in train_batches.plan(position)),
                                      cfg.prefetch)
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and is_main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        pending: list[tuple[int, dict]] = []
        last_good = latest
        window_tokens, window_start = 0, time.perf_counter()
        eval_loss = None
        status = "completed"
        with _Stopper() as stopper:
            while step < cfg.max_steps:
                planned, batch = next(batches)
                state, metrics = train_step(state, batch)
                step += 1
                position = data_lib.Position(planned.position.epoch, planned.position.index + 1)
                pending.append((step, metrics))
                window_tokens += planned.tokens
                bar.update(1)
                stop = stopper.requested or (jax.process_count() > 1 and store.manager.reached_preemption(step))
                do_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
                do_log = step % cfg.log_every == 0 or do_eval
                do_save = step % cfg.save_every == 0 or step == cfg.max_steps or stop
                if not (do_log or do_save):
                    continue
                host, pending = jax.device_get(pending), []
                _raise_if_diverged(host, last_good, store.directory)
                record = {k: float(v) for k, v in host[-1][1].items() if k != "target_tokens"}
                if do_eval:
                    eval_loss = evaluate(eval_step, state["params"], valid_batches, cfg.eval_batches, to_eval_batch)
                    record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 700.0)))
                now = time.perf_counter()
                if do_log:
                    tokens_per_sec = window_tokens / max(now - window_start, 1e-9)
                    metrics_log.write({"step": step, **record, "tokens_per_sec": round(tokens_per_sec, 1),
                                       "epoch": planned.position.epoch})
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                                    **({"eval": f"{eval_loss:.4f}"} if do_eval else {}))
                    window_tokens, window_start = 0, time.perf_counter()
                if do_save and not bool(all_finite(state["params"])):
                    raise DivergedError(f"the params became NaN or infinite at step {step}; stopping. "
                                        + _kept_message(last_good, store.directory))
                if do_save:
                    store.save(step, state, {"step": step, "epoch": position.epoch, "index": position.index,
                                             "fingerprint": cfg.fingerprint(), "config": cfg.trajectory_dict()})
                    last_good = step
                if stop:
                    status = "stopped"
                    _say(f"stopped by a signal at step {step}; checkpoint saved; rerun the same command to resume")
                    break
        bar.close()
        store.manager.wait_until_finished()
        export_dir = None
        if status == "completed":
            host_params = gather_params(state["params"], mesh)
            if is_main:
                export_dir = export(os.path.join(output_dir, "final"), model_config, host_params, datasets.tokenizer)
                _say(f"exported the final model to {export_dir}")
            _barrier("export")
        return TrainResult(step, status, export_dir, eval_loss)
    finally:
        if batches is not None:
            batches.close()
        store.close()
