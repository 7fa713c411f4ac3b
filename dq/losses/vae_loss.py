"""Stage-1 generator loss: a weighted sum of named terms, each one logged.

Terms today: L1 reconstruction, codebook (commitment) loss, budget loss (feature router
only: the entropy router has no learnable gate). The perceptual (LPIPS) and adversarial terms
plug in here as further entries of `terms`, each with its `*_weight` in `config.loss`.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dq.losses.budget import budget_loss, budget_loss_triple


def l1_loss(x: jnp.ndarray, xrec: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - xrec.astype(jnp.float32)))


def vae_loss(x: jnp.ndarray, outputs: dict, *, loss_cfg: Any, router_cfg: Any,
             num_grains: int) -> tuple[jnp.ndarray, dict]:
  """Returns (total loss, {term name: unweighted value}) for one batch.

  x: [B, H, W, 3] in [-1, 1]; outputs: the DQVAE output dict.
  """
  terms = {
      "l1": l1_loss(x, outputs["xrec"]),
      "codebook": outputs["codebook_loss"],
  }
  weights = {"l1": loss_cfg.l1_weight, "codebook": loss_cfg.codebook_weight}
  if router_cfg.kind == "feature" and loss_cfg.budget_weight > 0:
    if num_grains == 2:
      terms["budget"] = budget_loss(outputs["gate"], router_cfg.fine_ratio,
                                    gamma=loss_cfg.budget_gamma,
                                    calculate_all=loss_cfg.budget_calculate_all)
    else:
      terms["budget"] = budget_loss_triple(outputs["gate"], router_cfg.median_ratio,
                                           router_cfg.fine_ratio, gamma=loss_cfg.budget_gamma)
    weights["budget"] = loss_cfg.budget_weight
  total = sum(weights[k] * terms[k] for k in terms)
  return total, terms
