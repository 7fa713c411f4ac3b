"""Stage-1 generator loss: a weighted sum of named terms, each one logged.

Terms: L1 reconstruction, LPIPS perceptual (when `perceptual_weight > 0`), codebook
(commitment) loss, budget loss (feature router only: the entropy router has no learnable gate)
and, during a router warm-up, the router's imitation (distillation) loss.

`Stage1Loss` holds the weights (checked on creation) and the budget; `vae_loss` builds it from
the config sections. Router loss fields (`config.loss`): the budget's `budget_gamma`,
`budget_calculate_all`, `budget_on`, `budget_triple` (`dq.losses.budget.BudgetLoss`, which
owns and checks them);
`router_distill_weight` (cross-entropy of the router's logits against the warm-up teacher's
gate, while the teacher routes).
The adversarial term is added by the train step (`dq/train/vae_step.py`), which needs the
discriminator and the adaptive weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dq import fields
from dq.losses.budget import BudgetLoss
from dq.models.grains import GrainTargets


def l1_loss(x: jnp.ndarray, xrec: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)))


def router_budget(outputs: dict, loss_cfg: Any, router_cfg: Any, num_grains: int) -> jnp.ndarray:
  """The budget loss of the feature router on the hard gate or the expected (soft) one
  (`dq.losses.budget.BudgetLoss` from the config sections)."""
  targets = GrainTargets.from_router(router_cfg, num_grains)
  return BudgetLoss.from_config(loss_cfg, targets)(outputs)


def distill_loss(logits: jnp.ndarray, teacher_gate: jnp.ndarray) -> jnp.ndarray:
  """Mean cross-entropy of gate logits [B, h, w, G] against a one-hot teacher gate."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jax.lax.stop_gradient(teacher_gate) * log_probs, axis=-1))


@dataclasses.dataclass(frozen=True)
class Stage1Loss:
  """The stage-1 generator loss with its hyperparameters (`config.loss` weights), checked on
  creation; `__call__` gives (total, {term: unweighted value}).

  budget: the learned router's budget (its targets and form); its term is added when
  `budget_weight > 0`. learned_router: the imitation term `router_distill` is added while a
  teacher gate is given (weight `distill_weight * teacher_weight`).
  """
  l1_weight: float = 1.0
  perceptual_weight: float = 0.0
  codebook_weight: float = 1.0
  budget_weight: float = 1.0
  distill_weight: float = 1.0
  learned_router: bool = False
  budget: BudgetLoss | None = None

  def __post_init__(self):
    for name in ("l1_weight", "perceptual_weight", "codebook_weight", "budget_weight",
                 "distill_weight"):
      field = "router_distill_weight" if name == "distill_weight" else name
      object.__setattr__(self, name, fields.number(f"loss.{field}", getattr(self, name),
                                                   low=0.0))

  @classmethod
  def from_config(cls, loss_cfg: Any, router_cfg: Any, num_grains: int) -> "Stage1Loss":
    """From the `loss` section and the model's `router` section (kind and grain targets)."""
    learned = router_cfg.kind == "feature"
    budget = (BudgetLoss.from_config(loss_cfg, GrainTargets.from_router(router_cfg, num_grains))
              if learned else None)
    return cls(**cls.weights_from(loss_cfg), learned_router=learned, budget=budget)

  @staticmethod
  def weights_from(loss_cfg: Any) -> dict:
    """The loss weights of a `loss` section, as Stage1Loss's keyword arguments."""
    return dict(l1_weight=loss_cfg.l1_weight,
                perceptual_weight=loss_cfg.get("perceptual_weight", 0.0),
                codebook_weight=loss_cfg.codebook_weight, budget_weight=loss_cfg.budget_weight,
                distill_weight=loss_cfg.get("router_distill_weight", 1.0))

  def reconstruction(self, x: jnp.ndarray, xrec: jnp.ndarray, perceptual: Callable | None
                     ) -> tuple[jnp.ndarray, dict]:
    """The "nll" of the VQGAN recipe: l1_weight * L1 + perceptual_weight * LPIPS."""
    terms = {"l1": l1_loss(x, xrec)}
    total = self.l1_weight * terms["l1"]
    if perceptual is not None and self.perceptual_weight > 0:
      terms["perceptual"] = jnp.mean(perceptual(x, xrec))
      total = total + self.perceptual_weight * terms["perceptual"]
    return total, terms

  def __call__(self, x: jnp.ndarray, outputs: dict, *, perceptual: Callable | None = None,
               teacher_gate: jnp.ndarray | None = None,
               teacher_weight: jnp.ndarray | float = 0.0) -> tuple[jnp.ndarray, dict]:
    """x: [B, H, W, 3] in [-1, 1]; outputs: the DQVAE output dict; perceptual: (x, y) -> [B];
    teacher_gate [B, h, w, G] during a router warm-up / imitation."""
    nll, terms = self.reconstruction(x, outputs["xrec"], perceptual)
    terms["codebook"] = outputs["codebook_loss"]
    weights = {"codebook": self.codebook_weight}
    if self.budget is not None and self.budget_weight > 0:
      terms["budget"] = self.budget(outputs)
      weights["budget"] = self.budget_weight
    if self.learned_router and teacher_gate is not None:
      terms["router_distill"] = distill_loss(outputs["gate_logits"], teacher_gate)
      weights["router_distill"] = self.distill_weight * teacher_weight
    total = nll + sum(weights[k] * terms[k] for k in weights)
    return total, terms


def vae_loss(x: jnp.ndarray, outputs: dict, *, loss_cfg: Any, router_cfg: Any,
             num_grains: int, perceptual: Callable | None = None,
             teacher_gate: jnp.ndarray | None = None,
             teacher_weight: jnp.ndarray | float = 0.0) -> tuple[jnp.ndarray, dict]:
  """Returns (total loss, {term name: unweighted value}) for one batch: `Stage1Loss` from the
  config sections (the step builds it once; this is the same loss for callers with a config).

  x: [B, H, W, 3] in [-1, 1]; outputs: the DQVAE output dict; perceptual: (x, y) -> [B].
  teacher_gate [B, h, w, G] (router warm-up): adds `router_distill`, weighted by
  `loss.router_distill_weight * teacher_weight` (teacher_weight 1 while the teacher routes).
  """
  loss = Stage1Loss.from_config(loss_cfg, router_cfg, num_grains)
  return loss(x, outputs, perceptual=perceptual, teacher_gate=teacher_gate,
              teacher_weight=teacher_weight)
