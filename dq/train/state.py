"""Train state for stage 1 and the jitted, sharded init."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray      # [] int32
  params: Any
  opt_state: Any
  codebook: Any          # EMA codebook collection (not touched by the optimizer)
  rng: jnp.ndarray       # [2] uint32 base key; per-step keys are fold_in(rng, step)
  disc_params: Any = flax.struct.field(default_factory=dict)       # PatchGAN ({} if unused)
  disc_batch_stats: Any = flax.struct.field(default_factory=dict)
  disc_opt_state: Any = flax.struct.field(default_factory=dict)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                 sharding_fn: Callable[[Any], Any]) -> tuple[Any, Any]:
  """`jax.eval_shape` first, then a jitted init with `out_shardings`.

  Nothing is materialised whole on one device: each array is created where its sharding says.
  Returns (state, state shardings).
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding_fn(abstract)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return state, shardings


def abstract_with_shardings(init_fn, rng, shardings) -> Any:
  abstract = jax.eval_shape(init_fn, rng)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
