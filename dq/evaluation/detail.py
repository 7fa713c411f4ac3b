"""How well the chosen granularity follows a ground-truth detail mask (numpy)."""
from __future__ import annotations

import math

import numpy as np


def _ratio(numerator: int, denominator: int) -> float:
  return numerator / denominator if denominator else math.nan


def _mean(values: np.ndarray) -> float:
  return float(values.mean()) if values.size else math.nan


def detail_overlap(grain: np.ndarray, detail_mask: np.ndarray, finest_grain: int,
                   min_coverage: float = 0.1) -> dict[str, float]:
  """Agreement between fine-grain regions and detailed regions.

  A region is *detailed* when `detail_mask` covers at least `min_coverage` of
  its pixels, and *fine* when its grain equals `finest_grain`; every other
  region counts as coarse.

  Args:
    grain: chosen granularity per region [B, h, w] int.
    detail_mask: per-pixel detail weight [B, H, W] in [0, 1]; h divides H, w divides W.
    finest_grain: the grain index of the finest granularity (1 dual, 2 triple).
    min_coverage: coverage from which a region is detailed.

  Returns:
    Dict: `precision` (detailed among fine), `recall` (fine among detailed),
    `base_rate` (detailed among all), `lift` (precision / base_rate),
    `fine_coverage` / `coarse_coverage` (mean mask coverage of fine / coarse
    regions) and the counts `num_regions`, `num_fine`, `num_detailed`. A ratio
    with an empty denominator is NaN.
  """
  grain = np.asarray(grain)
  mask = np.asarray(detail_mask, np.float64)
  if grain.ndim != 3 or mask.ndim != 3 or grain.shape[0] != mask.shape[0]:
    raise ValueError(f"detail_overlap expects grain [B, h, w] and detail_mask [B, H, W]; "
                     f"got {grain.shape} and {mask.shape}")
  batch, rows, cols = grain.shape
  height, width = mask.shape[1:]
  if height % rows or width % cols:
    raise ValueError(f"grain grid {rows}x{cols} does not divide the mask size {height}x{width}")
  coverage = mask.reshape(batch, rows, height // rows, cols, width // cols).mean(axis=(2, 4))
  detailed = coverage >= min_coverage  # [B, h, w]
  fine = grain == finest_grain  # [B, h, w]
  num_fine, num_detailed = int(fine.sum()), int(detailed.sum())
  num_both = int((fine & detailed).sum())
  precision = _ratio(num_both, num_fine)
  base_rate = _ratio(num_detailed, grain.size)
  return {
      "precision": precision,
      "recall": _ratio(num_both, num_detailed),
      "base_rate": base_rate,
      "lift": precision / base_rate if base_rate else math.nan,
      "fine_coverage": _mean(coverage[fine]),
      "coarse_coverage": _mean(coverage[~fine]),
      "num_regions": int(grain.size),
      "num_fine": num_fine,
      "num_detailed": num_detailed,
  }
