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
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_stacks import unstack_layers
from bbsmall_jax.runtime.coordination import barrier, say
from bbsmall_jax.train import data as data_lib, streaming
from bbsmall_jax.train.checkpoints import CheckpointStore, check_compatible
from bbsmall_jax.train.config import ConfigError, TrainConfig
from bbsmall_jax.train.corpus import ShardedCorpus
from bbsmall_jax.train.flops import peak_flops, train_flops
from bbsmall_jax.train.output_lock import output_lock
from bbsmall_jax.train.packing import PackedBatcher
from bbsmall_jax.train.preparation import Datasets, build_model_config, export, prepare_datasets
from bbsmall_jax.train.program import TrainProgram, build_program, check_batch
from bbsmall_jax.train.sharding import Feeder, gather_params, make_mesh
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


def evaluate(eval_step, params, batcher: data_lib.BucketBatcher, max_batches: int, to_device) -> tuple[float, float]:
    """(mean token NLL, context gain) over the validation batches (all, or the first `max_batches` of a fixed
    order). The context gain is the mean NLL with each example's context swapped for another's, less the
    true NLL: near 0 when the model ignores its context."""
    count = len(batcher) if not max_batches else min(max_batches, len(batcher))
    sums = [eval_step(params, to_device(p)) for p in itertools.islice(batcher.schedule(), count)]
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
    """(scheduled batch, device batch) pairs from `position` on: of in-memory examples, scheduled ahead and
    materialised in a background thread; of a sharded corpus, this process's rows from its stream."""
    if isinstance(train, ShardedCorpus):
        return _streamed_batches(streaming.StreamBatcher(
            train, feeder.local_rows, cfg.bucket_shapes, pad_token_id, cfg.packing,
            position if isinstance(position, streaming.StreamState) else None), feeder)
    batcher_class = PackedBatcher if cfg.packing else data_lib.BucketBatcher
    batcher = batcher_class(train, cfg.batch_size, cfg.bucket_shapes, cfg.seed, pad_token_id)
    return data_lib.Prefetcher((feeder.train_batch(batcher, p) for p in batcher.schedule(position)), cfg.prefetch)


def _streamed_batches(stream: streaming.StreamBatcher, feeder: Feeder) -> Iterator:
    """The stream's batches placed on the devices; closing the generator stops the stream's reader."""
    try:
        for scheduled in stream:
            yield scheduled, feeder.place(scheduled.arrays)
    finally:
        stream.close()


@dataclasses.dataclass
class _Run:
    """A run once set up (`_set_up`): what its loop works with, and where it stands."""

    cfg: TrainConfig
    output_dir: str
    model_config: BlenderbotSmallConfig
    datasets: Datasets
    mesh: jax.sharding.Mesh
    program: TrainProgram
    store: CheckpointStore
    state: dict  # the train state pytree (params, optimizer state, step, rng)
    step: int
    position: data_lib.Position | streaming.StreamState  # where the data resumes after `step`
    last_good: Optional[int]  # the newest checkpoint saved (or restored)
    batches: Optional[Iterator] = None  # (scheduled batch, device batch) pairs
    valid_batches: Optional[Callable[[], data_lib.BucketBatcher]] = None
    feeder: Optional[Feeder] = None
    metrics_log: Any = None
    profiler: Any = None
    eval_loss: Optional[float] = None

    @property
    def stream_dir(self) -> str:
        """Where each process keeps its place in a sharded corpus, a file per checkpoint."""
        return os.path.join(self.output_dir, "stream_state")

    def close(self) -> None:
        for resource in (self.batches, self.metrics_log, self.profiler):
            if resource is not None:
                resource.close()


def _train_locked(cfg: TrainConfig, output_dir: str, datasets: Optional[Datasets],
                  model_config: Optional[BlenderbotSmallConfig], host_params: Optional[dict]) -> TrainResult:
    """`train`'s body, run while the main process holds the output directory's lock."""
    store = CheckpointStore(os.path.join(output_dir, "checkpoints"), cfg.keep_checkpoints)
    run = None
    try:
        run = _set_up(cfg, output_dir, store, datasets, model_config, host_params)
        status = _loop(run)
        store.manager.wait_until_finished()
        return TrainResult(run.step, status, _export(run) if status == "completed" else None, run.eval_loss)
    finally:
        if run is not None:
            run.close()
        store.close()


def _set_up(cfg: TrainConfig, output_dir: str, store: CheckpointStore, datasets: Optional[Datasets],
            model_config: Optional[BlenderbotSmallConfig], host_params: Optional[dict]) -> _Run:
    """The run's config, data, program and state (restored from the newest good checkpoint, or initialised),
    its batches and its reporters."""
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
    if jax.process_index() == 0:
        cfg.save_yaml(os.path.join(output_dir, "train_config.yaml"))
    mesh = make_mesh()
    program = build_program(cfg, model_config, mesh, jax.default_backend())
    run = _Run(cfg, output_dir, model_config, datasets, mesh, program, store, state=None, step=0,
               position=data_lib.Position(), last_good=None)
    if resuming:
        _resume(run)
    else:
        if host_params is None and cfg.init is not None:
            from bbsmall_jax.pretrained import BlenderbotSmallForConditionalGeneration

            host_params = jax.device_get(
                BlenderbotSmallForConditionalGeneration.from_pretrained(cfg.init, config=model_config).params)
        run.state = init_state(program.module, program.optimizer, program.abstract, cfg.seed, host_params,
                               program.stacked)
    micro, pad = check_batch(cfg, mesh.size), model_config.pad_token_id
    # Built at the first evaluation. A sharded corpus's held-out shard is read in the background from the
    # first step on, once compiling (which it would slow) is done.
    run.valid_batches = functools.cache(lambda: data_lib.BucketBatcher(
        datasets.validation(), micro, cfg.bucket_shapes, cfg.seed, pad, drop_remainder=False))
    run.feeder = Feeder(mesh, micro, cfg.grad_accum_steps)
    run.metrics_log, run.profiler = make_reporters(output_dir, run.step, cfg.profile_steps, jax.process_index() == 0)
    if run.step >= cfg.max_steps:
        say(f"the checkpoint is at step {run.step} >= max_steps={cfg.max_steps}: nothing to train")
    run.batches = _train_batches(cfg, datasets.train, run.feeder, pad, run.position)
    return run


def _resume(run: _Run) -> None:
    """Restore the newest checkpoint that restores: the state, the step and the data's position."""
    step, state, meta = _restore(run.store, run.program.checkpoint_abstract, run.cfg, run.output_dir,
                                 jax.process_index() == 0)
    say(f"resuming from the checkpoint of step {step} in {run.store.directory}")
    run.state, run.step, run.last_good = run.program.from_checkpoint(state), step, step
    if isinstance(run.datasets.train, ShardedCorpus):
        run.position = streaming.load_state(run.stream_dir, step, len(run.cfg.bucket_shapes))
    else:
        run.position = data_lib.Position(meta["epoch"], meta["index"])


@dataclasses.dataclass
class _Window:
    """The steps since the last log: their real tokens and model FLOPs, and when they started."""

    tokens: int = 0
    flops: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def _loop(run: _Run) -> str:
    """Train up to max_steps; "completed", or "stopped" by a signal (after saving a checkpoint)."""
    from tqdm import tqdm

    cfg = run.cfg
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not (cfg.progress and jax.process_index() == 0),
               unit="step", dynamic_ncols=True, file=sys.stderr)
    pending: list[tuple[int, dict]] = []  # (step, metrics on the device) since the last log or save
    window, status = _Window(), "completed"
    with _Stopper() as stopper:
        while run.step < cfg.max_steps:
            scheduled, batch = next(run.batches)
            run.profiler.before(run.step + 1)
            run.state, metrics = run.program.train_step(run.state, batch)
            run.step += 1
            run.profiler.after(run.step, run.state)
            run.datasets.read_validation_ahead()
            run.position = scheduled.after
            pending.append((run.step, metrics))
            window.tokens += scheduled.tokens
            window.flops += train_flops(run.model_config, cfg.batch_size, *scheduled.bucket)
            bar.update(1)
            stop = stopper.requested or (jax.process_count() > 1 and run.store.manager.reached_preemption(run.step))
            do_eval = run.step % cfg.eval_every == 0 or run.step == cfg.max_steps
            do_log = run.step % cfg.log_every == 0 or do_eval
            do_save = run.step % cfg.save_every == 0 or run.step == cfg.max_steps or stop
            if do_log or do_save:
                _log_evaluate_save(run, jax.device_get(pending), window, bar, do_eval, do_log, do_save)
                pending = []
                window = _Window() if do_log else window
            if stop:
                say(f"stopped by a signal at step {run.step}; checkpoint saved; rerun the same command to resume")
                status = "stopped"
                break
    bar.close()
    return status


def _log_evaluate_save(run: _Run, host: list[tuple[int, dict]], window: _Window, bar, do_eval: bool,
                       do_log: bool, do_save: bool) -> None:
    """At a logged or saved step: check the window's metrics, evaluate, log, and save a checkpoint."""
    now = time.perf_counter()  # the window's steps are done; evaluation is not counted in its speed
    _raise_if_diverged(host, run.last_good, run.store.directory)
    record = {k: float(v) for k, v in host[-1][1].items() if k != "target_tokens"}
    if do_eval:
        to_device = lambda scheduled: run.feeder.eval_batch(run.valid_batches(), scheduled)
        run.eval_loss, context_gain = evaluate(run.program.eval_step, run.state["params"], run.valid_batches(),
                                               run.cfg.eval_batches, to_device)
        record.update(eval_loss=run.eval_loss, eval_ppl=math.exp(min(run.eval_loss, 700.0)),
                      eval_context_gain=context_gain)
    if do_log:
        elapsed = max(now - window.start, 1e-9)
        tokens_per_sec = window.tokens / elapsed
        peak, _ = peak_flops(jax.devices()[0].device_kind, run.cfg.peak_flops)
        # Model FLOPs at the padded batch shapes over all devices' peak (train/flops.py).
        mfu = None if peak is None else window.flops / elapsed / (peak * run.mesh.size)
        run.metrics_log.write({"step": run.step, **record, "tokens_per_sec": round(tokens_per_sec, 1),
                               **({} if mfu is None else {"mfu": float(f"{mfu:.4g}")}),
                               "epoch": run.position.epoch})
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                        **({} if mfu is None else {"mfu": f"{mfu:.1%}"}),
                        **({"eval": f"{run.eval_loss:.4f}"} if do_eval else {}))
    if do_save:
        _save(run)


def _save(run: _Run) -> None:
    """Save a checkpoint of the run as it stands (and each process's place in a sharded corpus beside it)."""
    if not bool(run.program.all_finite(run.state["params"])):
        raise DivergedError(f"the params became NaN or infinite at step {run.step}; stopping. "
                            + _kept_message(run.last_good, run.store.directory))
    position = run.position
    streamed = isinstance(position, streaming.StreamState)
    if streamed:
        streaming.save_state(run.stream_dir, run.step, position)
    run.store.save(run.step, run.program.to_checkpoint(run.state),
                   {"step": run.step, "epoch": position.epoch, "index": 0 if streamed else position.index,
                    "fingerprint": run.cfg.fingerprint(), "config": run.cfg.trajectory_dict()})
    if streamed:  # the states of the checkpoints the store no longer keeps
        streaming.prune_states(run.stream_dir, {run.step, *run.store.steps()})
    run.last_good = run.step


def _export(run: _Run) -> Optional[str]:
    """Write the final model in HF format (process 0; every process gathers the params); its directory."""
    host_params = unstack_layers(gather_params(run.state["params"], run.mesh))
    export_dir = None
    if jax.process_index() == 0:
        export_dir = export(os.path.join(run.output_dir, "final"), run.model_config, host_params,
                            run.datasets.tokenizer)
        say(f"exported the final model to {export_dir}")
    barrier("export")
    return export_dir
