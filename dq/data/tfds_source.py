"""TFDS datasets prepared in ArrayRecord format, read with random access.

`tfds.data_source(name, split=, data_dir=)` is opened with `download=False` (no network
here): the dataset must already be built under `data_dir` with `file_format='array_record'`.
Records come out as raw records (`decode.make_record`); images stored as encoded bytes are
decoded with PIL, decoded arrays are converted to RGB uint8 (gray repeated, alpha composited
on white, 16-bit divided by 257). Records that fail to read or decode are skipped and counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dq.data import decode


def image_to_rgb(value: Any, *, min_size: int = 0) -> np.ndarray:
  """A TFDS image value (array [h, w], [h, w, 1|3|4], or encoded bytes) -> uint8 [h, w, 3]."""
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.size == 1:
    value = value.item()
  if isinstance(value, (bytes, bytearray)):
    return decode.decode_image(bytes(value), min_size=min_size)
  array = np.asarray(value)
  if array.dtype == np.uint16:
    array = np.round(array / 257.0)
  elif array.dtype.kind == "f" and array.max(initial=0) <= 1.0:
    array = array * 255.0
  array = np.clip(array, 0, 255).astype(np.uint8)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image [h, w], [h, w, 1|3|4] or encoded bytes, got "
                     f"{array.dtype} {array.shape}")
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    alpha = array[..., 3:].astype(np.float32) / 255.0
    rgb = array[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  return array


def open_data_source(name: str, split: str, data_dir: str) -> Sequence[Any]:
  """`tfds.data_source` without downloads, with an error that says what to do."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name:
    raise ValueError("data.tfds.name is empty; set it to the TFDS dataset name")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # pylint: disable=broad-except
    first_line = (str(error).strip().splitlines() or [""])[0]  # TFDS appends long name lists.
    raise FileNotFoundError(
        f"TFDS dataset {name!r} split {split!r} could not be opened from data_dir="
        f"{data_dir or '(TFDS default)'}: {type(error).__name__}: {first_line}. Build it there "
        "first with file_format='array_record' (random access needs ArrayRecord files)"
    ) from error


class TfdsSource:
  """Random-access source of raw records over a TFDS data source."""

  def __init__(self, data_source: Sequence[Any], *, name: str, image_key: str = "image",
               label_key: str = "label", min_size: int = 0, max_bad_fraction: float = 0.5):
    self.data_source, self.name = data_source, name
    self.image_key, self.label_key = image_key, label_key
    self.min_size, self.max_bad_fraction = min_size, max_bad_fraction
    if len(data_source) == 0:
      raise ValueError(f"{name}: the TFDS split is empty")
    features = self.features
    if features is not None:
      keys = sorted(features.keys())
      for field, key in (("image_key", image_key), ("label_key", label_key)):
        if key and key not in keys:
          raise KeyError(f"{name}: data.tfds.{field}={key!r} is not a feature; features: "
                         f"{keys}")

  @property
  def features(self) -> Any:
    info = getattr(self.data_source, "dataset_info", None)
    return None if info is None else info.features

  def num_classes(self) -> int | None:
    """Number of classes of the label feature when it is a ClassLabel, else None."""
    features = self.features
    if features is None or not self.label_key:
      return None
    return getattr(features[self.label_key], "num_classes", None)

  def __len__(self) -> int:
    return len(self.data_source)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    example = self.data_source[index]
    if self.image_key not in example:
      raise KeyError(f"no {self.image_key!r} in the record; keys: {sorted(example)}")
    label = int(example[self.label_key]) if self.label_key else 0
    return image_to_rgb(example[self.image_key], min_size=self.min_size), label

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    result = decode.guarded_read(self.name, f"record {index}", lambda: self._read(index),
                                   num_records=len(self), max_bad_fraction=self.max_bad_fraction)
    if result is None:
      return decode.invalid_record(index)
    image, label = result
    return decode.make_record(image, label, index)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records)"


def build_tfds_source(split: str, *, name: str, data_dir: str, train_split: str,
                      eval_split: str, image_key: str, label_key: str, min_size: int = 0,
                      max_bad_fraction: float = 0.5) -> TfdsSource:
  """The source of `split` ('train' | 'eval') of a prepared TFDS dataset."""
  tfds_split = train_split if split == "train" else eval_split
  data_source = open_data_source(name, tfds_split, data_dir)
  return TfdsSource(data_source, name=f"tfds:{name}:{tfds_split}", image_key=image_key,
                    label_key=label_key, min_size=min_size, max_bad_fraction=max_bad_fraction)
