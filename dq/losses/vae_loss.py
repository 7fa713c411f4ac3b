"""Stage-1 generator loss: a weighted sum of named terms, each one logged.

Terms: L1 reconstruction, LPIPS perceptual (when `perceptual_weight > 0`), codebook
(commitment) loss, budget loss (feature router only: the entropy router has no learnable gate).
The adversarial term is added by the train step (`dq/train/vae_step.py`), which needs the
discriminator and the adaptive weight.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from dq.losses.budget import budget_loss, budget_loss_triple


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


def vae_loss(x: jnp.ndarray, outputs: dict, *, loss_cfg: Any, router_cfg: Any,
             num_grains: int, perceptual: Callable | None = None) -> tuple[jnp.ndarray, dict]:
  """Returns (total loss, {term name: unweighted value}) for one batch.

  x: [B, H, W, 3] in [-1, 1]; outputs: the DQVAE output dict; perceptual: (x, y) -> [B].
  """
  nll, terms = reconstruction_loss(x, outputs["xrec"], loss_cfg, perceptual)
  terms["codebook"] = outputs["codebook_loss"]
  weights = {"codebook": loss_cfg.codebook_weight}
  if router_cfg.kind == "feature" and loss_cfg.budget_weight > 0:
    if num_grains == 2:
      terms["budget"] = budget_loss(outputs["gate"], router_cfg.fine_ratio,
                                    gamma=loss_cfg.budget_gamma,
                                    calculate_all=loss_cfg.budget_calculate_all)
    else:
      terms["budget"] = budget_loss_triple(outputs["gate"], router_cfg.median_ratio,
                                           router_cfg.fine_ratio, gamma=loss_cfg.budget_gamma)
    weights["budget"] = loss_cfg.budget_weight
  total = nll + sum(weights[k] * terms[k] for k in weights)
  return total, terms
