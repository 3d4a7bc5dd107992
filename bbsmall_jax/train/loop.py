"""The training loop: train (or resume exactly) into an output directory, stopping cleanly on signals."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_stacks import unstack_layers
from bbsmall_jax.train import data as data_lib, streaming
from bbsmall_jax.train.checkpoints import CheckpointStore, check_compatible
from bbsmall_jax.train.config import ConfigError, TrainConfig
from bbsmall_jax.train.corpus import ShardedCorpus
from bbsmall_jax.train.flops import peak_flops, train_flops
from bbsmall_jax.train.output_lock import output_lock
from bbsmall_jax.train.packing import PackedBatcher
from bbsmall_jax.train.preparation import Datasets, build_model_config, export, prepare_datasets
from bbsmall_jax.runtime.coordination import barrier, say
from bbsmall_jax.train.sharding import Feeder, gather_params, make_mesh
from bbsmall_jax.train.program import build_program, check_batch
from bbsmall_jax.train.steps import init_state
from bbsmall_jax.train.summaries import make_reporters


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    """How a run ended."""

    step: int
    status: str  # "completed" | "stopped" (signal)
    export_dir: Optional[str]
    eval_loss: Optional[float] = None


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


def _kept_message(last_good: Optional[int], directory: str) -> str:
    if last_good is None:
        return "No checkpoint had been saved yet. Lower learning_rate or raise warmup_steps."
    return (f"The last good checkpoint, step {last_good}, is kept in {directory}; lower learning_rate or raise "
            "warmup_steps, then rerun to resume from it.")


def _raise_if_diverged(host_metrics: list[tuple[int, dict]], last_good: Optional[int], directory: str) -> None:
    for step, m in host_metrics:
        if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
            raise DivergedError(f"NaN or infinite values at step {step} (loss {float(m['loss'])}, gradient norm "
                                f"{float(m['grad_norm'])}); stopping. " + _kept_message(last_good, directory))


def _restore(store: CheckpointStore, abstract, cfg: TrainConfig, output_dir: str, is_main: bool):
    """(step, state, metadata) of the newest checkpoint that restores; TrainingError when none does."""
    restored, failed = store.restore_newest(abstract, lambda meta: check_compatible(meta, cfg, output_dir),
                                            say, is_main)
    if restored is None:
        raise TrainingError(f"none of the checkpoints in {store.directory} can be restored (steps "
                            f"{', '.join(map(str, failed))}; see the warnings above). Move that directory away "
                            "to train from the start.")
    if failed:
        barrier("checkpoints set aside")
        store.manager.reload()
    return restored


def evaluate(eval_step, params, batcher: data_lib.Batcher, max_batches: int, to_device) -> tuple[float, float]:
    """(mean token NLL, context gain) over the validation batches (all, or the first `max_batches` of a fixed
    order). The context gain is the mean NLL with each example's context swapped for another's, less the
    true NLL: near 0 when the model ignores its context."""
    count = len(batcher) if not max_batches else min(max_batches, len(batcher))
    sums = [eval_step(params, to_device(p)) for p in itertools.islice(batcher.plan(), count)]
    total, tokens, shuffled = (float(sum(np.asarray(s[i], np.float64) for s in sums)) for i in (0, 1, 2))
    return total / max(tokens, 1.0), (shuffled - total) / max(tokens, 1.0)


def train(cfg: TrainConfig, output_dir: str, datasets: Optional[Datasets] = None,
          model_config: Optional[BlenderbotSmallConfig] = None, host_params: Optional[dict] = None) -> TrainResult:
    """Train (or resume) into `output_dir`: checkpoints/, metrics.jsonl, tensorboard/, tokenizer/, final/ (HF
    format).

    `datasets`, `model_config` and `host_params` let tests run on synthetic data and given weights;
    by default they come from `cfg` (data, init or model, tokenizer). One run at a time holds `output_dir`
    (train/output_lock.py); a second one raises OutputInUseError.
    """
    os.makedirs(output_dir, exist_ok=True)
    with output_lock(output_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_locked(cfg, output_dir, datasets, model_config, host_params)


def _train_batches(cfg: TrainConfig, train, feeder: Feeder, pad_token_id: int, position):
    """(planned batch, device batch) pairs from `position` on: of in-memory examples, planned ahead and
    materialised in a background thread; of a sharded corpus, this process's rows from its stream."""
    if isinstance(train, ShardedCorpus):
        stream = streaming.StreamBatcher(train, feeder.local_rows, cfg.bucket_shapes, pad_token_id, cfg.packing,
                                         position if isinstance(position, streaming.StreamState) else None)
        return _Closing(((planned, feeder.place(planned.arrays)) for planned in stream), stream.close)
    batcher = (PackedBatcher if cfg.packing else data_lib.Batcher)(train, cfg.batch_size, cfg.bucket_shapes,
                                                                    cfg.seed, pad_token_id)
    return data_lib.Prefetcher((feeder.train_batch(batcher, p) for p in batcher.plan(position)), cfg.prefetch)


@dataclasses.dataclass
class _Closing:
    """An iterator with a `close` that releases what feeds it."""

    iterator: Iterator
    close: Callable[[], None]

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.iterator)


def _train_locked(cfg: TrainConfig, output_dir: str, datasets: Optional[Datasets],
                  model_config: Optional[BlenderbotSmallConfig], host_params: Optional[dict]) -> TrainResult:
    """`train`'s body, run while the main process holds the output directory's lock."""
    from tqdm import tqdm

    is_main = jax.process_index() == 0
    mesh = make_mesh()
    micro = check_batch(cfg, mesh.size)
    store = CheckpointStore(os.path.join(output_dir, "checkpoints"), cfg.keep_checkpoints)
    stream_dir = os.path.join(output_dir, "stream_state")  # each process's place in a sharded corpus
    batches = metrics_log = profiler = None
    try:
        resuming = bool(store.steps())
        meta = store.newest_meta()
        if meta is not None:  # early, before the data is prepared; each checkpoint is checked again on restore
            check_compatible(meta, cfg, output_dir)
        model_config = model_config or build_model_config(cfg, output_dir, resuming)
        if max(cfg.max_source_length, cfg.max_target_length) > model_config.max_position_embeddings:
            raise ConfigError(f"max_source_length/max_target_length ({cfg.max_source_length}/{cfg.max_target_length})"
                              f" exceed the model's max_position_embeddings ({model_config.max_position_embeddings})")
        datasets = datasets or prepare_datasets(cfg, output_dir, resuming, model_config)
        barrier("datasets")
        if is_main:
            cfg.save_yaml(os.path.join(output_dir, "train_config.yaml"))

        program = build_program(cfg, model_config, mesh, jax.default_backend())
        optimizer, abstract = program.optimizer, program.abstract
        restored = _restore(store, program.checkpoint_abstract, cfg, output_dir, is_main) if resuming else None
        if restored is not None:
            latest, state, meta = restored
            state = program.from_checkpoint(state)
            say(f"resuming from the checkpoint of step {latest} in {store.directory}")
            position = data_lib.Position(meta["epoch"], meta["index"])
            if isinstance(datasets.train, ShardedCorpus):
                position = streaming.load_state(stream_dir, latest, len(cfg.bucket_shapes))
        else:
            latest = None
            if host_params is None and cfg.init is not None:
                from bbsmall_jax.pretrained import BlenderbotSmallForConditionalGeneration

                host_params = jax.device_get(
                    BlenderbotSmallForConditionalGeneration.from_pretrained(cfg.init, config=model_config).params)
            state = init_state(program.module, optimizer, abstract, cfg.seed, host_params, program.stacked)
            position = data_lib.Position()
        step = latest or 0

        train_step, eval_step, all_finite = program.train_step, program.eval_step, program.all_finite
        peak, _ = peak_flops(jax.devices()[0].device_kind, cfg.peak_flops)

        pad = model_config.pad_token_id
        # Built at the first evaluation. A sharded corpus's held-out shard is read in the background from the
        # first step on, once compiling (which it would slow) is done.
        valid_batches = functools.cache(lambda: data_lib.Batcher(datasets.validation(), micro, cfg.bucket_shapes,
                                                                 cfg.seed, pad, drop_remainder=False))
        feeder = Feeder(mesh, micro, cfg.grad_accum_steps)
        to_eval_batch = lambda planned: feeder.eval_batch(valid_batches(), planned)

        metrics_log, profiler = make_reporters(output_dir, step, cfg.profile_steps, is_main)
        if step >= cfg.max_steps:
            say(f"the checkpoint is at step {step} >= max_steps={cfg.max_steps}: nothing to train")
        batches = _train_batches(cfg, datasets.train, feeder, pad, position)
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and is_main), unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        pending: list[tuple[int, dict]] = []
        last_good = latest
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
        eval_loss = None
        status = "completed"
        with _Stopper() as stopper:
            while step < cfg.max_steps:
                planned, batch = next(batches)
                profiler.before(step + 1)
                state, metrics = train_step(state, batch)
                step += 1
                profiler.after(step, state)
                datasets.read_validation_ahead()
                position = planned.after
                pending.append((step, metrics))
                window_tokens += planned.tokens
                window_flops += train_flops(model_config, cfg.batch_size, *planned.bucket)
                bar.update(1)
                stop = stopper.requested or (jax.process_count() > 1 and store.manager.reached_preemption(step))
                do_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
                do_log = step % cfg.log_every == 0 or do_eval
                do_save = step % cfg.save_every == 0 or step == cfg.max_steps or stop
                if not (do_log or do_save):
                    continue
                host, pending = jax.device_get(pending), []
                now = time.perf_counter()  # the window's steps are done; evaluation is not counted in its speed
                _raise_if_diverged(host, last_good, store.directory)
                record = {k: float(v) for k, v in host[-1][1].items() if k != "target_tokens"}
                if do_eval:
                    eval_loss, context_gain = evaluate(eval_step, state["params"], valid_batches(), cfg.eval_batches,
                                                       to_eval_batch)
                    record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 700.0)),
                                  eval_context_gain=context_gain)
                if do_log:
                    elapsed = max(now - window_start, 1e-9)
                    tokens_per_sec = window_tokens / elapsed
                    # Model FLOPs at the padded batch shapes over all devices' peak (train/flops.py).
                    mfu = None if peak is None else window_flops / elapsed / (peak * mesh.size)
                    metrics_log.write({"step": step, **record, "tokens_per_sec": round(tokens_per_sec, 1),
                                       **({} if mfu is None else {"mfu": float(f"{mfu:.4g}")}),
                                       "epoch": position.epoch})
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                                    **({} if mfu is None else {"mfu": f"{mfu:.1%}"}),
                                    **({"eval": f"{eval_loss:.4f}"} if do_eval else {}))
                    window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                if do_save and not bool(all_finite(state["params"])):
                    raise DivergedError(f"the params became NaN or infinite at step {step}; stopping. "
                                        + _kept_message(last_good, store.directory))
                if do_save:
                    if isinstance(position, streaming.StreamState):
                        streaming.save_state(stream_dir, step, position)
                    store.save(step, program.to_checkpoint(state),
                               {"step": step, "epoch": position.epoch, "index": getattr(position, "index", 0),
                                "fingerprint": cfg.fingerprint(), "config": cfg.trajectory_dict()})
                    streaming.prune_states(stream_dir, {step, *store.steps()})
                    last_good = step
                if stop:
                    status = "stopped"
                    say(f"stopped by a signal at step {step}; checkpoint saved; rerun the same command to resume")
                    break
        bar.close()
        store.manager.wait_until_finished()
        export_dir = None
        if status == "completed":
            host_params = unstack_layers(gather_params(state["params"], mesh))
            if is_main:
                export_dir = export(os.path.join(output_dir, "final"), model_config, host_params, datasets.tokenizer)
                say(f"exported the final model to {export_dir}")
            barrier("export")
        return TrainResult(step, status, export_dir, eval_loss)
    finally:
        for resource in (batches, metrics_log, profiler):
            if resource is not None:
                resource.close()
        store.close()
