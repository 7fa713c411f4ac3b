"""What the FID jobs share: config checks and paths, the Inception weights, data parallelism
over this process's devices, the per-process split of the work and its gathering, FID
against reference statistics and the results writer."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dq import sharding as sh
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation import vae_eval
from dq.evaluation.inception_weights import load_inception_params
from dq.train.writers import create_writer

RESULT_PREFIX = "fid_"  # WORKDIR/eval/fid_<mode>_<step>.json


# --- config --------------------------------------------------------------------------------


def check_config(config: Any) -> None:
  """The `config.fid` fields every job reads: split and counts."""
  if config.fid.split not in ("train", "eval"):
    raise ValueError(f"config.fid.split={config.fid.split!r}: expected 'train' or 'eval'")
  for field in ("batch_size", "num_images", "pr_k", "is_splits", "log_every"):
    if int(config.fid[field]) < 1:
      raise ValueError(f"config.fid.{field}={config.fid[field]} must be >= 1")
  for field in ("max_images", "pr_images"):
    if int(config.fid[field]) < 0:
      raise ValueError(f"config.fid.{field}={config.fid[field]} must be >= 0")


def load_inception(config: Any, params: Optional[inc.Params] = None) -> inc.Params:
  """`params` when given, else the weights at `config.fid.inception_weights` (or the search)."""
  if params is not None:
    return params
  return load_inception_params(config.fid.get("inception_weights") or None)


def reference_path(config: Any, workdir: str) -> str:
  """`config.fid.reference_stats`, default WORKDIR/eval/reference_<split>.npz."""
  return config.fid.reference_stats or os.path.join(
      workdir, "eval", f"reference_{config.fid.split}.npz")


def data_config(config: Any, image_size: int = 0) -> ml_collections.ConfigDict:
  """`config.data` with image_size 0 replaced by `image_size` (the generator's) or checked."""
  data_cfg = config.data.copy_and_resolve_references()
  if data_cfg.image_size == 0:
    if not image_size:
      raise ValueError("config.data.image_size=0: set it to the generator's image size (e.g. "
                       "256) so the reference images are scaled like the samples")
    data_cfg.image_size = image_size
  elif image_size and data_cfg.image_size != image_size:
    raise ValueError(f"config.data.image_size={data_cfg.image_size} but the stage-1 model "
                     f"codes {image_size} px images; set it to {image_size} or 0")
  return data_cfg


# --- devices and processes -----------------------------------------------------------------


class LocalDevices:
  """Data parallelism over this process's devices: batch axis split, weights replicated."""

  def __init__(self):
    mesh = sh.make_mesh(None, jax.local_devices())
    self.count = sh.data_parallel_size(mesh)
    self.batch = sh.batch_sharding(mesh)
    self.replicated = sh.replicated(mesh)

  def round_up(self, batch_size: int) -> int:
    """The smallest multiple of the device count >= batch_size."""
    return -(-batch_size // self.count) * self.count

  def put_batch(self, array: np.ndarray, size: int) -> jax.Array:
    """Pads axis 0 with zeros to `size` rows and splits it over the devices."""
    array = np.asarray(array)
    if array.shape[0] < size:
      padding = np.zeros((size - array.shape[0], *array.shape[1:]), array.dtype)
      array = np.concatenate([array, padding])
    return jax.device_put(array, self.batch)


def process_share(count: int) -> range:
  """The contiguous range of global indices in [0, count) this process handles."""
  share = -(-count // jax.process_count())
  start = min(count, jax.process_index() * share)
  return range(start, min(count, start + share))


def gather_rows(local: np.ndarray) -> list[np.ndarray]:
  """Every process's rows of a per-process array, in process order (one entry per process).

  Arrays travel in their own dtype (float32 features are exact); rows are padded to the
  largest process's count for the gather and trimmed after it.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return [local]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = np.asarray(multihost_utils.process_allgather(
      np.asarray([local.shape[0]], np.int32))).reshape(-1)  # [P]
  padded = np.zeros((int(counts.max()), *local.shape[1:]), local.dtype)
  padded[:local.shape[0]] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, max_rows, ...]
  return [gathered[index, :count] for index, count in enumerate(counts)]


def trim_rows(parts: list[np.ndarray], limit: int) -> list[np.ndarray]:
  """The first `limit` rows of process-ordered parts."""
  kept, left = [], limit
  for part in parts:
    kept.append(part[:left])
    left -= len(kept[-1])
  return kept


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def images_to_uint8(images: jax.Array) -> jax.Array:
  return inc.images_to_uint8(images.astype(jnp.float32))


# --- statistics ----------------------------------------------------------------------------


def merged_stats(parts: list[np.ndarray]) -> fid.FeatureStats:
  """FeatureStats of per-process feature arrays, merged in process order (FeatureStats.merge:
  the same float64 statistics on every process, whatever the split)."""
  total = fid.FeatureStats()
  for part in parts:
    total.merge(fid.FeatureStats().update(part))
  return total


def fid_to_reference(parts: list[np.ndarray], mu: np.ndarray, sigma: np.ndarray) -> float:
  """FID of sample features (per-process parts, [n_p, D] each) against reference statistics.

  N >= D samples: `frechet_distance` of the merged statistics. Fewer samples (quick runs and
  tests): the same value without a [D, D] eigendecomposition, since the sample covariance is
  C^T C / (N - 1) for the centred features C [N, D], and the nonzero eigenvalues of
  sigma C^T C / (N - 1) are those of the symmetric [N, N] matrix C sigma C^T / (N - 1).
  """
  features = np.concatenate(parts).astype(np.float64)  # [N, D]
  count, dim = features.shape
  if count >= dim:
    return fid.frechet_distance(*merged_stats(parts).stats(), mu, sigma)
  if count < 2:
    raise ValueError(f"FID needs at least 2 samples, got {count}")
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"reference statistics must be [{dim}] and [{dim}, {dim}], got {mu.shape} "
                     f"and {sigma.shape}")
  centred = features - features.mean(axis=0)
  inner = centred @ sigma @ centred.T / (count - 1)  # [N, N]
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = features.mean(axis=0) - mu
  distance = (diff @ diff + np.sum(centred * centred) / (count - 1) + np.trace(sigma)
              - 2.0 * trace_sqrt)
  return max(float(distance), 0.0)


# --- results -------------------------------------------------------------------------------


def write_job_results(config: Any, workdir: str, step: int, results: dict) -> str:
  """WORKDIR/eval/fid_<mode>_<step>.json and the numbers to the metric writer (process 0)."""
  path = vae_eval.write_results(workdir, f"{RESULT_PREFIX}{config.mode}", step, results)
  writer = create_writer(workdir, tensorboard=config.fid.get("tensorboard", True))
  writer.write_scalars(step, {f"fid_{config.mode}/{key}": value
                              for key, value in results.items()
                              if isinstance(value, (int, float)) and not isinstance(value, bool)})
  writer.flush()
  return path
