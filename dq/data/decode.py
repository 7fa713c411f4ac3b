"""Image decoding to RGB uint8 and the raw record every source returns.

Mode policy (PIL):
- grayscale ('1', 'L'), CMYK, YCbCr, LAB, HSV, palette without transparency -> RGB;
- alpha ('RGBA', 'LA', 'PA', 'La', 'RGBa', palette with transparency) -> composited on
  **white** (what viewers show for transparent pixels; dropping alpha instead exposes the
  arbitrary colour stored under fully transparent pixels);
- 16-bit integer ('I;16*') -> divided by 257 to 8 bits; 32-bit integer ('I') the same when its
  maximum is above 255, else taken as 8-bit values; float ('F') -> x255 when within [0, 1];
- EXIF orientation is applied; multi-frame files (GIF, TIFF) give their first frame.
Huge images: files that PIL refuses as decompression bombs (more than
2 * `PIL.Image.MAX_IMAGE_PIXELS` pixels) raise `PIL.Image.DecompressionBombError` and are
skipped by the sources; between 1x and 2x the limit they load (with PIL's
`DecompressionBombWarning`; JPEGs are decoded at a reduced scale through `draft`).
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps

from dq.data import stats

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
T = TypeVar("T")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
  """PIL image of any mode -> uint8 [H, W, 3]."""
  mode = image.mode
  if mode.startswith("I") or mode == "F":
    values = np.asarray(image).astype(np.float64)  # [H, W]
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
      values = values / 257.0
    elif mode == "F" and values.max(initial=0) <= 1.0:
      values = values * 255.0
    gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info)
  if has_alpha:
    rgba = np.asarray(image.convert("RGBA")).astype(np.float32)  # [H, W, 4]
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(source: bytes | str | os.PathLike, *, min_size: int = 0) -> np.ndarray:
  """Decodes an image file (path or bytes) to RGB uint8 [H, W, 3]; raises on a bad file.

  Args:
    source: a file path or the encoded bytes.
    min_size: when > 0, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
      width and height both stay >= `min_size` (much faster for large photos).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    source = io.BytesIO(bytes(source))
  with Image.open(source) as image:
    if min_size > 0 and image.format == "JPEG":
      image.draft(image.mode, (min_size, min_size))
    image.load()
    try:
      image = ImageOps.exif_transpose(image)
    except Exception:  # pylint: disable=broad-except
      pass  # Malformed EXIF: keep the pixels as stored rather than drop the image.
    array = _to_rgb_array(image)
  if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"decoded image has unusable shape {array.shape}")
  return array


def make_record(image: np.ndarray, label: int, index: int,
                detail_mask: np.ndarray | None = None) -> dict[str, Any]:
  """A valid raw record: uint8 image [h, w, 3], optional float32 detail mask [h, w]."""
  return {"image": image, "label": np.int32(label), "index": np.int64(index), "valid": True,
          "detail_mask": detail_mask}


def invalid_record(index: int) -> dict[str, Any]:
  """Placeholder for a record that could not be decoded; the pipeline filters it out."""
  return {"image": np.zeros((1, 1, 3), np.uint8), "label": np.int32(0),
          "index": np.int64(index), "valid": False, "detail_mask": None}


def guarded_read(dataset: str, key: str, read: Callable[[], T], *, num_records: int,
                 max_bad_fraction: float) -> T | None:
  """Runs `read()`; on any error counts and logs record `key` as skipped, returns None.

  Every call counts as one read of `dataset`, so the bad fraction check in `stats` applies.
  """
  try:
    result = read()
  except Exception as error:  # pylint: disable=broad-except
    # Corrupt files raise many types (OSError, SyntaxError, ValueError, struct.error, ...).
    stats.note_skipped(dataset, key, f"{type(error).__name__}: {error}")
    result = None
  stats.note_seen(dataset, num_records=num_records, max_bad_fraction=max_bad_fraction)
  return result
