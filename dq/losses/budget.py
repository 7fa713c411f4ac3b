"""Budget penalty that keeps the router's fine-grain ratio near a target.

Gates are [B, h, w, G] (one-hot, straight-through in training), index 0 = coarsest grain.
Dual grain (official `BudgetConstraint_RatioMSE_DualGrain`): with code costs 1 (coarse) and
4 (fine) and n = h*w regions, `r = (mean_b sum(cost * g) - n) / (3 n)` (the fraction of fine
regions for a one-hot gate) and the loss is `gamma * (r - target)^2`. The official
`calculate_all` variant returns the complement term `gamma * ((1 - r) - (1 - target))^2` twice,
which is `2 * gamma * (r - target)^2`; this module reproduces that value.
Triple grain, official (`BudgetConstraint_NormedSeperateRatioMSE_TripleGrain`, the default):
per image `s_m = sum(g0 + 4 g1 + g2)` and `s_f = sum(g0 + g1 + 16 g2)` over the n coarse regions,
`r_m = (mean_b s_m - n) / (3 n)`, `r_f = (mean_b s_f - n) / (15 n)` and the loss is
`gamma * (r_f - t_f)^2 + (r_m - t_m)^2` (gamma on the fine term only). The cost-weighted sums
give the coarse channel a gradient too. Triple grain, 'fractions' (this project's earlier
form): `r_m`, `r_f` are the plain fractions of median and fine regions and the loss is
`gamma * ((r_m - t_m)^2 + (r_f - t_f)^2)`.

Every function takes a one-hot (hard, straight-through) gate or soft gate probabilities: with
`softmax(logits)` the ratios are expected ratios (the noise-free budget, `loss.budget_on =
'expected'`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dq import fields
from dq.models.grains import GrainTargets


def _check_gate(gate: jax.Array, num_grains: int | None = None) -> None:
  if gate.ndim != 4:
    raise ValueError(f"gate must be [B, h, w, G]; got shape {gate.shape}")
  if num_grains is not None and gate.shape[-1] != num_grains:
    raise ValueError(f"gate has {gate.shape[-1]} grains; expected {num_grains}")


def fine_ratio(gate: jax.Array) -> jax.Array:
  """Fraction of regions coded at the finest grain (dual: the official cost formula)."""
  _check_gate(gate)
  gate = gate.astype(jnp.float32)
  if gate.shape[-1] == 2:
    regions = gate.shape[1] * gate.shape[2]
    cost = jnp.sum(gate[..., 0] + 4.0 * gate[..., 1], axis=(1, 2))  # [B]
    return (jnp.mean(cost) - regions) / (regions * 3.0)
  return jnp.mean(gate[..., -1])


def grain_ratio(gate: jax.Array, grain: int) -> jax.Array:
  """Fraction of regions coded at granularity `grain` (mean of that gate channel)."""
  _check_gate(gate)
  return jnp.mean(gate[..., grain].astype(jnp.float32))


def budget_loss(gate: jax.Array, target: float, gamma: float = 10.0,
                calculate_all: bool = True) -> jax.Array:
  """Dual-grain budget loss: gamma*(r - target)^2, doubled when `calculate_all` (official)."""
  _check_gate(gate, 2)
  ratio = fine_ratio(gate)
  if calculate_all:
    return 2.0 * gamma * jnp.square((1.0 - ratio) - (1.0 - target))
  return gamma * jnp.square(ratio - target)


TRIPLE_FORMS = ("official", "fractions")


def triple_cost_ratios(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Official triple-grain ratios (r_median, r_fine) from the cost-weighted sums."""
  _check_gate(gate, 3)
  gate = gate.astype(jnp.float32)
  n = gate.shape[1] * gate.shape[2]
  g0, g1, g2 = gate[..., 0], gate[..., 1], gate[..., 2]
  s_m = jnp.sum(g0 + 4.0 * g1 + g2, axis=(1, 2))  # [B]
  s_f = jnp.sum(g0 + g1 + 16.0 * g2, axis=(1, 2))
  return (jnp.mean(s_m) - n) / (3.0 * n), (jnp.mean(s_f) - n) / (15.0 * n)


def budget_loss_triple(gate: jax.Array, target_median: float, target_fine: float,
                       gamma: float = 10.0, form: str = "official") -> jax.Array:
  """Triple-grain budget loss (see the module docstring): 'official' is
  gamma*(r_f - t_f)^2 + (r_m - t_m)^2 with the cost-weighted ratios; 'fractions' is
  gamma*((r_median - t_median)^2 + (r_fine - t_fine)^2) with the plain fractions."""
  _check_gate(gate, 3)
  if form == "official":
    r_median, r_fine = triple_cost_ratios(gate)
    return gamma * jnp.square(r_fine - target_fine) + jnp.square(r_median - target_median)
  if form == "fractions":
    return gamma * (jnp.square(grain_ratio(gate, 1) - target_median)
                    + jnp.square(grain_ratio(gate, 2) - target_fine))
  raise ValueError(f"triple budget form must be one of {TRIPLE_FORMS}; got {form!r}")


BUDGET_ON = ("hard", "expected")


@dataclasses.dataclass(frozen=True)
class BudgetLoss:
  """The feature router's budget term with its fields (`config.loss.budget_*`) and targets
  (`model.router.fine_ratio` / `median_ratio`, see `dq.models.grains`), checked on creation.

  on: 'hard' (the paper: the budget of the sampled straight-through gate) or 'expected' (of
  `softmax(logits)`, free of Gumbel noise); triple_form: 'official' | 'fractions';
  calculate_all: the official dual-grain doubling (see the module docstring).
  """
  targets: GrainTargets
  gamma: float = 10.0
  calculate_all: bool = True
  on: str = "hard"
  triple_form: str = "official"

  def __post_init__(self):
    fields.choice("loss.budget_on", self.on, BUDGET_ON)
    fields.choice("loss.budget_triple", self.triple_form, TRIPLE_FORMS)
    object.__setattr__(self, "gamma", fields.number("loss.budget_gamma", self.gamma, low=0.0))

  @classmethod
  def from_config(cls, loss_cfg: Any, targets: GrainTargets) -> "BudgetLoss":
    """From the `loss` section's budget fields and the router's grain targets
    (`GrainTargets.from_router(config.model.router, num_grains)`)."""
    return cls(targets=targets, gamma=loss_cfg.budget_gamma,
               calculate_all=bool(loss_cfg.budget_calculate_all),
               on=loss_cfg.get("budget_on", "hard"),
               triple_form=loss_cfg.get("budget_triple", "official"))

  def __call__(self, outputs: dict) -> jax.Array:
    """The loss for a DQVAE output dict (its `gate`, or `gate_logits` when on='expected')."""
    if self.on == "hard":
      gate = outputs["gate"]
    else:
      gate = jax.nn.softmax(outputs["gate_logits"].astype(jnp.float32), axis=-1)
    if self.targets.num_grains == 2:
      return budget_loss(gate, self.targets.fine, gamma=self.gamma,
                         calculate_all=self.calculate_all)
    return budget_loss_triple(gate, self.targets.median, self.targets.fine, gamma=self.gamma,
                              form=self.triple_form)
