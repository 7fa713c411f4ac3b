"""Code statistics of coded images: codes per image, fine ratios, codebook use."""
from __future__ import annotations

import numpy as np

from dq.models.grains import fine_fraction
from dq.summaries.images import GRAIN_COLOURS


def check_grain(grain: np.ndarray, num_grains: int, name: str = "grain") -> np.ndarray:
  """Validates an int [B, h, w] grain map in [0, num_grains)."""
  grain = np.asarray(grain)
  if num_grains not in GRAIN_COLOURS:
    raise ValueError(f"num_grains must be one of {sorted(GRAIN_COLOURS)}; got {num_grains}")
  if grain.ndim != 3 or grain.size == 0 or not np.issubdtype(grain.dtype, np.integer):
    raise ValueError(f"{name} must be a non-empty int array [B, h, w]; got {grain.dtype} "
                     f"{grain.shape}")
  if grain.min() < 0 or grain.max() >= num_grains:
    raise ValueError(f"{name} values must be in [0, {num_grains}); got "
                     f"{grain.min()}..{grain.max()}")
  return grain


def codes_per_image(grain: np.ndarray, num_grains: int) -> np.ndarray:
  """Codes an image costs: a region of grain g spends 4**g codes. grain [B, h, w] -> int [B]."""
  grain = check_grain(grain, num_grains)
  return (4 ** grain.astype(np.int64)).reshape(len(grain), -1).sum(axis=1)


def fine_ratios(grain: np.ndarray, num_grains: int) -> np.ndarray:
  """Fraction of regions at the finest grain per image: grain [B, h, w] -> float64 [B]."""
  return fine_fraction(check_grain(grain, num_grains), num_grains, per_image=True)


def code_counts(codes: np.ndarray, grain: np.ndarray, codebook_size: int,
                num_grains: int) -> np.ndarray:
  """How often each codebook entry is emitted per image, counting each token once.

  `codes` is the finest grid, where a region of grain g repeats each of its 4**g codes over
  2**(G-1-g) x 2**(G-1-g) cells (G = num_grains); only the top-left cell of each such block
  is a token. So a row sums to `codes_per_image(grain)`.

  Args:
    codes: int [B, hf, wf], hf = h * 2**(G-1).
    grain: int [B, h, w].
    codebook_size: K.
    num_grains: 2 or 3.

  Returns:
    int64 [B, K].
  """
  grain = check_grain(grain, num_grains)
  codes = np.asarray(codes)
  split = 2**(num_grains - 1)
  batch, rows, cols = grain.shape
  if codes.shape != (batch, rows * split, cols * split):
    raise ValueError(f"codes must be [B, hf, wf] = {(batch, rows * split, cols * split)} for "
                     f"grain {grain.shape} and {num_grains} grains; got {codes.shape}")
  if codes.min() < 0 or codes.max() >= codebook_size:
    raise ValueError(f"codes must lie in [0, {codebook_size}); got {codes.min()}..{codes.max()}")
  cell_grain = np.repeat(np.repeat(grain, split, axis=1), split, axis=2)  # [B, hf, wf]
  stride = split // 2**cell_grain  # block side of one token, in finest cells
  row_in_region = (np.arange(rows * split) % split)[None, :, None]
  col_in_region = (np.arange(cols * split) % split)[None, None, :]
  is_token = (row_in_region % stride == 0) & (col_in_region % stride == 0)  # [B, hf, wf]
  flat = (np.arange(batch)[:, None, None] * codebook_size + codes)[is_token]
  return np.bincount(flat, minlength=batch * codebook_size).reshape(batch, codebook_size)
