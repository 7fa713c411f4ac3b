"""Grain targets and grain-map fractions: what `model.router.fine_ratio` / `median_ratio` mean.

One meaning for every router: **the fraction of regions coded at the finest grain** (and, for a
triple-grain model, at the median grain); the rest is coarse. Each router reaches it its own way:
- feature (learned) router: the budget loss pulls the coded fraction towards it
  (`dq.losses.budget.BudgetLoss`);
- entropy router: the entropy quantile that leaves that fraction above the threshold
  (`dq.models.entropy.thresholds_from_table`);
- fixed router: the fraction is 0 or 1, so it names one grain for every region
  (`GrainTargets.fixed_grain`);
- the warm-up teacher 'detail': the top fraction of regions by high-frequency detail.

`GrainTargets` checks the values where they are read (every entry point gets the same check;
`dq.validate` prints its FieldError as a failure line); `fine_fraction` is the one fine ratio
of a grain map (int [B, h, w], 0 = coarsest), for numpy and jax arrays alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dq.fields import FieldError, number


@dataclasses.dataclass(frozen=True)
class GrainTargets:
  """The fractions of regions coded at the finest (`fine`) and median (`median`, triple grain
  only) grain; `model.router.fine_ratio` / `median_ratio`."""
  fine: float
  median: float = 0.0
  num_grains: int = 2

  def __post_init__(self):
    if self.num_grains not in (2, 3):
      raise FieldError("model.num_grains", self.num_grains, "expected one of (2, 3)")
    object.__setattr__(self, "fine", number("model.router.fine_ratio", self.fine, 0.0, 1.0))
    median = (number("model.router.median_ratio", self.median, 0.0, 1.0)
              if self.num_grains == 3 else 0.0)
    if median + self.fine > 1.0:
      raise FieldError("model.router.median_ratio", self.median, f"expected median_ratio + "
                       f"fine_ratio <= 1 (fine_ratio {self.fine}; the rest is coarse)")
    object.__setattr__(self, "median", median)

  @classmethod
  def from_router(cls, router_cfg: Any, num_grains: int) -> "GrainTargets":
    """From a `model.router` section (median_ratio is read for triple grain only)."""
    median = router_cfg.get("median_ratio", 0.0) if int(num_grains) == 3 else 0.0
    return cls(fine=router_cfg.fine_ratio, median=median, num_grains=int(num_grains))

  @property
  def fixed_grain(self) -> int:
    """The grain of every region for the fixed router. Dual grain: fine 0.0 (all coarse,
    grain 0) or 1.0 (all fine, grain 1); triple grain: (median, fine) = (0, 0) coarse, (1, 0)
    median or (0, 1) fine. Anything else is a FieldError."""
    grains = {(0.0, 0.0): 0, (0.0, 1.0): self.num_grains - 1}
    if self.num_grains == 3:
      grains[(1.0, 0.0)] = 1
    if (self.median, self.fine) not in grains:
      expected = ("fine_ratio 0.0 (every region coarse) or 1.0 (every region fine)"
                  if self.num_grains == 2 else "(median_ratio, fine_ratio) = (0, 0) coarse, "
                  "(1, 0) median or (0, 1) fine")
      value = (self.median, self.fine) if self.num_grains == 3 else self.fine
      raise FieldError("model.router.fine_ratio", value,
                       f"the fixed router codes every region at one grain: expected {expected}")
    return grains[(self.median, self.fine)]


def fine_fraction(grain: Any, num_grains: int, per_image: bool = False) -> Any:
  """Fraction of regions at the finest grain of a grain map [B, h, w] (0 = coarsest): a scalar
  over the batch, or [B] with `per_image`. Works on numpy and jax arrays (same type out)."""
  fine = (grain == num_grains - 1).reshape(grain.shape[0], -1)
  return fine.mean(axis=1) if per_image else fine.mean()


def grid_factors(ch_mult: Any, num_grains: int) -> tuple[int, ...]:
  """Downsampling factor of each grain, coarsest first: the encoder halves the resolution at
  each of its `len(ch_mult) - 1` levels, the coarsest grain is taken at the last level and each
  finer grain one level before (F = 2**(L-1), F/2, F/4). E.g. ch_mult (1, 1, 2, 2, 4), dual
  grain: (16, 8); triple grain with six levels: (32, 16, 8)."""
  levels = len(ch_mult)
  if levels < num_grains:
    raise ValueError(f"ch_mult {tuple(ch_mult)} has {levels} levels; {num_grains} grains need "
                     f"at least {num_grains}")
  return tuple(2 ** (levels - 1 - g) for g in range(num_grains))
