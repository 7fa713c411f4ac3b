"""Summary pictures (numpy/PIL/matplotlib): adaptive coding maps, reconstruction grids, code
histograms, fine-ratio distributions and coarse-to-fine generation strips / animations.

Granularity colours (Okabe-Ito, colour-blind safe), grain 0 is the coarsest:
- dual grain: 0 coarse = blue (0, 114, 178), 1 fine = vermillion (213, 94, 0);
- triple grain: 0 coarse = blue, 1 median = bluish green (0, 158, 115),
  2 fine = vermillion.
"""
from __future__ import annotations

import os
from typing import Mapping

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


def _as_uint8_images(x: np.ndarray) -> np.ndarray:
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


def _tile(panels: list[list[np.ndarray]]) -> np.ndarray:
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
  input_images = _as_uint8_images(inputs)
  recon_images = _as_uint8_images(recons)
  heat = error_heatmap(inputs, recons, error_max)
  panels = [[input_images[i], recon_images[i], heat[i],
             grain_overlay(input_images[i], grains[i], num_grains)] for i in range(count)]
  return _tile(panels)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] or [H, W] array as PNG, creating parent folders."""
  from PIL import Image  # Deferred: only saving needs it.

  array = np.asarray(array)
  shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
  if array.dtype != np.uint8 or not shape_ok:
    raise ValueError(f"save_png needs uint8 [H, W], [H, W, 3] or [H, W, 4]; "
                     f"got {array.dtype} {array.shape}")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")


# --- code statistics ------------------------------------------------------------------------


def _check_grain(grain: np.ndarray, num_grains: int, name: str = "grain") -> np.ndarray:
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
  grain = _check_grain(grain, num_grains)
  return (4 ** grain.astype(np.int64)).reshape(len(grain), -1).sum(axis=1)


def fine_ratios(grain: np.ndarray, num_grains: int) -> np.ndarray:
  """Fraction of regions at the finest grain per image: grain [B, h, w] -> float64 [B]."""
  grain = _check_grain(grain, num_grains)
  return (grain == num_grains - 1).reshape(len(grain), -1).mean(axis=1)


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
  grain = _check_grain(grain, num_grains)
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


# --- matplotlib figures as arrays -----------------------------------------------------------


def _new_figure(width_in: float, height_in: float, dpi: int):
  """A pyplot-free Agg figure (no global state, works headless)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Deferred: only figures need it.
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width_in, height_in), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def figure_to_array(figure) -> np.ndarray:
  """Renders a matplotlib figure to uint8 [H, W, 3] (H, W = size in inches x dpi)."""
  figure.canvas.draw()
  return np.array(figure.canvas.buffer_rgba())[..., :3]


def _hex(colour: tuple[int, int, int]) -> str:
  return "#{:02x}{:02x}{:02x}".format(*colour)


def code_histogram(codes: np.ndarray, grain: np.ndarray, codebook_size: int, num_grains: int,
                   max_images: int = 4, panel_inches: tuple[float, float] = (4.0, 2.0),
                   dpi: int = 100) -> np.ndarray:
  """Histogram of the codes of each image (one panel per image, stacked vertically).

  Bars (blue, `BLUE`) over codebook index 0..K-1, height = tokens using that entry
  (`code_counts`); panel titles give the image's token count and distinct entries.

  Returns:
    uint8 [n * panel_h * dpi, panel_w * dpi, 3] for n = min(B, max_images) panels.
  """
  counts = code_counts(codes, grain, codebook_size, num_grains)  # [B, K]
  if max_images < 1:
    raise ValueError(f"max_images must be >= 1; got {max_images}")
  count = min(len(counts), max_images)
  width_in, height_in = panel_inches
  figure = _new_figure(width_in, height_in * count, dpi)
  axes = figure.subplots(count, 1, squeeze=False)[:, 0]
  for i, ax in enumerate(axes):
    ax.bar(np.arange(codebook_size), counts[i], width=1.0, color=_hex(BLUE), linewidth=0)
    ax.set_xlim(-0.5, codebook_size - 0.5)
    ax.set_ylim(0, max(1, counts[i].max()) * 1.05)
    ax.set_title(f"image {i}: {counts[i].sum()} codes, {np.count_nonzero(counts[i])} distinct "
                 f"of {codebook_size}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylabel("tokens", fontsize=7)
  axes[-1].set_xlabel("codebook index", fontsize=7)
  figure.tight_layout()
  return figure_to_array(figure)


DATASET_COLOURS = (BLUE, VERMILLION, GREEN, (230, 159, 0), (204, 121, 167), (86, 180, 233))


def fine_ratio_distribution(ratios: Mapping[str, np.ndarray] | np.ndarray, bins: int = 20,
                            inches: tuple[float, float] = (5.0, 3.0), dpi: int = 100,
                            title: str = "fine-grain ratio per image") -> np.ndarray:
  """Distribution of the per-image fine ratio, one filled histogram per dataset.

  Args:
    ratios: float [N] in [0, 1] (one dataset) or a mapping name -> float [N]; dataset i is
      drawn in `DATASET_COLOURS[i % 6]` with its mean as a dashed line.
    bins: equal-width bins over [0, 1].

  Returns:
    uint8 [inches[1] * dpi, inches[0] * dpi, 3].
  """
  series = dict(ratios) if hasattr(ratios, "items") else {"images": ratios}
  if not series:
    raise ValueError("fine_ratio_distribution needs at least one dataset")
  if bins < 1:
    raise ValueError(f"bins must be >= 1; got {bins}")
  figure = _new_figure(*inches, dpi)
  ax = figure.subplots()
  edges = np.linspace(0.0, 1.0, bins + 1)
  for i, (name, values) in enumerate(series.items()):
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0 or values.min() < 0 or values.max() > 1:
      raise ValueError(f"fine ratios of {name!r} must be a non-empty array in [0, 1]; got "
                       f"{values.size} values" + (f" in {values.min()}..{values.max()}"
                                                  if values.size else ""))
    colour = _hex(DATASET_COLOURS[i % len(DATASET_COLOURS)])
    ax.hist(values, bins=edges, color=colour, alpha=0.55, histtype="stepfilled",
            label=f"{name} (n={values.size}, mean {values.mean():.2f})")
    ax.axvline(values.mean(), color=colour, linestyle="--", linewidth=1)
  ax.set_xlim(0.0, 1.0)
  ax.set_xlabel("fraction of regions coded fine", fontsize=8)
  ax.set_ylabel("images", fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7)
  figure.tight_layout()
  return figure_to_array(figure)


# --- coarse-to-fine generation --------------------------------------------------------------

NEUTRAL_VALUE = 128  # fill of cells not generated yet
HATCH_VALUE = 64     # diagonal marks on them: pixels with (row + col) % HATCH_PERIOD == 0
HATCH_PERIOD = 4


def mark_ungenerated(image: np.ndarray, known: np.ndarray) -> np.ndarray:
  """Paints the cells not generated yet: neutral grey with dark diagonal hatching.

  Args:
    image: uint8 [H, W, 3].
    known: bool [h, w] per cell (fine grid); H / h and W / w must be integers.

  Returns:
    uint8 [H, W, 3]: `image` where known; elsewhere NEUTRAL_VALUE, and HATCH_VALUE on pixels
    with (row + col) % HATCH_PERIOD == 0 (row/col in image pixels).
  """
  image, known = np.asarray(image), np.asarray(known, bool)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {image.shape}")
  if known.ndim != 2 or image.shape[0] % known.shape[0] or image.shape[1] % known.shape[1]:
    raise ValueError(f"known must be [h, w] dividing the image {image.shape[:2]}; got "
                     f"{known.shape}")
  height, width = image.shape[:2]
  pixel_known = np.repeat(np.repeat(known, height // known.shape[0], axis=0),
                          width // known.shape[1], axis=1)  # [H, W]
  hatch = (np.arange(height)[:, None] + np.arange(width)[None, :]) % HATCH_PERIOD == 0
  fill = np.where(hatch, HATCH_VALUE, NEUTRAL_VALUE).astype(np.uint8)  # [H, W]
  return np.where(pixel_known[..., None], image, fill[..., None])


def _caption_band(captions: list[str], column_width: int, height: int) -> np.ndarray:
  """White band [height, n * (column_width + 2) - 2, 3]: caption i in column i, cut at its
  column's edge."""
  from PIL import Image, ImageDraw, ImageFont  # Deferred: only captions need it.

  font = ImageFont.load_default()
  columns = []
  for caption in captions:
    cell = Image.new("RGB", (column_width, height), (SEPARATOR_VALUE,) * 3)
    ImageDraw.Draw(cell).text((1, 1), caption, fill=(0, 0, 0), font=font)
    columns.append(np.asarray(cell))
  return _tile([columns])


CAPTION_HEIGHT = 14


def generation_strip(frames: np.ndarray, known: np.ndarray,
                     captions: list[str] | None = None, scale: int = 1) -> np.ndarray:
  """Coarse-to-fine strip: one row per sample, one column per stage, un-generated cells marked.

  Args:
    frames: uint8 [S, H, W, 3] (one sample) or [B, S, H, W, 3]: the decoded partial images.
    known: bool [S, h, w] or [B, S, h, w]: which fine cells each stage has generated.
    captions: optional S column titles drawn in a CAPTION_HEIGHT-px white band on top.
    scale: integer nearest-neighbour magnification of every frame (before marking).

  Returns:
    uint8 [(CAPTION_HEIGHT + 2 if captions) + B * (scale * H + 2) - 2,
    S * (scale * W + 2) - 2, 3].
  """
  frames, known = np.asarray(frames), np.asarray(known, bool)
  if frames.ndim == 4:
    frames, known = frames[None], known[None]
  if frames.ndim != 5 or frames.dtype != np.uint8 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [S, H, W, 3] or [B, S, H, W, 3]; got "
                     f"{frames.dtype} {frames.shape}")
  if known.shape[:2] != frames.shape[:2] or known.ndim != 4:
    raise ValueError(f"known must be [B, S, h, w] matching frames {frames.shape[:2]}; got "
                     f"{known.shape}")
  batch, stages = frames.shape[:2]
  if captions is not None and len(captions) != stages:
    raise ValueError(f"captions must have one entry per stage ({stages}); got {len(captions)}")
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale must be an int >= 1; got {scale}")
  frames = np.repeat(np.repeat(frames, scale, axis=2), scale, axis=3)
  panels = [[mark_ungenerated(frames[b, s], known[b, s]) for s in range(stages)]
            for b in range(batch)]
  strip = _tile(panels)
  if captions is None:
    return strip
  band = _caption_band(list(captions), frames.shape[3], CAPTION_HEIGHT)
  gap = np.full((SEPARATOR, strip.shape[1], 3), SEPARATOR_VALUE, np.uint8)
  return np.concatenate([band, gap, strip])


def strip_animation(frames: np.ndarray, known: np.ndarray, captions: list[str] | None = None,
                    interval_ms: int = 700, scale: float = 3.0):
  """matplotlib animation of a generation: frame s shows stage s of every sample side by side.

  Args:
    frames, known: as in `generation_strip` ([S, ...] or [B, S, ...]).
    captions: optional S titles.
    interval_ms: time per stage.
    scale: display pixels per image pixel.

  Returns:
    `matplotlib.animation.FuncAnimation` with S frames: `.to_jshtml()` for a notebook,
    `.save(path.gif, writer="pillow")` for a file.
  """
  from matplotlib import animation  # Deferred: only animations need it.

  frames, known = np.asarray(frames), np.asarray(known, bool)
  if frames.ndim == 4:
    frames, known = frames[None], known[None]
  stages = frames.shape[1]
  rows = [generation_strip(frames[:, s:s + 1].transpose(1, 0, 2, 3, 4),
                           known[:, s:s + 1].transpose(1, 0, 2, 3)) for s in range(stages)]
  height, width = rows[0].shape[:2]
  dpi = 100
  figure = _new_figure(width * scale / dpi, height * scale / dpi + 0.3, dpi)
  ax = figure.add_axes((0.0, 0.0, 1.0, height * scale / (height * scale + 30)))
  ax.set_axis_off()
  shown = ax.imshow(rows[0], interpolation="nearest")
  caption = lambda index: captions[index] if captions else f"stage {index}"
  title = figure.text(0.5, 0.99, caption(0), ha="center", va="top", fontsize=9)

  def update(index: int):
    shown.set_data(rows[index])
    title.set_text(caption(index))
    return shown, title

  return animation.FuncAnimation(figure, update, frames=stages, interval=interval_ms, blit=False)
