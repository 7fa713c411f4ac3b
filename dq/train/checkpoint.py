"""Orbax checkpointing of the train state together with the grain iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,counters}`; counters are the totals that metrics
report (corrupt records and non-finite steps skipped), kept so that they survive a resume.
Orbax writes into a temporary folder and renames it when complete, so an interrupted save never
replaces the last good checkpoint, and `latest_step()` only sees complete ones. The data
iterator is saved *before* the next batch is drawn (Kauldron's order), so a resume sees exactly
the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
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


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None,
         counters: dict[str, int] | None = None) -> None:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if counters is not None:
    items["counters"] = ocp.args.JsonSave({k: int(v) for k, v in counters.items()})
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_counters(manager: ocp.CheckpointManager, step: int) -> dict[str, int]:
  """The counters saved with checkpoint `step` ({} when it has none, e.g. an older one)."""
  if not _has_item(manager, step, "counters"):
    return {}
  restored = manager.restore(step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))
  return {k: int(v) for k, v in restored["counters"].items()}


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores `abstract_state` (a pytree of ShapeDtypeStruct with shardings) and the iterator."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None and _has_item(manager, step, "data"):
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"], step


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


def _has_item(manager, step, name) -> bool:
  return os.path.isdir(os.path.join(str(manager.directory), str(step), name))


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
