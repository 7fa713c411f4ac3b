"""The embedded default dataset: procedural images mixed with photos shipped inside packages.

No network: photos come from scikit-image, scikit-learn and matplotlib sample data, loaded
once per process. Whole photos are held out for eval (`EVAL_PHOTOS`), and procedural images
use a different seed stream per split, so train and eval never share content.

Record `i` of a split is procedural when `floor((i + 1) * f) > floor(i * f)` (exactly a
fraction `f` of every window), else a photo crop: a random photo of the split, a square of
random side (25-100% of its shorter side, no smaller than `image_size` when possible) at a
random position, maybe flipped, resized to `image_size`. Everything is a function of
(seed, split, index). Labels: procedural kinds are 0..7 (`procedural.KINDS`), photos are
`PHOTO_LABEL` (8); photos carry no detail mask.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from dq.data import decode, procedural, transforms

PHOTO_LABEL = len(procedural.KINDS)
NUM_CLASSES = PHOTO_LABEL + 1
EVAL_PHOTOS = ("coffee", "flower")
SPLITS = ("train", "eval")


def _skimage(name: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    import skimage.data  # pylint: disable=g-import-not-at-top
    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: left view.
  return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
    return load_sample_image(filename)
  return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
  def load() -> np.ndarray:
    from matplotlib import cbook  # pylint: disable=g-import-not-at-top
    with cbook.get_sample_data(filename) as file:
      return decode.decode_image(file.read())
  return load


# skimage's `cat` is the same picture as `chelsea`, so it is left out.
PHOTO_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _skimage(name) for name in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
        "retina", "stereo_motorcycle", "colorwheel")},
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}

_PHOTOS: dict[str, np.ndarray] | None = None
_PHOTOS_LOCK = threading.Lock()


def load_photos() -> dict[str, np.ndarray]:
  """All photos that load here, name -> uint8 [h, w, 3]; loaded once per process."""
  global _PHOTOS
  with _PHOTOS_LOCK:
    if _PHOTOS is None:
      photos = {}
      for name, load in PHOTO_LOADERS.items():
        try:
          image = np.asarray(load())
        except Exception as error:  # pylint: disable=broad-except
          logging.warning("embedded data: photo %s unavailable (%s); leaving it out", name, error)
          continue
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
          logging.warning("embedded data: photo %s is %s %s, not uint8 RGB; leaving it out",
                          name, image.dtype, image.shape)
          continue
        photos[name] = image
      _PHOTOS = photos
    return _PHOTOS


def photo_names(split: str) -> tuple[str, ...]:
  """Names of the photos a split draws from (eval: `EVAL_PHOTOS`, train: the rest)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  names = sorted(load_photos())
  return tuple(n for n in names if (n in EVAL_PHOTOS) == (split == "eval"))


def photo_crop(photo: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Random square crop (random scale and position), random flip -> uint8 [S, S, 3]."""
  height, width = photo.shape[:2]
  shorter = min(height, width)
  min_fraction = min(1.0, max(0.25, image_size / shorter))
  side = shorter * rng.uniform(min_fraction, 1.0)
  top = rng.uniform(0, height - side)
  left = rng.uniform(0, width - side)
  crop = transforms.crop_resize(photo, (left, top, left + side, top + side), image_size)
  return crop[:, ::-1].copy() if rng.random() < 0.5 else crop


class EmbeddedSource:
  """Random-access source of raw records (see `decode.make_record`) for one split."""

  def __init__(self, split: str, *, image_size: int, size: int,
               procedural_fraction: float = 0.5, photos: bool = True, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 1:
      raise ValueError(f"embedded {split} size must be >= 1, got {size}")
    if not 0.0 <= procedural_fraction <= 1.0:
      raise ValueError(f"embedded procedural_fraction must be in [0, 1], got "
                       f"{procedural_fraction}")
    if not photos and procedural_fraction == 0.0:
      raise ValueError("embedded data with photos=False and procedural_fraction=0 is empty")
    self.split, self.image_size, self.size, self.seed = split, image_size, size, seed
    self.stream = SPLITS.index(split)
    self.procedural_fraction = procedural_fraction if photos else 1.0
    self.photo_names = photo_names(split) if self.procedural_fraction < 1.0 else ()
    if self.procedural_fraction < 1.0 and not self.photo_names:
      raise RuntimeError(f"embedded data: no photo of the {split} split could be loaded; set "
                         "data.embedded.photos=False to use procedural images only")

  def __len__(self) -> int:
    return self.size

  def is_procedural(self, index: int) -> bool:
    fraction = self.procedural_fraction
    return bool(np.floor((index + 1) * fraction) > np.floor(index * fraction))

  def _photo_choice(self, index: int) -> tuple[str, np.random.Generator]:
    rng = np.random.default_rng([self.seed, self.stream, index, 1])
    return self.photo_names[int(rng.integers(len(self.photo_names)))], rng

  def origin(self, index: int) -> str:
    """'procedural' or the photo name record `index` is cropped from."""
    return "procedural" if self.is_procedural(index) else self._photo_choice(index)[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"embedded {self.split} index {index} outside [0, {self.size})")
    if self.is_procedural(index):
      example = procedural.make_example(self.seed, index, self.image_size, self.stream)
      return decode.make_record(example["image"], int(example["label"]), index,
                                example["detail_mask"])
    name, rng = self._photo_choice(index)
    crop = photo_crop(load_photos()[name], self.image_size, rng)
    return decode.make_record(crop, PHOTO_LABEL, index)

  def __repr__(self) -> str:
    return (f"EmbeddedSource(split={self.split!r}, size={self.size}, "
            f"procedural_fraction={self.procedural_fraction}, photos={self.photo_names})")
