"""Adversarial losses and the adaptive generator weight (VQGAN recipe)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dq import fields

DISC_LOSSES = ("hinge", "non_saturating")  # config.loss.disc_loss


@dataclasses.dataclass(frozen=True)
class AdversarialLoss:
  """The GAN term's hyperparameters (`config.loss.disc_*`, `adaptive_weight_max`), checked
  on creation: the generator term is `weight * adaptive weight * generator_loss` from step
  `start` on; `kind` is the discriminator / generator loss pair."""
  weight: float = 0.0
  start: int = 0
  kind: str = "hinge"
  adaptive_weight_max: float = 1e4

  def __post_init__(self):
    object.__setattr__(self, "weight", fields.number("loss.disc_weight", self.weight, low=0.0))
    object.__setattr__(self, "start", fields.integer("loss.disc_start", self.start, 0))
    if self.weight > 0:
      fields.choice("loss.disc_loss", self.kind, DISC_LOSSES)
    object.__setattr__(self, "adaptive_weight_max", fields.number(
        "loss.adaptive_weight_max", self.adaptive_weight_max, low=0.0, low_open=True))

  @classmethod
  def from_config(cls, loss_cfg: Any) -> "AdversarialLoss":
    return cls(weight=loss_cfg.get("disc_weight", 0.0), start=loss_cfg.get("disc_start", 0),
               kind=loss_cfg.get("disc_loss", "hinge"),
               adaptive_weight_max=loss_cfg.get("adaptive_weight_max", 1e4))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_loss(logits_fake: jax.Array, kind: str) -> jax.Array:
  """hinge: -E[D(G)]; non_saturating: E[softplus(-D(G))]."""
  if kind == "hinge":
    return -jnp.mean(logits_fake)
  return jnp.mean(jax.nn.softplus(-logits_fake))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return hinge_d_loss(logits_real, logits_fake)
  if kind == "non_saturating":
    return non_saturating_d_loss(logits_real, logits_fake)
  raise ValueError(f"config.loss.disc_loss={kind!r}: expected one of {DISC_LOSSES}")


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, max_weight: float = 1e4) -> jax.Array:
  """||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clipped to [0, max_weight],
  with no gradient through it."""
  w = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def adopt_weight(step: jax.Array, start: int) -> jax.Array:
  """1.0 from `start` on, 0.0 before (the GAN switches on at `disc_start`)."""
  return (step >= start).astype(jnp.float32)
