"""Device mesh and shardings.

`jax.jit` with `in_shardings`/`out_shardings` over a `jax.sharding.Mesh` is what used to be
called pjit (pjit is deprecated and is the same machinery). This module builds the mesh from
config and the shardings the trainers use. Today: data parallel over all devices, parameters
replicated; the `fsdp` axis is in place for parameter sharding.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: Any = None, devices: list | None = None) -> Mesh:
  """Mesh with axes ('data', 'fsdp'); a size of -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": -1, "fsdp": 1}
  if mesh_cfg is not None:
    sizes.update({k: int(v) for k, v in dict(mesh_cfg).items()})
  unknown = set(sizes) - set(BATCH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; expected {BATCH_AXES}")
  known = math.prod(v for v in sizes.values() if v != -1)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
  if free:
    if len(devices) % known:
      raise ValueError(f"config.mesh {sizes}: {len(devices)} devices not divisible by {known}")
    sizes[free[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"have {len(devices)}")
  grid = np.asarray(devices).reshape([sizes[a] for a in BATCH_AXES])
  return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)
