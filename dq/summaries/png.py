"""PNG files of summary pictures."""
from __future__ import annotations

import os

import numpy as np


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
