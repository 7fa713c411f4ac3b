"""The `stage2` FID job: FID, Inception Score and precision/recall of DQ-Transformer samples.

Samples `fid.num_images` images from the DQ-Transformer of `config.stage2.workdir`
(class-balanced labels for a class-conditional model: sample i gets class i mod C), decodes
them with its stage 1 and takes their features on the fly; FID against the reference
statistics (computed first when the file is missing), Inception Score when the Inception
weights have logits, precision/recall when the reference file has features. Optionally the
images go to an `.npz` (`arr_0` uint8 [N, H, W, 3], the ADM evaluator's key, and `labels`).

The sampler runs on the first local device, the decoder and Inception data-parallel over this
process's devices. Each process samples a contiguous share of the N images (its index folded
into the sampling key, so samples depend on the process count); features are gathered at the
end.
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
import numpy as np
from jax.sharding import NamedSharding

from dq import generator as gen
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation.evaluators import common, reference
from dq.models.grains import fine_fraction
from dq.stage2 import sampler as sampling
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import unpack_tokens_jax
from dq.train.progress import Progress


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
  images = jax.lax.with_sharding_constraint(common.images_to_uint8(images), batch_sharding)
  return {"images": images, "grain": grain}


def _reference(config: Any, workdir: str, data_cfg: Any, params: inc.Params) -> tuple:
  """(path, mu, sigma, features or None) of the reference statistics, computed first when
  the file is missing (by every process: no shared file system needed; process 0 writes)."""
  ref_path = common.reference_path(config, workdir)
  if os.path.isfile(ref_path):
    mu, sigma = fid.load_stats(ref_path, inc.FEATURE_DIM)
    return ref_path, mu, sigma, reference.reference_features(ref_path)
  logging.info("No reference statistics at %s: computing them first", ref_path)
  computed = reference.write_reference(config, data_cfg, ref_path, params)
  return ref_path, computed["mu"], computed["sigma"], computed["features"]


def _sample_features(config: Any, generator: gen.Generator, params: inc.Params,
                     labels: Optional[np.ndarray], share: range,
                     sampling_cfg: sampling.SamplingConfig) -> tuple[dict, float]:
  """This process's rows (features, grain, length; logits and images when wanted) of the
  samples `share`, and the seconds they took."""
  count, batch_size = int(config.fid.num_images), int(config.sample.batch_size)
  sampler = sampling.make_sampler(generator.model, generator.layout, sampling_cfg)
  with_logits = "logits" in params
  devices = common.LocalDevices()
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
      share, batch_size, labels, base_rng,
      Progress(num_batches, 0, every=int(config.fid.log_every))):
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
  return {key: np.concatenate(value) for key, value in rows.items()}, seconds


def _inception_score(config: Any, local: dict, results: dict) -> None:
  """results['inception_score'(_std)] from the gathered logits (enough of them)."""
  logits = np.concatenate(common.gather_rows(local["logits"]))
  if len(logits) >= int(config.fid.is_splits):
    results["inception_score"], results["inception_score_std"] = fid.inception_score(
        logits, splits=int(config.fid.is_splits))
  else:
    logging.warning("Inception Score skipped: %d samples < fid.is_splits=%d", len(logits),
                    config.fid.is_splits)


def _precision_recall(config: Any, real_features: Optional[np.ndarray],
                      all_features: np.ndarray, ref_path: str, results: dict) -> None:
  """results['precision'], ['recall'], ['pr_images'] against the reference's features."""
  if real_features is None:
    logging.warning("precision/recall skipped: %s has no '%s' (write it with "
                    "fid.save_features=True)", ref_path, reference.FEATURES_KEY)
    return
  limit = int(config.fid.pr_images) or None
  real, fake = real_features[:limit], all_features[:limit]
  if min(len(real), len(fake)) > int(config.fid.pr_k):
    results["precision"], results["recall"] = fid.precision_recall(
        real, fake, k=int(config.fid.pr_k))
    results["pr_images"] = int(min(len(real), len(fake)))
  else:
    logging.warning("precision/recall skipped: %d real and %d sampled features, k=%d",
                    len(real), len(fake), config.fid.pr_k)


def run(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """Generation FID job: samples, features on the fly, FID / IS / precision-recall."""
  common.check_config(config)
  params = common.load_inception(config, inception_params)
  generator = gen.load_generator(config)
  data_cfg = common.data_config(config, generator.stage1.image_size)
  ref_path, reference_mu, reference_sigma, real_features = _reference(config, workdir,
                                                                      data_cfg, params)
  count = int(config.fid.num_images)
  batch_size = int(config.sample.batch_size)
  if batch_size < 1:
    raise ValueError(f"config.sample.batch_size={batch_size} must be >= 1")
  if count < jax.process_count():
    raise ValueError(f"config.fid.num_images={count} is below the process count "
                     f"{jax.process_count()}")
  labels = gen.sample_labels(config, generator.layout, count)  # [N] or None
  share = common.process_share(count)
  sampling_cfg = gen.sampling_config(config, generator)
  local, seconds = _sample_features(config, generator, params, labels, share, sampling_cfg)
  features = common.gather_rows(local["features"])
  all_features = np.concatenate(features)  # [N, 2048]
  results = {
      "fid": common.fid_to_reference(features, reference_mu, reference_sigma),
      "num_images": int(len(all_features)),
      "fine_ratio": float(fine_fraction(np.concatenate(common.gather_rows(local["grain"])),
                                        num_grains=2)),  # token layouts are dual grain
      "mean_length": float(np.mean(np.concatenate(common.gather_rows(local["length"])))),
      "checkpoint_step": generator.step, "stage2": generator.source,
      "reference": ref_path, "images_per_sec": len(share) / max(seconds, 1e-9),
      "sampling": {**dataclasses.asdict(sampling_cfg), "seed": int(config.sample.seed),
                   "batch_size": batch_size, "labels": str(config.sample.get("labels", ""))},
      "class_balanced": labels is not None and not str(config.sample.get("labels", "")).strip()}
  if "logits" in params:
    _inception_score(config, local, results)
  _precision_recall(config, real_features, all_features, ref_path, results)
  if config.fid.save_images:
    results["images_path"] = _save_images(config, workdir, local["images"], labels, share)
  common.write_job_results(config, workdir, generator.step, results)
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
