"""The run setup both trainers share, around their own model, data and step:

- `mesh_and_local_batch`: the device mesh and this process's share of the global batch;
- `state_shardings`: the shardings of the train state `init_fn` builds (`config.sharding`);
- `init_or_restore`: the checkpoint manager and the state, resumed from the newest checkpoint
  that loads (with the data iterator's position), else built fresh and, on a fresh start only,
  passed through the trainer's own `init_from`;
- `jit_train_step`: the step wrapped by `guard_nonfinite`, jitted with explicit shardings
  (state, batch split over the data axes, then any extra arguments) and the state donated.

Everything comes in as explicit arguments, not the config, so each trainer says which fields
it reads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from dq import checkpoint as ckpt
from dq import sharding as sh
from dq.train.loop import check_batch_size, guard_nonfinite
from dq.train.state import abstract_with_shardings, sharded_init

InitFn = Callable[[jax.Array], Any]  # rng -> train state


@dataclasses.dataclass
class RunState:
  """What `init_or_restore` gives: the state, its checkpoint manager, and whether the state
  came from a checkpoint of the workdir (False: built fresh, `init_from` applied if given)."""
  state: Any
  manager: ocp.CheckpointManager
  restored: bool


def mesh_and_local_batch(mesh_cfg: Any, batch_size: int,
                         field: str = "config.train.batch_size") -> tuple[Mesh, int]:
  """(mesh from `mesh_cfg`, per-process batch); raises unless `batch_size` divides over the
  data-parallel devices and the processes (`field` names it in the message)."""
  mesh = sh.make_mesh(mesh_cfg)
  return mesh, check_batch_size(batch_size, mesh, field)


def state_shardings(init_fn: InitFn, rng: jax.Array, mesh: Mesh, sharding_cfg: Any = None
                    ) -> Any:
  """Shardings of the state `init_fn(rng)` builds, from `config.sharding` (nothing allocated)."""
  return sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh, sharding_cfg)


def init_or_restore(init_fn: InitFn, rng: jax.Array, shardings: Any, workdir: str, *,
                    keep: int, async_save: bool, data_iterator: Any,
                    allow_data_restart: bool = False,
                    init_from: Optional[Callable[[Any, Any], Any]] = None) -> RunState:
  """The state of WORKDIR's newest checkpoint that loads (the data iterator restored with it),
  else `init_fn(rng)` built in place with `shardings`, then `init_from(state, abstract)` when
  given (fresh starts only; `abstract` is the state's ShapeDtypeStructs with shardings).

  `keep`, `async_save`: the checkpoint manager's. The errors are `ckpt.restore_latest`'s.
  """
  manager = ckpt.make_manager(workdir, keep=keep, async_save=async_save)
  restored = ckpt.restore_latest(
      manager, lambda: abstract_with_shardings(init_fn, rng, shardings), data_iterator,
      allow_data_restart=allow_data_restart)
  if restored is not None:
    return RunState(state=restored[0], manager=manager, restored=True)
  state, _ = sharded_init(init_fn, rng, lambda _: shardings)
  if init_from is not None:
    state = init_from(state, abstract_with_shardings(init_fn, rng, shardings))
  return RunState(state=state, manager=manager, restored=False)


def jit_train_step(update_fn: Callable[..., tuple[Any, dict]], mesh: Mesh, shardings: Any,
                   extra_in_shardings: Sequence[Any] = ()) -> Callable[..., tuple[Any, dict]]:
  """`update_fn(state, batch, *extra) -> (state, metrics)` guarded against non-finite steps
  (`guard_nonfinite`) and jitted: state in `shardings` (donated), batch split over the data
  axes, `extra` in `extra_in_shardings`; metrics come out replicated."""
  return jax.jit(guard_nonfinite(update_fn),
                 in_shardings=(shardings, sh.batch_sharding(mesh), *extra_in_shardings),
                 out_shardings=(shardings, sh.replicated(mesh)), donate_argnums=0)
