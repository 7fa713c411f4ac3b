"""Reference FID statistics of a dataset split: `.npz` with `mu`, `sigma` (pytorch-fid / ADM).

Images come from `dq.data.pipeline.make_dataset` in eval mode (centre crop, scaled to
`data.image_size`, in [-1, 1]); they are mapped back to uint8 (exact for images the pipeline
did not resize), resized to 299 and run through the FID InceptionV3; features are accumulated
in float64 on the host, so no image or feature set is kept. Every process reads the whole
split (the statistics are the same everywhere); process 0 writes the file.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dq.data.pipeline import make_dataset
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation.inception_weights import load_inception_params


def features_in_batches(params: inc.Params, images: np.ndarray, batch_size: int
                        ) -> np.ndarray:
  """pool_3 features [N, 2048] of uint8 images [N, H, W, 3], `batch_size` at a time.

  The last batch is padded to `batch_size`, so every call reuses one compilation.
  """
  outputs = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    outputs.append(padded_features(params, chunk, batch_size))
  return np.concatenate(outputs) if outputs else np.zeros((0, inc.FEATURE_DIM), np.float32)


def padded_features(params: inc.Params, images: np.ndarray, batch_size: int) -> np.ndarray:
  """pool_3 features of up to `batch_size` uint8 images, run as one batch of `batch_size`."""
  count = images.shape[0]
  if count > batch_size:
    raise ValueError(f"{count} images do not fit a batch of {batch_size}")
  if count < batch_size:
    padding = np.zeros((batch_size - count, *images.shape[1:]), images.dtype)
    images = np.concatenate([images, padding])
  features = inc.extract_features(params, jnp.asarray(images))["pool_3"]
  return np.asarray(features)[:count]


def compute_reference_stats(data_cfg: Any, split: str, out_path: str | os.PathLike,
                            batch_size: int = 50, max_images: int | None = None,
                            params: inc.Params | None = None) -> dict[str, Any]:
  """Writes the FID statistics of `split` (at most `max_images` images) to `out_path`.

  Args:
    data_cfg: `config.data` (embedded / folder / TFDS source, image size, ...).
    split: "train" or "eval".
    out_path: `.npz` to write (`mu` [2048], `sigma` [2048, 2048] float64, `num_images`).
    batch_size: images per Inception batch.
    max_images: stop after this many images (None: the whole split, one pass).
    params: Inception weights; default `load_inception_params()` (installed package, env var).

  Returns:
    {"path", "num_images", "mu", "sigma"}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_images is not None and max_images < 2:
    raise ValueError(f"max_images must be None or >= 2 (a covariance needs 2), got {max_images}")
  if params is None:
    params = load_inception_params()
  dataset = make_dataset(data_cfg, split=split, batch_size=batch_size, seed=0, train=False,
                         num_epochs=1, drop_remainder=False)
  stats = fid.FeatureStats(inc.FEATURE_DIM)
  start = time.perf_counter()
  for batch_index, batch in enumerate(dataset):
    images = np.asarray(inc.images_to_uint8(jnp.asarray(batch["image"])))  # [B, H, W, 3] uint8
    if max_images is not None:
      images = images[:max_images - stats.count]
    stats.update(padded_features(params, images, batch_size))
    if batch_index % 20 == 0:
      logging.info("reference stats: %d images, %.1f images/s", stats.count,
                   stats.count / max(time.perf_counter() - start, 1e-9))
    if max_images is not None and stats.count >= max_images:
      break
  if stats.count < 2:
    raise ValueError(f"the {split} split of data '{data_cfg.name}' gave {stats.count} images; "
                     "FID statistics need at least 2")
  mu, sigma = stats.stats()
  if jax.process_index() == 0:
    fid.save_stats(out_path, mu, sigma, num_images=np.int64(stats.count))
  logging.info("wrote FID reference statistics of %d images to %s", stats.count, out_path)
  return {"path": os.fspath(out_path), "num_images": stats.count, "mu": mu, "sigma": sigma}
