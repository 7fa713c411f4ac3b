"""Device mesh and shardings.

`jax.jit` with `in_shardings`/`out_shardings` over a `jax.sharding.Mesh` is what used to be
called pjit (pjit is deprecated and is the same machinery). This module builds the mesh from
config and the shardings the trainers use:

- mesh axes `data`, `fsdp` and `tensor` (sizes from `config.mesh`, -1 = the remaining devices);
- the batch is split over data x fsdp (replicated over `tensor`), and `constrain_batch` pins
  large activations (logits, decoder outputs) to that split inside the step;
- parameters and optimizer state follow `config.sharding`: regex rules first (first match wins,
  searched in the '/'-joined path, so a rule for `.*/kernel` also covers the optimizer's moments
  of that kernel), then FSDP for arrays of at least `fsdp_min_size` elements (their largest
  dimension divisible by the fsdp size is split), else replicated.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_FSDP_MIN_SIZE = 2**18


def make_mesh(mesh_cfg: Any = None, devices: list | None = None) -> Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor'); a size of -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": -1, "fsdp": 1, "tensor": 1}
  if mesh_cfg is not None:
    sizes.update({k: int(v) for k, v in dict(mesh_cfg).items()})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  bad = {k: v for k, v in sizes.items() if v < 1 and v != -1}
  if bad:
    raise ValueError(f"config.mesh: sizes must be >= 1 or -1 (the rest); got {bad}")
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
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain_batch(x: jax.Array, sharding: NamedSharding | None, batch_axis: int = 0
                    ) -> jax.Array:
  """Pins axis `batch_axis` of activation x to the batch split of `sharding` (normally
  `batch_sharding(mesh)`), leaving XLA free on every other axis (so a vocab axis may stay split
  over `tensor`). No-op when `sharding` is None: step functions also run unjitted, meshless.
  """
  if sharding is None:
    return x
  batch_axes = sharding.spec[0] if len(sharding.spec) else None
  size = _axis_size(sharding.mesh, batch_axes)
  if x.shape[batch_axis] % size:
    raise ValueError(f"activation of shape {x.shape}: its batch axis {batch_axis} "
                     f"({x.shape[batch_axis]}) is not divisible by the {size} devices of the "
                     f"batch axes {batch_axes!r}; make the (per-microbatch) batch a multiple of "
                     f"the data-parallel size")
  spec = [P.UNCONSTRAINED] * x.ndim
  spec[batch_axis] = batch_axes
  return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, P(*spec)))


def split_microbatches(tree: Any, microbatches: int,
                       sharding: NamedSharding | None = None) -> Any:
  """[B, ...] arrays -> [microbatches, B / microbatches, ...]; slice m holds rows m, m + M, ...

  Strided slices keep each device's rows on that device when the batch is split over the mesh
  (every device's block holds B / (M * devices) rows of each slice), so the scan over slices
  needs no communication. `merge_microbatches` is the inverse.
  """
  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                       f"config.train.microbatches={microbatches}")
    sliced = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return constrain_batch(sliced, sharding, batch_axis=1)

  return jax.tree.map(split, tree)


def merge_microbatches(tree: Any) -> Any:
  """Inverse of `split_microbatches`: [M, B / M, ...] -> [B, ...] in the original row order."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def _path_string(path: Sequence[Any]) -> str:
  """'/'-joined names of a tree path (dict keys, attribute names, sequence indices)."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return "/".join(names)


def _check_rule(pattern: str, spec: Sequence[Any], mesh: Mesh) -> None:
  for axis in spec:
    for name in (axis if isinstance(axis, (tuple, list)) else (axis,)):
      if name is not None and name not in mesh.axis_names:
        raise ValueError(f"config.sharding.rules: rule {pattern!r} uses mesh axis {name!r}; "
                         f"expected one of {mesh.axis_names} or None")


def _axis_size(mesh: Mesh, axis: Any) -> int:
  names = axis if isinstance(axis, (tuple, list)) else (axis,)
  return math.prod(mesh.shape[n] for n in names if n is not None)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh,
                   rules: Iterable[tuple[str, Sequence[Any]]] = (),
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """PartitionSpec of one array from the rules, the FSDP size threshold, or replication.

  A rule's spec lists one mesh axis (or None, or a tuple of axes) per array dimension; a rule
  whose axes do not divide the array's dimensions is an error naming both.
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = tuple(spec)
      _check_rule(pattern, spec, mesh)
      if len(spec) > len(shape):
        raise ValueError(f"config.sharding.rules: rule {pattern!r} gives {len(spec)} axes for "
                         f"{path} of shape {tuple(shape)}")
      for dim, axis in zip(shape, spec):
        if axis is not None and dim % _axis_size(mesh, axis):
          raise ValueError(f"config.sharding.rules: rule {pattern!r} splits a dimension of size "
                           f"{dim} of {path} {tuple(shape)} over {axis!r} "
                           f"({_axis_size(mesh, axis)} devices), which does not divide it")
      return P(*spec)
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp == 0:
        return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Iterable[tuple[str, Sequence[Any]]] = (),
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs)."""
  rules = [(str(pattern), tuple(spec)) for pattern, spec in rules]
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(
          _path_string(path), np.shape(leaf), mesh, rules, fsdp_min_size)), tree)


def state_shardings_from_config(abstract_state: Any, mesh: Mesh, sharding_cfg: Any = None) -> Any:
  """`tree_shardings` with `config.sharding` (rules: list of [regex, spec]; fsdp_min_size)."""
  sharding_cfg = dict(sharding_cfg or {})
  unknown = set(sharding_cfg) - {"rules", "fsdp_min_size"}
  if unknown:
    raise ValueError(f"config.sharding: unknown fields {sorted(unknown)}; expected 'rules' and "
                     "'fsdp_min_size'")
  rules = sharding_cfg.get("rules") or ()
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"config.sharding.rules: each rule is (regex, spec); got {rule!r}")
  return tree_shardings(abstract_state, mesh, rules,
                        int(sharding_cfg.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)))
