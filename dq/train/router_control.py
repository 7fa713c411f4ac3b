"""Per-step controls of the learned (feature) router during stage-1 training.

`router_steering(router_cfg, step, x, teacher_thresholds, patch_size)` gives the keyword
arguments of `DQVAE.__call__` for one training step and the warm-up teacher's gate:
- the Gumbel temperature of the step: constant `router.gumbel_temperature`, or a geometric
  anneal to `router.gumbel_temperature_end` over `router.temperature_steps` steps;
- during the first `router.warmup_steps` steps, the entropy router's gate (thresholds for
  `router.fine_ratio`) routes the regions, and the loss adds the router's imitation of it
  (`loss.router_distill_weight`). The router's own decisions take over at step K.
All of it is traced (the step is a traced scalar), so one compiled step serves every phase.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dq.models.entropy import patch_entropy
from dq.models.router import entropy_gate


def gumbel_temperature(router_cfg: Any, step: jax.Array) -> jax.Array:
  """t0 * (t1 / t0) ** min(step / N, 1) (constant t0 when N = 0 or t1 = t0)."""
  t0 = float(router_cfg.gumbel_temperature)
  t1 = float(router_cfg.get("gumbel_temperature_end", t0))
  steps = int(router_cfg.get("temperature_steps", 0))
  if steps <= 0 or t1 == t0:
    return jnp.asarray(t0, jnp.float32)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)
  return jnp.asarray(t0, jnp.float32) * jnp.power(t1 / t0, progress)


def needs_teacher(router_cfg: Any) -> bool:
  """True when the feature router has an entropy warm-up (it then needs entropy thresholds)."""
  return router_cfg.kind == "feature" and int(router_cfg.get("warmup_steps", 0)) > 0


def router_steering(router_cfg: Any, step: jax.Array, x: jax.Array,
                    teacher_thresholds: Sequence[float], patch_size: int
                    ) -> tuple[dict, jax.Array | None, jax.Array]:
  """Returns (DQVAE keyword arguments, teacher gate [B, hc, wc, G] or None, teacher weight).

  x: the step's images [B, H, W, 3]; patch_size: the coarsest downsampling factor.
  The teacher weight is 1.0 while the teacher routes (step < warmup_steps), else 0.0.
  """
  if router_cfg.kind != "feature":
    return {}, None, jnp.zeros((), jnp.float32)
  kwargs = {"temperature": gumbel_temperature(router_cfg, step)}
  if not needs_teacher(router_cfg):
    return kwargs, None, jnp.zeros((), jnp.float32)
  if not teacher_thresholds:
    raise ValueError("model.router.warmup_steps > 0 needs the entropy router's thresholds for "
                     "the warm-up teacher (make_update_fn(..., teacher_thresholds=...))")
  teacher = entropy_gate(jax.lax.stop_gradient(patch_entropy(x, patch_size)),
                         teacher_thresholds)
  active = jnp.asarray(step) < int(router_cfg.warmup_steps)
  kwargs.update(route_gate=teacher, use_route_gate=active)
  return kwargs, teacher, active.astype(jnp.float32)
