"""Orbax checkpoints of the train state with their metadata, the config check on resume, and metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable, Optional

import jax
import orbax.checkpoint as ocp

from bbsmall_jax.atomic import write_atomic
from bbsmall_jax.errors import UsageError
from bbsmall_jax.train.checksums import check_finite_params, state_checksums, verify
from bbsmall_jax.train.config import RESUMABLE_FIELDS, ConfigError, TrainConfig
from bbsmall_jax.train.steps import State


class CheckpointStore:
    """Orbax checkpoints of the train state plus JSON metadata (config, data position), last K kept.

    Orbax writes each step into a temporary directory and renames it when complete, so a kill
    mid-save leaves the previous checkpoints usable. The metadata also holds a checksum of every array,
    which a restore checks, with the params' finiteness: a flipped bit in a file counts as a corrupt
    checkpoint.
    """

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def read_meta(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or not all(type(meta.get(k)) is int for k in ("step", "epoch", "index")):
            raise UsageError(f"its metadata is not a mapping with integer step, epoch and index: {str(meta)[:80]}")
        return meta

    def newest_meta(self) -> Optional[dict]:
        """The metadata of the newest checkpoint whose metadata reads (None without any)."""
        for step in self.steps():
            try:
                return self.read_meta(step)
            except Exception:  # noqa: BLE001 - `restore_newest` reports it
                continue
        return None

    def restore(self, step: int, abstract_state) -> State:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_newest(self, abstract_state, check: Callable[[dict], None], warn: Callable[[str], None],
                       is_main: bool) -> tuple[Optional[tuple[int, State, dict]], list[int]]:
        """((step, state, metadata) of the newest checkpoint that restores or None, the steps that did not).

        `check` vets each checkpoint's metadata (its errors propagate). Each checkpoint that fails to
        restore is named in a warning and, once an older one restored, moved (by the main process) to
        OUTPUT/corrupt_checkpoints/, so that training on can save its step again (`reload` afterwards).
        """
        failed = []
        for step in self.steps():
            try:
                meta = self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - orbax, tensorstore and json raise many types
                failed.append(self._report(step, err, warn))
                continue
            check(meta)
            try:
                state = self.restore(step, abstract_state)
                if "checksums" in meta:  # checkpoints written before checksums were recorded are taken as read
                    verify(state, meta["checksums"])
                check_finite_params(state)
            except Exception as err:  # noqa: BLE001
                failed.append(self._report(step, err, warn))
                continue
            if failed and is_main:
                self._set_aside(failed, warn)
            return (step, state, meta), failed
        return None, failed

    def _report(self, step: int, err: Exception, warn: Callable[[str], None]) -> int:
        reason = (str(err).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0][:300]
        warn(f"warning: the checkpoint of step {step} in {self.directory} cannot be restored "
             f"({type(err).__name__}: {reason}); trying the one before it")
        return step

    def _set_aside(self, steps: list[int], warn: Callable[[str], None]) -> None:
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, str(step))
            while os.path.exists(target):
                target += "_again"
            shutil.move(os.path.join(self.directory, str(step)), target)
            warn(f"moved the unusable checkpoint of step {step} to {target}")

    def save(self, step: int, state: State, meta: dict) -> None:
        """Save `state` with `meta` and the checksum of every array (`checksums.py`), which a restore checks."""
        meta = dict(meta, checksums=state_checksums(state))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _resolved(key: str, value):
    """A trajectory field's value as the run uses it: `dtype: auto` is the backend's compute dtype."""
    if key == "dtype" and value == "auto":
        from bbsmall_jax.runtime.precision import compute_dtype

        return compute_dtype(value, jax.default_backend())
    return value


def check_compatible(saved: dict, cfg: TrainConfig, output_dir: str) -> None:
    """Raise naming the differing keys when a checkpoint was written under another config."""
    current = json.loads(json.dumps(cfg.trajectory_dict(), default=str))
    previous = saved.get("config", {})
    if saved.get("fingerprint") == cfg.fingerprint() and previous == current:
        return
    keys = sorted((set(previous) | set(current)) - set(RESUMABLE_FIELDS))  # older checkpoints recorded some
    diffs = [f"{k}: {previous.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)"
             for k in keys if _resolved(k, previous.get(k)) != _resolved(k, current.get(k))]
    if not diffs:  # e.g. dtype float32 then, auto now, on the CPU
        return
    hint = ""
    if any(d.startswith("total_schedule_steps") for d in diffs) and not cfg.decay_steps:
        hint = (" The learning-rate schedule spans max_steps; to train longer without changing it, set "
                "decay_steps to the original max_steps.")
    raise ConfigError(f"{output_dir} holds checkpoints of a different training config ({'; '.join(diffs)}). "
                      f"Use another --output-dir, or delete {os.path.join(output_dir, 'checkpoints')} to start "
                      f"over.{hint}")


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
        write_atomic(path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
