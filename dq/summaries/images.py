"""Summary pictures as uint8 arrays: the grain colours, [-1, 1] -> uint8, adaptive coding maps
(grain overlays), error heat maps and reconstruction grids.

Granularity colours (Okabe-Ito, colour-blind safe), grain 0 is the coarsest:
- dual grain: 0 coarse = blue (0, 114, 178), 1 fine = vermillion (213, 94, 0);
- triple grain: 0 coarse = blue, 1 median = bluish green (0, 158, 115),
  2 fine = vermillion.
"""
from __future__ import annotations

import numpy as np

BLUE = (0, 114, 178)
GREEN = (0, 158, 115)
VERMILLION = (213, 94, 0)
GRAIN_COLOURS = {2: (BLUE, VERMILLION), 3: (BLUE, GREEN, VERMILLION)}
SEPARATOR = 2
SEPARATOR_VALUE = 255


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Maps floats in [-1, 1] to uint8 [0, 255] (rounded, clipped)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def as_uint8_images(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x if x.dtype == np.uint8 else to_uint8(x)


def grain_overlay(image: np.ndarray, grain: np.ndarray, num_grains: int,
                  alpha: float = 0.35) -> np.ndarray:
  """Adaptive coding map: a tint per granularity and each region's cell borders.

  A region with grain g is split into 2**g x 2**g cells (g = 0 is the whole
  region). Each cell gets a 1-px border in its grain colour on its **last**
  pixel row and last pixel column, so borders lie exactly on cell boundaries
  (rows k * cell_height - 1) and a region only draws inside itself. Other
  pixels are blended: `(1 - alpha) * image + alpha * colour`.

  Args:
    image: uint8 [H, W, 3].
    grain: int [h, w] in [0, num_grains); H / h and W / w must be divisible
      by 2**(num_grains - 1).
    num_grains: 2 (dual) or 3 (triple).
    alpha: tint opacity in [0, 1].

  Returns:
    uint8 [H, W, 3].
  """
  image = np.asarray(image)
  grain = np.asarray(grain)
  if num_grains not in GRAIN_COLOURS:
    raise ValueError(f"num_grains must be one of {sorted(GRAIN_COLOURS)}; got {num_grains}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {image.shape}")
  if grain.ndim != 2 or grain.size == 0:
    raise ValueError(f"grain must be [h, w]; got shape {grain.shape}")
  if grain.min() < 0 or grain.max() >= num_grains:
    raise ValueError(f"grain values must be in [0, {num_grains}); got {grain.min()}..{grain.max()}")
  height, width = image.shape[:2]
  rows, cols = grain.shape
  finest_split = 2**(num_grains - 1)
  if height % (rows * finest_split) or width % (cols * finest_split):
    raise ValueError(f"image {height}x{width} is not divisible into {rows}x{cols} regions of "
                     f"{finest_split}x{finest_split} finest cells")
  region_h, region_w = height // rows, width // cols
  pixel_grain = np.repeat(np.repeat(grain, region_h, axis=0), region_w, axis=1)  # [H, W]
  cell_h = region_h // 2**pixel_grain  # [H, W]
  cell_w = region_w // 2**pixel_grain  # [H, W]
  row_in_region = (np.arange(height) % region_h)[:, None]  # [H, 1]
  col_in_region = (np.arange(width) % region_w)[None, :]  # [1, W]
  border = ((row_in_region % cell_h == cell_h - 1) |
            (col_in_region % cell_w == cell_w - 1))  # [H, W]
  colours = np.asarray(GRAIN_COLOURS[num_grains], np.float32)[pixel_grain]  # [H, W, 3]
  tinted = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  out = np.where(border[..., None], colours, tinted)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def error_heatmap(inputs: np.ndarray, recons: np.ndarray,
                  error_max: float | None = None) -> np.ndarray:
  """|input - recon| averaged over channels, coloured with 'inferno'.

  Args:
    inputs: float [B, H, W, 3] in [-1, 1].
    recons: float [B, H, W, 3] in [-1, 1].
    error_max: error shown at full scale; None uses the largest error here.

  Returns:
    uint8 [B, H, W, 3].
  """
  import matplotlib  # Deferred: only pictures need it.

  error = np.abs(np.asarray(inputs, np.float32) - np.asarray(recons, np.float32)).mean(-1)
  scale = float(error.max()) if error_max is None else float(error_max)
  normalised = np.clip(error / max(scale, 1e-6), 0.0, 1.0)  # [B, H, W]
  rgba = matplotlib.colormaps["inferno"](normalised)  # [B, H, W, 4]
  return np.round(rgba[..., :3] * 255).astype(np.uint8)


def tile(panels: list[list[np.ndarray]]) -> np.ndarray:
  """Rows of equal-size uint8 [H, W, 3] panels with separators between them."""
  height, width = panels[0][0].shape[:2]
  num_rows, num_cols = len(panels), len(panels[0])
  grid = np.full((num_rows * (height + SEPARATOR) - SEPARATOR,
                  num_cols * (width + SEPARATOR) - SEPARATOR, 3), SEPARATOR_VALUE, np.uint8)
  for r, row in enumerate(panels):
    for c, panel in enumerate(row):
      top, left = r * (height + SEPARATOR), c * (width + SEPARATOR)
      grid[top:top + height, left:left + width] = panel
  return grid


def reconstruction_grid(inputs: np.ndarray, recons: np.ndarray, grains: np.ndarray,
                        num_grains: int, max_rows: int = 8,
                        error_max: float | None = None) -> np.ndarray:
  """One row per image: input | reconstruction | |error| heat | grain overlay.

  Args:
    inputs: float [B, H, W, 3] in [-1, 1].
    recons: float [B, H, W, 3] in [-1, 1].
    grains: int [B, h, w] grain per region.
    num_grains: 2 or 3.
    max_rows: at most this many images are shown.
    error_max: see `error_heatmap`.

  Returns:
    uint8 [n * (H + 2) - 2, 4 * (W + 2) - 2, 3] with 2-px white separators.
  """
  inputs, recons, grains = np.asarray(inputs), np.asarray(recons), np.asarray(grains)
  if inputs.ndim != 4 or inputs.shape != recons.shape or inputs.shape[-1] != 3:
    raise ValueError(f"inputs and recons must be [B, H, W, 3] of one shape; "
                     f"got {inputs.shape} and {recons.shape}")
  if grains.ndim != 3 or grains.shape[0] != inputs.shape[0]:
    raise ValueError(f"grains must be [B, h, w] with B={inputs.shape[0]}; got {grains.shape}")
  if max_rows < 1:
    raise ValueError(f"max_rows must be >= 1; got {max_rows}")
  count = min(inputs.shape[0], max_rows)
  inputs, recons, grains = inputs[:count], recons[:count], grains[:count]
  input_images = as_uint8_images(inputs)
  recon_images = as_uint8_images(recons)
  heat = error_heatmap(inputs, recons, error_max)
  panels = [[input_images[i], recon_images[i], heat[i],
             grain_overlay(input_images[i], grains[i], num_grains)] for i in range(count)]
  return tile(panels)
