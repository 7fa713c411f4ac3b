"""Orbax checkpointing of the train state together with the grain iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,counters}`; counters are the totals that metrics
report (corrupt records and non-finite steps skipped), kept so that they survive a resume.
Orbax writes into a temporary folder and renames it when complete, so an interrupted save never
replaces the last good checkpoint, and `latest_step()` only sees complete ones. The data
iterator is saved *before* the next batch is drawn (Kauldron's order), so a resume sees exactly
the batches an uninterrupted run would have seen.

Resuming (`restore_latest`) takes the newest checkpoint that loads: a damaged one (an empty
step folder, a missing `state` item, an unreadable array file) is reported with its step and
why, and once an older one has loaded it is moved, intact, to `WORKDIR/damaged_checkpoints/`
(never deleted) so that the resumed run can save that step again. A checkpoint without its
data-iterator state is an error unless `train.allow_data_restart`. A save that fails (also an
asynchronous one, found at the next step by `check_pending_save`) raises `CheckpointSaveError`.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=options,
      item_names=("state", "data", "counters"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "counters": ocp.JsonCheckpointHandler()})


DAMAGED_DIR = "damaged_checkpoints"  # WORKDIR/damaged_checkpoints/<step>: moved aside, kept


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the previous one is still the latest."""


class CheckpointMismatch(ValueError):
  """A checkpoint's arrays do not fit the state this config builds (not damage)."""


class DataStateMissing(FileNotFoundError):
  """A checkpoint has no data-iterator state (see `train.allow_data_restart`)."""


class CheckpointsUnreadable(RuntimeError):
  """There are checkpoints, but none of them can be restored."""


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None,
         counters: dict[str, int] | None = None) -> None:
  """Saves (asynchronously when the manager is); a failure that shows at once raises
  CheckpointSaveError, a later one `check_pending_save`."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if counters is not None:
    items["counters"] = ocp.args.JsonSave({k: int(v) for k, v in counters.items()})
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # orbax and tensorstore raise many types (OSError, ValueError, ...)
    raise _save_error(manager, step, e) from e


def check_pending_save(manager: ocp.CheckpointManager, step: Optional[int],
                       wait: bool = False) -> Optional[int]:
  """Checks the save of `step` once it has finished (at once with `wait`); returns `step`
  while it is still being written, else None.

  Raises:
    CheckpointSaveError: the save failed (`checkpoint N could not be written to PATH: why`).
  """
  if step is None or (not wait and manager.is_saving_in_progress()):
    return step
  try:
    manager.wait_until_finished()
  except Exception as e:  # the background save's own error, re-raised by orbax
    raise _save_error(manager, step, e) from e
  if step not in manager.all_steps():
    raise _save_error(manager, step, RuntimeError("the save did not complete (see the log)"))
  logging.info("Saved checkpoint %d in %s", step, manager.directory)
  return None


def _save_error(manager, step: int, error: BaseException) -> CheckpointSaveError:
  reason = (error.strerror if isinstance(error, OSError) and error.strerror
            else " ".join(str(error).split()) or type(error).__name__)
  latest = [s for s in manager.all_steps() if s != step]
  previous = (f"checkpoint {max(latest)} is still the latest" if latest
              else "no earlier checkpoint exists")
  return CheckpointSaveError(f"checkpoint {step} could not be written to "
                             f"{os.path.join(str(manager.directory), str(step))}: "
                             f"{_cut(reason)} ({previous}; training stopped)")


def restore_counters(manager: ocp.CheckpointManager, step: int) -> dict[str, int]:
  """The counters saved with checkpoint `step` ({} when it has none, e.g. an older one)."""
  if not _has_item(manager, step, "counters"):
    return {}
  restored = manager.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
  return {k: int(v) for k, v in restored["counters"].items()}


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None,
            step: int | None = None, allow_data_restart: bool = False) -> tuple[Any, int]:
  """Restores `abstract_state` (a pytree of ShapeDtypeStruct with shardings) and the iterator.

  Raises:
    DataStateMissing: `data_iter` is given, the checkpoint has no data state and
      `allow_data_restart` is off.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    data_dir = os.path.join(str(manager.directory), str(step), "data")
    if _has_item(manager, step, "data"):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif allow_data_restart:
      logging.warning("Checkpoint %d has no data-iterator state (%s is missing): the data order "
                      "restarts from the beginning (config.train.allow_data_restart)", step,
                      data_dir)
    else:
      raise DataStateMissing(
          f"checkpoint {step} has no data-iterator state: {data_dir} is missing. Resuming would "
          "restart the data order, so the run would no longer match an uninterrupted one. "
          "Put that folder back, or set --config.train.allow_data_restart=True to accept "
          "restarting the data order")
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"], step


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Callable[[], Any],
                   data_iter: Any | None, allow_data_restart: bool = False
                   ) -> Optional[tuple[Any, int]]:
  """(state, step) of the newest checkpoint that loads, or None when there is none.

  `abstract_state()` gives the restore target. Damaged checkpoints are skipped with a warning
  naming the step and why; once an older one has loaded they are moved to
  WORKDIR/damaged_checkpoints (kept). A checkpoint that does not fit the config
  (CheckpointMismatch) or lacks its data state (DataStateMissing) stops the search.

  Raises:
    CheckpointsUnreadable: there are checkpoints but none loads (nothing is moved).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target, damaged = abstract_state(), []
  for step in steps:
    reason = damage_reason(str(manager.directory), step)
    if reason is None:
      try:
        state, _ = restore(manager, target, data_iter, step, allow_data_restart)
      except (DataStateMissing, CheckpointMismatch):
        raise
      except ValueError as e:
        if not _is_mismatch(e):
          reason = _cut(f"{type(e).__name__}: {' '.join(str(e).split())}")
        else:
          raise CheckpointMismatch(f"checkpoint {step} in {manager.directory} does not fit this "
                                   f"config: {_cut(' '.join(str(e).split()))}") from e
      except Exception as e:  # tensorstore, orbax and json errors of a damaged checkpoint
        reason = _cut(f"{type(e).__name__}: {' '.join(str(e).split())}")
      else:
        _move_damaged(manager, damaged, step)
        return state, step
    logging.warning("Checkpoint %d in %s cannot be restored (%s); trying the previous one",
                    step, manager.directory, reason)
    damaged.append((step, reason))
  listing = "; ".join(f"{step}: {reason}" for step, reason in damaged)
  raise CheckpointsUnreadable(f"no checkpoint in {manager.directory} can be restored "
                              f"({listing}); nothing was moved or deleted. Repair or move them "
                              "away to start over")


def damage_reason(directory: str, step: int) -> Optional[str]:
  """Why checkpoint `step` under `directory` is visibly damaged, or None when it looks whole
  (its arrays are only read by the restore itself)."""
  path = os.path.join(directory, str(step))
  if not os.listdir(path):
    return f"{path} is empty"
  state = os.path.join(path, "state")
  if not os.path.isdir(state):
    return f"its state item is missing ({state})"
  if not os.path.isfile(os.path.join(state, "_METADATA")):
    return f"its state item has no _METADATA ({state})"
  return None


def _move_damaged(manager: ocp.CheckpointManager, damaged: list, restored_step: int) -> None:
  """Moves the damaged checkpoints newer than `restored_step` to WORKDIR/damaged_checkpoints
  (process 0; every process then reloads the step list)."""
  if not damaged:
    return
  root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
  for step, reason in damaged:
    target = os.path.join(root, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(root, f"{step}-{suffix}"), suffix + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(os.path.join(str(manager.directory), str(step)), target)
    logging.warning("Resuming from checkpoint %d: checkpoint %d cannot be restored (%s); it was "
                    "moved, unchanged, to %s", restored_step, step, reason, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dq_move_damaged_checkpoints")
  manager.reload()


def _is_mismatch(error: ValueError) -> bool:
  text = str(error)
  return any(s in text for s in ("is not compatible with the stored shape",
                                 "tree structures do not match", "Requested shape"))


def _cut(text: str, limit: int = 300) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."


def restore_params_from(path: str, field: str = "config.init_from") -> dict:
  """The saved state as a dict of host arrays, from a workdir, `.../checkpoints` or
  `.../checkpoints/<step>` (any other fields, e.g. optimizer or discriminator, may differ).
  `field`: the config field that named `path` (for the error messages)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}: {path} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.isdir(os.path.join(path, "state")):
    state_dir = os.path.join(path, "state")
  else:
    manager = ocp.CheckpointManager(path, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{field}: no checkpoint under {path}")
    state_dir = os.path.join(path, str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(state_dir)
  metadata = getattr(metadata, "item_metadata", metadata)
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # Restore onto one local device, whatever mesh or process count wrote the checkpoint.
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                        metadata, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return checkpointer.restore(state_dir, target)


def matches_abstract(tree: Any, abstract: Any) -> bool:
  """Whether restored or loaded arrays have the tree structure and leaf shapes of `abstract`
  (e.g. `jax.eval_shape` of the model's init): the check before putting them in a train state."""
  return jax.tree.structure(tree) == jax.tree.structure(abstract) and all(
      np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)))


def _has_item(manager, step, name) -> bool:
  return os.path.isdir(os.path.join(str(manager.directory), str(step), name))


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
