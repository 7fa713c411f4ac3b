"""Stage-1 generator loss: a weighted sum of named terms, each one logged.

Terms: L1 reconstruction, LPIPS perceptual (when `perceptual_weight > 0`), codebook
(commitment) loss, budget loss (feature router only: the entropy router has no learnable gate)
and, during a router warm-up, the router's imitation (distillation) loss.

Router loss fields (`config.loss`): the budget's `budget_gamma`, `budget_calculate_all`,
`budget_on`, `budget_triple` (`dq.losses.budget.BudgetLoss`, which owns and checks them);
`router_distill_weight` (cross-entropy of the router's logits against the warm-up teacher's
gate, while the teacher routes).
The adversarial term is added by the train step (`dq/train/vae_step.py`), which needs the
discriminator and the adaptive weight.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dq.losses.budget import BudgetLoss
from dq.models.grains import GrainTargets


def l1_loss(x: jnp.ndarray, xrec: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)))


def reconstruction_loss(x: jnp.ndarray, xrec: jnp.ndarray, loss_cfg: Any,
                        perceptual: Callable | None) -> tuple[jnp.ndarray, dict]:
  """The "nll" of the VQGAN recipe: l1_weight * L1 + perceptual_weight * LPIPS."""
  terms = {"l1": l1_loss(x, xrec)}
  total = loss_cfg.l1_weight * terms["l1"]
  if perceptual is not None and loss_cfg.get("perceptual_weight", 0.0) > 0:
    terms["perceptual"] = jnp.mean(perceptual(x, xrec))
    total = total + loss_cfg.perceptual_weight * terms["perceptual"]
  return total, terms


def router_budget(outputs: dict, loss_cfg: Any, router_cfg: Any, num_grains: int) -> jnp.ndarray:
  """The budget loss of the feature router on the hard gate or the expected (soft) one
  (`dq.losses.budget.BudgetLoss` from the config sections)."""
  targets = GrainTargets.from_router(router_cfg, num_grains)
  return BudgetLoss.from_config(loss_cfg, targets)(outputs)


def distill_loss(logits: jnp.ndarray, teacher_gate: jnp.ndarray) -> jnp.ndarray:
  """Mean cross-entropy of gate logits [B, h, w, G] against a one-hot teacher gate."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jax.lax.stop_gradient(teacher_gate) * log_probs, axis=-1))


def vae_loss(x: jnp.ndarray, outputs: dict, *, loss_cfg: Any, router_cfg: Any,
             num_grains: int, perceptual: Callable | None = None,
             teacher_gate: jnp.ndarray | None = None,
             teacher_weight: jnp.ndarray | float = 0.0) -> tuple[jnp.ndarray, dict]:
  """Returns (total loss, {term name: unweighted value}) for one batch.

  x: [B, H, W, 3] in [-1, 1]; outputs: the DQVAE output dict; perceptual: (x, y) -> [B].
  teacher_gate [B, h, w, G] (router warm-up): adds `router_distill`, weighted by
  `loss.router_distill_weight * teacher_weight` (teacher_weight 1 while the teacher routes).
  """
  nll, terms = reconstruction_loss(x, outputs["xrec"], loss_cfg, perceptual)
  terms["codebook"] = outputs["codebook_loss"]
  weights = {"codebook": loss_cfg.codebook_weight}
  if router_cfg.kind == "feature" and loss_cfg.budget_weight > 0:
    terms["budget"] = router_budget(outputs, loss_cfg, router_cfg, num_grains)
    weights["budget"] = loss_cfg.budget_weight
  if router_cfg.kind == "feature" and teacher_gate is not None:
    terms["router_distill"] = distill_loss(outputs["gate_logits"], teacher_gate)
    weights["router_distill"] = loss_cfg.get("router_distill_weight", 1.0) * teacher_weight
  total = nll + sum(weights[k] * terms[k] for k in weights)
  return total, terms
