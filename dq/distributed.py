"""Multi-process start-up: `jax.distributed.initialize`, gated by flags.

- `--distributed=auto`: `jax.distributed.initialize()` with no arguments; JAX finds the
  coordinator on TPU pods (metadata server) and under Slurm (SLURM_* variables).
- `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`: explicit, e.g. several
  CPU processes on one machine (`launch/local_multiprocess.sh`).
- neither: a single process (nothing is initialised).

Must run before anything touches a JAX device.
"""
from __future__ import annotations

from typing import Optional

from absl import logging

MODES = ("none", "auto")


def initialize(mode: str = "none", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
  """Initialises the JAX distributed runtime when asked; returns whether it did."""
  import jax

  explicit = [coordinator_address, num_processes, process_id]
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  if any(v is not None for v in explicit):
    if mode == "auto":
      raise ValueError("--distributed=auto and explicit --coordinator_address/--num_processes/"
                       "--process_id are exclusive; use one or the other")
    if any(v is None for v in explicit):
      raise ValueError("explicit multi-process start needs all of --coordinator_address, "
                       f"--num_processes and --process_id; got {explicit}")
    if ":" not in coordinator_address:
      raise ValueError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                       f"{num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif mode == "auto":
    jax.distributed.initialize()
  else:
    return False
  logging.info("JAX distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
