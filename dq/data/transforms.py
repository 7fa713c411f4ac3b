"""Geometric transforms and scaling: records -> model inputs.

A square crop with side = the shorter image side (centred, or at a random position along the
longer side) is resized to `image_size` with PIL bicubic (antialiased when reducing), then
optionally flipped left-right and scaled to float32 [-1, 1]. Doing the crop before the resize
is the same as "resize the shorter side, then crop", at a fraction of the cost for large images.
Detail masks follow the same crop/flip, resized bilinearly and thresholded at 0.5.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def square_crop_box(height: int, width: int, rng: np.random.Generator | None) -> tuple[
    int, int, int, int]:
  """(left, top, right, bottom) of the largest square: centred, or random when `rng`."""
  side = min(height, width)
  if rng is None:
    top, left = (height - side) // 2, (width - side) // 2
  else:
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
  return left, top, left + side, top + side


def _window(array: np.ndarray, box: tuple[float, float, float, float], size: int) -> tuple[
    np.ndarray, tuple[float, float, float, float]]:
  """The pixels that resizing `box` to `size` reads, and `box` relative to them.

  Cropping them first gives the same result as resizing from the whole image, without
  copying all of a large image into PIL.
  """
  left, top, right, bottom = box
  # Bicubic support is 2 output pixels, i.e. 2 * scale input pixels when reducing.
  scale = max(1.0, (right - left) / size, (bottom - top) / size)
  margin = int(np.ceil(2 * scale)) + 2
  x0, y0 = max(0, int(left) - margin), max(0, int(top) - margin)
  x1 = min(array.shape[1], int(np.ceil(right)) + margin)
  y1 = min(array.shape[0], int(np.ceil(bottom)) + margin)
  return (np.ascontiguousarray(array[y0:y1, x0:x1]),
          (left - x0, top - y0, right - x0, bottom - y0))


def crop_resize(image: np.ndarray, box: tuple[float, float, float, float],
                size: int) -> np.ndarray:
  """uint8 [h, w, 3] -> the `box` (left, top, right, bottom) region as uint8 [size, size, 3]."""
  window, box = _window(image, box, size)
  pil = Image.fromarray(window)
  return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=box), np.uint8)


def crop_resize_mask(mask: np.ndarray, box: tuple[float, float, float, float],
                     size: int) -> np.ndarray:
  """float32 {0,1} [h, w] -> the `box` region as float32 {0,1} [size, size]."""
  window, box = _window(mask, box, size)
  pil = Image.fromarray(window.astype(np.float32), mode="F")
  resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))
  return (resized >= 0.5).astype(np.float32)


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def preprocess(record: dict[str, Any], *, image_size: int, rng: np.random.Generator | None,
               random_crop: bool, random_flip: bool) -> dict[str, np.ndarray]:
  """Raw record -> {'image' f32 [S,S,3] in [-1,1], 'label' i32, 'detail_mask' f32 [S,S],
  'index' i64}. `rng=None` means eval: centre crop, no flip."""
  image = np.asarray(record["image"])  # [h, w, 3] uint8
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"record {record.get('index')}: expected a uint8 [h, w, 3] image, got "
                     f"{image.dtype} {image.shape}")
  height, width = image.shape[:2]
  mask = record.get("detail_mask")
  if height == width == image_size:  # Already the right size: every crop is the identity.
    out_image = image
    out_mask = None if mask is None else np.asarray(mask, np.float32)
  else:
    box = square_crop_box(height, width, rng if random_crop else None)
    out_image = crop_resize(image, box, image_size)
    out_mask = None if mask is None else crop_resize_mask(np.asarray(mask), box, image_size)
  if out_mask is None:
    out_mask = np.zeros((image_size, image_size), np.float32)
  if rng is not None and random_flip and rng.random() < 0.5:
    out_image, out_mask = out_image[:, ::-1], out_mask[:, ::-1]
  return {"image": to_unit_range(out_image),
          "label": np.int32(record["label"]),
          "detail_mask": np.ascontiguousarray(out_mask, np.float32),
          "index": np.int64(record["index"])}
