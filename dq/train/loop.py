"""What both trainers do around their jitted step: progress, non-finite checks, stop requests,
checkpoint cadence, and the small host helpers they share.

The jitted step is wrapped by `guard_nonfinite`: a step whose loss terms or gradient norm are
not finite leaves the state unchanged (only `step` advances) and reports `finite = 0`. The host
reads that flag one step late (so dispatch stays asynchronous) and always before a checkpoint
is written; then it either stops with a message naming the step, the terms and the last good
checkpoint, or, with `train.skip_nonfinite`, counts the skipped step and goes on.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dq import sharding as sh
from dq import checkpoint as ckpt
from dq.train.preemption import PreemptionWatch
from dq.train.progress import Progress


def guard_nonfinite(update_fn: Callable[..., tuple[Any, dict]]) -> Callable[..., tuple[Any, dict]]:
  """update_fn(state, *args) -> (state, metrics) that keeps the old state (but the new step)
  when any metric is non-finite, and adds `finite` (1.0 / 0.0) to the metrics."""

  def guarded(state, *args):
    new_state, metrics = update_fn(state, *args)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return kept.replace(step=new_state.step), {**metrics, "finite": finite.astype(jnp.float32)}

  return guarded


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the metrics with a non-finite value; `grad_norm` means the gradient."""
  return sorted(k for k, v in metrics.items() if k != "finite" and not np.all(np.isfinite(v)))


class NonFiniteMonitor:
  """Checks each step's `finite` flag one step late; raises or counts (`skip`)."""

  def __init__(self, manager: Any, skip: bool):
    self.manager, self.skip = manager, skip
    self.skipped = 0
    self._pending: tuple[int, dict] | None = None

  def push(self, step: int, metrics: dict) -> None:
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  def _check(self, step: int, metrics: dict) -> None:
    if float(jax.device_get(metrics["finite"])) > 0:
      return
    terms = ", ".join(nonfinite_terms(jax.device_get(metrics))) or "a metric"
    if self.skip:
      self.skipped += 1
      logging.warning("Step %d: non-finite %s; update skipped (%d skipped so far)", step, terms,
                      self.skipped)
      return
    latest = self.manager.latest_step()
    last_good = (f"step {latest} in {self.manager.directory}" if latest is not None else
                 "none yet")
    raise FloatingPointError(
        f"non-finite {terms} at step {step}; training stopped before saving it. Last good "
        f"checkpoint: {last_good} (rerunning the same command resumes from it). Lower "
        "config.optim.lr, set config.optim.grad_clip, or set config.train.skip_nonfinite=True "
        "to skip such steps")


class TrainLoop:
  """Steps `start+1 .. total` with progress lines, non-finite checks, stop requests, the
  checkpoint cadence and save checks (`save`; a failed asynchronous save stops the run at the
  next step). Use as a context manager (installs the stop-signal handlers, unless `watch` is
  one that is already installed, e.g. `TrainingRun.watch`)."""

  def __init__(self, train_cfg: Any, manager: Any, start: int,
               watch: Optional[PreemptionWatch] = None):
    self.total, self.start = train_cfg.num_steps, start
    self.log_every, self.checkpoint_every = train_cfg.log_every, train_cfg.checkpoint_every
    self.manager = manager
    self.watch = watch if watch is not None else PreemptionWatch()
    self._saving: Optional[int] = None  # the step whose asynchronous save may be running
    self._first_step_start = time.perf_counter()
    self.monitor = NonFiniteMonitor(manager, skip=train_cfg.get("skip_nonfinite", False))
    self.progress = Progress(self.total, start, every=self.log_every)
    self.preempted = False
    # Counters kept across resumes (see `counters`), from the checkpoint resumed.
    restored = ckpt.restore_counters(manager, start) if start > 0 else {}
    self.monitor.skipped = restored.get("nonfinite_skipped", 0)
    self._records_before = restored.get("skipped_records", 0)
    self.skipped_records = 0  # distinct corrupt records this process's batches reported
    self._t_log, self._s_log = time.perf_counter(), start

  def __enter__(self) -> "TrainLoop":
    self.watch.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.watch.__exit__(*exc)

  def steps(self):
    for step in range(self.start + 1, self.total + 1):
      if step == self.start + 1:
        logging.info("Compiling the train step...")
        self._first_step_start = time.perf_counter()
      yield step
      if self.preempted:
        return

  def stepped(self, step: int, metrics: dict, skipped_records: int = 0) -> None:
    """After dispatching `step`; `skipped_records` is its batch's count (see make_dataset).
    Raises CheckpointSaveError when the previous save has failed."""
    self._saving = ckpt.check_pending_save(self.manager, self._saving)
    if step == self.start + 1:
      jax.block_until_ready(metrics)
      logging.info("Train step compiled and run once in %.1f s",
                   time.perf_counter() - self._first_step_start)
    self.monitor.push(step, metrics)
    self.skipped_records += int(skipped_records)
    self.progress(step)

  def log_due(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total

  def log_scalars(self, step: int, metrics: dict, batch_size: int) -> dict:
    """Host scalars of this step's metrics plus rates since the last log and the running
    totals of `counters` (`nonfinite_skipped`, `data/skipped_records`)."""
    self.monitor.flush()
    scalars = jax.device_get(metrics)
    scalars.pop("finite", None)
    now = time.perf_counter()
    elapsed = max(now - self._t_log, 1e-9)
    scalars["steps_per_sec"] = (step - self._s_log) / elapsed
    scalars["examples_per_sec"] = scalars["steps_per_sec"] * batch_size
    scalars["elapsed_since_log"] = elapsed
    self._t_log, self._s_log = now, step
    scalars.update({k: float(v) for k, v in self.counters().items()})
    scalars["data/skipped_records"] = scalars.pop("skipped_records")
    return scalars

  def counters(self) -> dict[str, int]:
    """Saved with each checkpoint; call it on every process. `nonfinite_skipped`: steps skipped
    since the run's first step. `skipped_records`: distinct corrupt records found, summed over
    processes (each reads its own shard); after a resume, the larger of the checkpoint's count
    and this run's (a new process finds the same files again: adding would count them twice)."""
    records = self.skipped_records
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      records = int(np.sum(multihost_utils.process_allgather(np.asarray(records, np.int64))))
    return {"nonfinite_skipped": self.monitor.skipped,
            "skipped_records": max(self._records_before, records)}

  def save_due(self, step: int) -> bool:
    """True when this step must be checkpointed (cadence, last step, or a stop request); the
    pending non-finite checks run first, so a bad state is never saved."""
    self.preempted = self.watch.should_stop(step)
    due = self.preempted or step % self.checkpoint_every == 0 or step == self.total
    if due:
      self.monitor.flush()
    if self.preempted:
      logging.warning("Stopping at step %d on request; the checkpoint of this step is being "
                      "saved. Rerun the same command to resume.", step)
    return due

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    """Checkpoints `step` (with the counters); waits for and checks the previous save first."""
    self._saving = ckpt.check_pending_save(self.manager, self._saving, wait=True)
    ckpt.save(self.manager, step, state, data_iter, self.counters())
    self._saving = step

  def finish(self) -> None:
    """Waits for the last save; CheckpointSaveError when it failed."""
    self._saving = ckpt.check_pending_save(self.manager, self._saving, wait=True)


def save_config(config: Any, workdir: str) -> None:
  """WORKDIR/config.json of a new run (the trainers use `workdir.record_config`)."""
  from dq.train.workdir import record_config
  record_config(config, workdir, 0)


def check_batch_size(batch_size: int, mesh, field: str) -> int:
  """The per-process batch; raises unless `batch_size` divides over devices and processes."""
  dp = sh.data_parallel_size(mesh)
  if batch_size % dp or batch_size % jax.process_count():
    raise ValueError(f"{field}={batch_size} must be divisible by the data-parallel size {dp} "
                     f"and the process count {jax.process_count()}")
  return batch_size // jax.process_count()


def warn_codebook_collapse(dead_fraction: float, threshold: float, step: int) -> bool:
  """Logs a warning when more than `threshold` of the codebook is dead; returns whether it did."""
  if threshold <= 0 or not dead_fraction > threshold:
    return False
  logging.warning("Step %d: %.0f%% of the codebook is dead (EMA cluster size < 1; warning above "
                  "%.0f%%). Codebook collapse: consider model.restart_unused_codes=True, a smaller "
                  "model.codebook_size or a lower model.embed_dim.", step,
                  100 * dead_fraction, 100 * threshold)
  return True
