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


def region_l1(x: jax.Array, xrec: jax.Array, patch_size: int) -> jax.Array:
  """Mean |x - xrec| per coarse region: images [B, H, W, 3] -> [B, H / p, W / p]."""
  b, h, w, _ = x.shape
  err = jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)).mean(axis=-1)
  return err.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size).mean((2, 4))


def benefit_target(x: jax.Array, xrec: jax.Array, xrec_flipped: jax.Array, grain: jax.Array,
                   fine_ratio: float, patch_size: int) -> tuple[jax.Array, jax.Array]:
  """The regions where the fine grain helps most, measured (dual grain).

  `xrec` is the step's reconstruction with grain map `grain` [B, hc, wc] (0 coarse, 1 fine),
  `xrec_flipped` the same images with every region at the other grain. The benefit of fine
  coding is `L1 per region when coarse - L1 per region when fine`; the fraction `fine_ratio`
  of the batch's regions with the largest benefit are the target fine regions (so the target
  spends exactly the budget, across the batch's images as the budget loss does).

  Returns (one-hot target gate [B, hc, wc, 2], benefit [B, hc, wc]), both without gradient.
  """
  main = region_l1(x, xrec, patch_size)
  flipped = region_l1(x, xrec_flipped, patch_size)
  fine = grain == 1
  benefit = jnp.where(fine, flipped, main) - jnp.where(fine, main, flipped)
  benefit = jax.lax.stop_gradient(benefit)
  threshold = jnp.quantile(benefit, 1.0 - fine_ratio)
  # At fine_ratio 1 the threshold is the minimum, which `>` alone would leave coarse.
  target = ((benefit > threshold) | (fine_ratio >= 1.0)).astype(jnp.int32)
  return jax.nn.one_hot(target, 2, dtype=jnp.float32), benefit
