"""The token layout of the dual-grain DQ-Transformer: grid sizes, classes, sequence length and
the special ids (see `dq.stage2.tokens` for the sequences themselves)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

GridSize = Union[int, tuple[int, int]]
FINE_ORDERS = ("row", "region")


def _as_hw(size: GridSize, name: str) -> tuple[int, int]:
  """Normalises an int or (h, w) grid size to a tuple of positive ints."""
  hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if len(hw) != 2 or any(int(s) != s or s < 1 for s in hw):
    raise ValueError(f"TokenLayout.{name} must be a positive int or (h, w); got {size!r}")
  return int(hw[0]), int(hw[1])


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Grid sizes, codebook size and class count that fix every special id and `max_len`."""
  coarse_size: GridSize
  fine_size: GridSize
  codebook_size: int
  num_classes: int = 0
  max_len: Optional[int] = None

  def __post_init__(self):
    coarse, fine = _as_hw(self.coarse_size, "coarse_size"), _as_hw(self.fine_size, "fine_size")
    if fine != (2 * coarse[0], 2 * coarse[1]):
      raise ValueError(f"TokenLayout supports dual grain only: fine_size must be 2x coarse_size "
                       f"{coarse}, got {fine}")
    if self.codebook_size < 1:
      raise ValueError(f"TokenLayout.codebook_size must be >= 1; got {self.codebook_size}")
    if self.num_classes < 0:
      raise ValueError(f"TokenLayout.num_classes must be >= 0; got {self.num_classes}")
    object.__setattr__(self, "coarse_size", coarse)
    object.__setattr__(self, "fine_size", fine)
    shortest = self.num_coarse_cells + 4
    max_len = self.num_fine_cells + 4 if self.max_len is None else int(self.max_len)
    if max_len < shortest:
      raise ValueError(f"TokenLayout.max_len={max_len} is shorter than the all-coarse sequence "
                       f"({shortest} tokens)")
    object.__setattr__(self, "max_len", max_len)

  @property
  def num_coarse_cells(self) -> int:
    return self.coarse_size[0] * self.coarse_size[1]

  @property
  def num_fine_cells(self) -> int:
    return self.fine_size[0] * self.fine_size[1]

  @property
  def content_pad(self) -> int:
    return self.codebook_size

  @property
  def content_eos(self) -> int:
    return self.codebook_size + 1

  @property
  def content_sos(self) -> int:
    return self.codebook_size + 2

  def class_sos(self, label: int) -> int:
    """SOS content id of class `label`; `label == num_classes` is the null class."""
    if not 0 <= label <= self.num_classes or self.num_classes == 0:
      raise ValueError(f"class label {label} outside [0, {self.num_classes}] "
                       f"(num_classes={self.num_classes}, null class = num_classes)")
    return self.codebook_size + 3 + label

  @property
  def null_class_sos(self) -> int:
    return self.class_sos(self.num_classes)

  @property
  def content_vocab_size(self) -> int:
    return self.codebook_size + 3 + (self.num_classes + 1 if self.num_classes else 0)

  @property
  def coarse_pos_pad(self) -> int:
    return self.num_coarse_cells

  @property
  def coarse_pos_eos(self) -> int:
    return self.num_coarse_cells + 1

  @property
  def coarse_pos_sos(self) -> int:
    return self.num_coarse_cells + 2

  @property
  def coarse_position_vocab_size(self) -> int:
    return self.num_coarse_cells + 3

  @property
  def fine_pos_pad(self) -> int:
    return self.num_fine_cells

  @property
  def fine_pos_eos(self) -> int:
    return self.num_fine_cells + 1

  @property
  def fine_pos_sos(self) -> int:
    return self.num_fine_cells + 2

  @property
  def fine_position_vocab_size(self) -> int:
    return self.num_fine_cells + 3

  def sequence_length(self, num_fine_regions: int) -> int:
    """Tokens (specials included) of an image with `num_fine_regions` fine regions."""
    return self.num_coarse_cells + 3 * num_fine_regions + 4
