"""What a run reports besides its checkpoints: metrics.jsonl and TensorBoard scalars (OUTPUT/tensorboard/, from
process 0), and a `jax.profiler` trace of the steps `profile_steps` names (into the same directory)."""

from __future__ import annotations

import os
from typing import Optional

import jax

from bbsmall_jax.train.checkpoints import MetricsLog

# metrics.jsonl's names -> TensorBoard tags (any other number logged goes under train/)
TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
        "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "eval_loss": "eval/loss",
        "eval_ppl": "eval/perplexity", "eval_context_gain": "eval/context_gain"}
NOT_SCALARS = ("step", "epoch")


def tensorboard_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "tensorboard")


class RunMetrics:
    """One record per logged step, to OUTPUT/metrics.jsonl and as TensorBoard scalars at that step.

    On resume both drop what the interrupted run logged after its checkpoint: the JSONL lines past
    `resume_step` go, and the new event file starts with TensorBoard's purge marker, so its readers hide
    the earlier files' events from step `resume_step + 1` on (tensorboardX's `purge_step`)."""

    def __init__(self, output_dir: str, resume_step: int, enabled: bool):
        self.log = MetricsLog(os.path.join(output_dir, "metrics.jsonl"), resume_step, enabled)
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir(output_dir), purge_step=resume_step + 1, flush_secs=30)

    def write(self, record: dict) -> None:
        """Log `record` (it holds "step")."""
        self.log.write(record)
        if self.writer is None:
            return
        for name, value in record.items():
            if name not in NOT_SCALARS:
                self.writer.add_scalar(TAGS.get(name, f"train/{name}"), value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepProfiler:
    """A `jax.profiler` trace (TensorBoard's profile plugin, or Perfetto) of the steps start..stop (1-based,
    inclusive) into `directory`, on process 0; with no steps it never touches the profiler."""

    def __init__(self, steps: tuple, directory: str, enabled: bool):
        self.steps = steps if enabled else ()
        self.directory, self.tracing = directory, False

    def before(self, step: int) -> None:
        """Step `step` is about to run: start the trace at the window's first step (or the first one this run
        gets to, on resume)."""
        if self.steps and not self.tracing and self.steps[0] <= step <= self.steps[1]:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int, state) -> None:
        """Step `step` has been dispatched: at the window's last step wait for it, and end the trace."""
        if self.tracing and step >= self.steps[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """End a trace still running (a run stopped inside the window)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def make_reporters(output_dir: str, resume_step: int, profile_steps: tuple,
                   is_main: Optional[bool] = None) -> tuple[RunMetrics, StepProfiler]:
    """The run's metrics and profiler (both active on process 0 only)."""
    is_main = jax.process_index() == 0 if is_main is None else is_main
    return (RunMetrics(output_dir, resume_step, is_main),
            StepProfiler(profile_steps, tensorboard_dir(output_dir), is_main))
