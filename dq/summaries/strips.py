"""Coarse-to-fine generation pictures: cells not generated yet marked, strips (one row per
sample, one column per stage) and their animations."""
from __future__ import annotations

import numpy as np

from dq.summaries.images import SEPARATOR, SEPARATOR_VALUE, tile
from dq.summaries.plots import new_figure

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
  return tile([columns])


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
  strip = tile(panels)
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
  figure = new_figure(width * scale / dpi, height * scale / dpi + 0.3, dpi)
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
