"""Per-step controls of the learned (feature) router during stage-1 training.

`router_steering(router_cfg, step, x, teacher_thresholds, patch_size)` gives the keyword
arguments of `DQVAE.__call__` for one training step and the warm-up teacher's gate:
- the Gumbel temperature of the step: constant `router.gumbel_temperature`, or a geometric
  anneal to `router.gumbel_temperature_end` over `router.temperature_steps` steps;
- during the first `router.warmup_steps` steps, a teacher's gate routes the regions, and the
  loss adds the router's imitation of it (`loss.router_distill_weight`) for the first
  `router.distill_steps` steps (0: as long as the teacher routes; -1: all of training). The
  router's own decisions take over at step `warmup_steps`. Teachers (`router.teacher`):
  'entropy' (the entropy router's gate, thresholds for `router.fine_ratio`) or 'detail' (the
  regions of the batch with the most detail lost at half resolution, `patch_detail`: the
  `fine_ratio` (and `median_ratio`) of them with the highest scores).
All of it is traced (the step is a traced scalar), so one compiled step serves every phase.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dq import fields

from dq.models.entropy import patch_entropy
from dq.models.grains import GrainTargets
from dq.models.router import entropy_gate, needs_teacher

TEACHERS = ("entropy", "detail")


@dataclasses.dataclass(frozen=True)
class RouterSchedule:
  """The learned router's per-step controls (`model.router` fields), checked on creation:
  the Gumbel temperature `temperature` -> `temperature_end` over `temperature_steps` steps
  (0: constant), the teacher routing for `warmup_steps` steps and imitated for `distill_steps`
  (0: the warm-up, -1: all training), `teacher` in TEACHERS."""
  temperature: float = 1.0
  temperature_end: float = 1.0
  temperature_steps: int = 0
  warmup_steps: int = 0
  distill_steps: int = 0
  teacher: str = "entropy"

  def __post_init__(self):
    checked = {
        "temperature": fields.number("model.router.gumbel_temperature", self.temperature,
                                     low=0.0, low_open=True),
        "temperature_end": fields.number("model.router.gumbel_temperature_end",
                                         self.temperature_end, low=0.0, low_open=True),
        "temperature_steps": fields.integer("model.router.temperature_steps",
                                            self.temperature_steps, 0),
        "warmup_steps": fields.integer("model.router.warmup_steps", self.warmup_steps, 0),
        "distill_steps": fields.integer("model.router.distill_steps", self.distill_steps, -1),
        "teacher": fields.choice("model.router.teacher", self.teacher, TEACHERS)}
    for name, value in checked.items():
      object.__setattr__(self, name, value)

  @classmethod
  def from_router(cls, router_cfg: Any) -> "RouterSchedule":
    """From a `model.router` section (missing fields: the paper's constant temperature and
    no teacher)."""
    t0 = router_cfg.gumbel_temperature
    return cls(temperature=t0, temperature_end=router_cfg.get("gumbel_temperature_end", t0),
               temperature_steps=router_cfg.get("temperature_steps", 0),
               warmup_steps=router_cfg.get("warmup_steps", 0),
               distill_steps=router_cfg.get("distill_steps", 0),
               teacher=router_cfg.get("teacher", "entropy"))

  def temperature_at(self, step: jax.Array) -> jax.Array:
    """t0 * (t1 / t0) ** min(step / N, 1) (constant t0 when N = 0 or t1 = t0)."""
    t0, t1, steps = self.temperature, self.temperature_end, self.temperature_steps
    if steps <= 0 or t1 == t0:
      return jnp.asarray(t0, jnp.float32)
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)
    return jnp.asarray(t0, jnp.float32) * jnp.power(t1 / t0, progress)


def gumbel_temperature(router_cfg: Any, step: jax.Array) -> jax.Array:
  """The step's Gumbel temperature (`RouterSchedule.temperature_at`)."""
  return RouterSchedule.from_router(router_cfg).temperature_at(step)


def patch_detail(x: jax.Array, patch_size: int) -> jax.Array:
  """Detail score per region [B, H / p, W / p]: mean |x - up2(avgpool2(x))| over the region,
  i.e. what a half-resolution copy of the image loses there (high-frequency energy)."""
  b, h, w, c = x.shape
  x = x.astype(jnp.float32)
  low = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  low = jnp.repeat(jnp.repeat(low, 2, axis=1), 2, axis=2)
  return region_l1(x, low, patch_size)


def top_fraction_gate(score: jax.Array, fine_ratio: float, median_ratio: float = 0.0,
                      num_grains: int = 2) -> jax.Array:
  """One-hot gate [B, h, w, G]: the batch's regions with the highest `score` [B, h, w] go to
  the finest grain (a fraction `fine_ratio`), the next `median_ratio` to the median grain
  (triple), the rest to the coarsest."""
  flat = score.reshape(-1)
  fine_at = jnp.quantile(flat, 1.0 - fine_ratio)
  grain = (score > fine_at) | (fine_ratio >= 1.0)
  if num_grains == 2:
    return jax.nn.one_hot(grain.astype(jnp.int32), 2, dtype=jnp.float32)
  median_at = jnp.quantile(flat, max(0.0, 1.0 - fine_ratio - median_ratio))
  grains = jnp.where(grain, 2, jnp.where(score > median_at, 1, 0))
  return jax.nn.one_hot(grains, 3, dtype=jnp.float32)


def teacher_gate(router_cfg: Any, x: jax.Array, teacher_thresholds: Sequence[float],
                 patch_size: int, num_grains: int) -> jax.Array:
  """The warm-up teacher's one-hot gate [B, hc, wc, G] for images x (no gradient)."""
  x = jax.lax.stop_gradient(x)
  teacher = RouterSchedule.from_router(router_cfg).teacher  # checked: one of TEACHERS
  if teacher == "entropy":
    if not teacher_thresholds:
      raise ValueError("the entropy teacher (model.router.teacher='entropy') needs the entropy "
                       "router's thresholds (make_update_fn(..., teacher_thresholds=...))")
    return entropy_gate(patch_entropy(x, patch_size), teacher_thresholds)
  targets = GrainTargets.from_router(router_cfg, num_grains)  # teacher == "detail"
  return top_fraction_gate(patch_detail(x, patch_size), targets.fine, targets.median,
                           num_grains)


def router_steering(router_cfg: Any, step: jax.Array, x: jax.Array,
                    teacher_thresholds: Sequence[float], patch_size: int, num_grains: int = 2
                    ) -> tuple[dict, jax.Array | None, jax.Array]:
  """Returns (DQVAE keyword arguments, teacher gate [B, hc, wc, G] or None, teacher weight).

  x: the step's images [B, H, W, 3]; patch_size: the coarsest downsampling factor.
  The teacher weight (of the imitation loss) is 1.0 for step < distill_steps (0: the warm-up's
  length, -1: always), else 0.0; the teacher routes for step < warmup_steps.
  """
  if router_cfg.kind != "feature":
    return {}, None, jnp.zeros((), jnp.float32)
  schedule = RouterSchedule.from_router(router_cfg)
  kwargs = {"temperature": schedule.temperature_at(step)}
  if not needs_teacher(router_cfg):
    return kwargs, None, jnp.zeros((), jnp.float32)
  teacher = teacher_gate(router_cfg, x, teacher_thresholds, patch_size, num_grains)
  warmup = schedule.warmup_steps
  distill = schedule.distill_steps or warmup
  step = jnp.asarray(step)
  imitate = jnp.asarray(True) if distill < 0 else step < distill
  kwargs.update(route_gate=teacher, use_route_gate=step < warmup)
  return kwargs, teacher, imitate.astype(jnp.float32)


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
