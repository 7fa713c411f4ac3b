"""The `reference` FID job: mu/sigma (and pool_3 features) of a dataset split.

mu/sigma of the `config.fid.split` split of `config.data` (folder / TFDS / embedded) ->
`config.fid.reference_stats` (default WORKDIR/eval/reference_<split>.npz), via
`reference_stats.compute_reference_stats`. With `fid.save_features` the file also holds the
pool_3 `features` of the first `fid.pr_images` images (a second pass over them), which
precision/recall needs. Every process reads the whole split; process 0 writes the file.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dq.data.pipeline import make_dataset
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation.evaluators import common
from dq.evaluation.reference_stats import compute_reference_stats, features_in_batches

FEATURES_KEY = "features"  # pool_3 features [M, 2048] in a reference .npz (precision/recall)


def write_reference(config: Any, data_cfg: Any, path: str, inception_params: inc.Params
                    ) -> dict:
  """Reference statistics of `config.fid.split` to `path` (plus features with save_features).

  Returns {"path", "num_images", "mu", "sigma", "features" (or None)}.
  """
  max_images = int(config.fid.max_images) or None
  result = compute_reference_stats(data_cfg, config.fid.split, path,
                                   batch_size=int(config.fid.batch_size),
                                   max_images=max_images, params=inception_params)
  result["features"] = None
  keep = min(int(config.fid.pr_images), result["num_images"])
  if config.fid.save_features and keep:
    features = _first_features(config, data_cfg, inception_params, keep)
    if jax.process_index() == 0:
      fid.save_stats(path, result["mu"], result["sigma"],
                     num_images=np.int64(result["num_images"]), **{FEATURES_KEY: features})
    result["features"] = features
  common.sync("dq_fid_reference")
  return result


def _first_features(config: Any, data_cfg: Any, inception_params: inc.Params, keep: int
                    ) -> np.ndarray:
  """pool_3 features [keep, 2048] of the split's first `keep` images (a second pass over them:
  the eval pipeline's order is fixed)."""
  batch_size = int(config.fid.batch_size)
  dataset = make_dataset(data_cfg, split=config.fid.split, batch_size=batch_size, seed=0,
                         train=False, num_epochs=1, drop_remainder=False)
  parts, seen = [], 0
  for batch in dataset:
    images = np.asarray(inc.images_to_uint8(jnp.asarray(batch["image"])))[:keep - seen]
    parts.append(features_in_batches(inception_params, images, batch_size))
    seen += len(images)
    if seen >= keep:
      break
  return np.concatenate(parts).astype(np.float32)  # [keep, 2048]


def reference_features(path: str) -> Optional[np.ndarray]:
  """The `features` [M, 2048] stored in a reference .npz, or None."""
  with np.load(path, allow_pickle=False) as archive:
    if FEATURES_KEY not in archive.files:
      return None
    features = np.asarray(archive[FEATURES_KEY], np.float32)
  if features.ndim != 2 or features.shape[1] != inc.FEATURE_DIM:
    raise ValueError(f"{path}: '{FEATURES_KEY}' must be [M, {inc.FEATURE_DIM}], got "
                     f"{features.shape}")
  return features


def run(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """Reference job: statistics (and features) of a dataset split; returns the JSON dict."""
  common.check_config(config)
  params = common.load_inception(config, inception_params)
  path = common.reference_path(config, workdir)
  data_cfg = common.data_config(config)
  start = time.perf_counter()
  result = write_reference(config, data_cfg, path, params)
  features = result["features"]
  results = {"split": config.fid.split, "data": data_cfg.name, "path": path,
             "image_size": int(data_cfg.image_size), "num_images": int(result["num_images"]),
             "num_features": 0 if features is None else int(len(features)),
             "seconds": time.perf_counter() - start}
  common.write_job_results(config, workdir, 0, results)
  return results
