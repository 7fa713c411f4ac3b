"""How a stage-1 model's routing moves during training: grain maps of fixed held-out images at
successive checkpoints, and the fraction of regions whose grain changed between them.

A learned router that keeps re-deciding regions makes the decoder chase a moving target; the
entropy router's routing never changes (it is a function of the image). `routing_change`
measures that, checkpoint to checkpoint.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def grain_maps(model: Any, variables: dict, images: np.ndarray, batch_size: int = 64
               ) -> np.ndarray:
  """Eval-mode grain maps [N, hc, wc] of images [N, H, W, 3] (the model's `encode`)."""
  encode = jax.jit(lambda v, x: model.apply(v, x, method="encode")[1])
  maps = [np.asarray(encode(variables, images[i:i + batch_size]))
          for i in range(0, len(images), batch_size)]
  return np.concatenate(maps)


def routing_change(maps: Sequence[np.ndarray]) -> list[float]:
  """Fraction of regions whose grain differs between consecutive maps (len(maps) - 1 values)."""
  for a, b in zip(maps, maps[1:]):
    if a.shape != b.shape:
      raise ValueError(f"grain maps of different shapes: {a.shape} vs {b.shape}")
  return [float(np.mean(a != b)) for a, b in zip(maps, maps[1:])]
