"""The `stage1` FID job: rFID, PSNR/SSIM/L1, LPIPS, fine ratio and codebook use of a DQ-VAE.

Reconstructs every image of the split with the DQ-VAE at `config.stage1.path`; Inception
features of originals and reconstructions on the fly (no image is kept); rFID
(reconstructions against the reference file when it exists, else against the originals),
PSNR/SSIM/L1, LPIPS (when its weights are found), fine ratio and codebook use. Each process
reads its shard of the split; the per-process rows are gathered at the end.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dq.data.embedded import PHOTO_LABEL
from dq.data.pipeline import detail_mask_available, make_dataset
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation import metrics, vae_eval
from dq.evaluation.evaluators import common
from dq import tokenizer as stage1_lib


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
            "reconstruction": common.images_to_uint8(xrec),
            "original": common.images_to_uint8(x)}
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


def run(config: Any, workdir: str, inception_params: Optional[inc.Params] = None) -> dict:
  """rFID job: reconstructions of the split by the DQ-VAE at `config.stage1.path`."""
  common.check_config(config)
  if not config.stage1.path:
    raise ValueError("config.stage1.path is empty: the stage1 job needs a DQ-VAE (a stage-1 "
                     "workdir or a folder of python -m dq.tools.convert_official_dqvae)")
  params = common.load_inception(config, inception_params)
  vae = stage1_lib.load_stage1(config.stage1.path)
  data_cfg = common.data_config(config, vae.image_size)
  ref_path = common.reference_path(config, workdir)
  reference_stats = fid.load_stats(ref_path, inc.FEATURE_DIM) if os.path.isfile(ref_path) \
      else None
  lpips_params = _lpips_params(config)
  local, start = _reconstruct_split(config, data_cfg, vae, params, lpips_params,
                             from_originals=reference_stats is None, ref_path=ref_path)
  max_images = int(config.fid.max_images) or None
  parts = {key: common.gather_rows(value) for key, value in local.items()}
  total = sum(len(part) for part in parts["features"])
  if max_images is not None and total > max_images:  # per-process limits overshoot
    parts = {key: common.trim_rows(value, max_images) for key, value in parts.items()}
  cat = {key: np.concatenate(value) for key, value in parts.items()}
  if len(cat["features"]) < 2:
    raise ValueError(f"rFID needs at least 2 images; the {config.fid.split} split of data "
                     f"'{data_cfg.name}' gave {len(cat['features'])}")
  results = vae_eval.summarize(cat, num_grains=2, codebook_size=vae.codebook_size,
                               with_detail_mask=detail_mask_available(data_cfg))
  if lpips_params is not None:
    results["lpips"] = float(cat["lpips"].mean())
  if reference_stats is None:
    rfid = fid.fid_from_features(cat["features"], cat["original_features"])
  else:
    rfid = common.fid_to_reference(parts["features"], *reference_stats)
  results.update({
      "rfid": rfid,
      "reference": ref_path if "original_features" not in cat else "originals",
      "split": config.fid.split, "data": data_cfg.name, "stage1": vae.source,
      "images_per_sec": results["num_images"] / max(time.perf_counter() - start, 1e-9)})
  common.write_job_results(config, workdir, checkpoint_step(vae.source), results)
  return results


def _reconstruct_split(config: Any, data_cfg: Any, vae: stage1_lib.Stage1,
                       params: inc.Params, lpips_params: Any, from_originals: bool,
                       ref_path: str) -> tuple[dict[str, np.ndarray], float]:
  """This process's rows: per-image metrics, grain, codes, reconstruction features (and
  the originals' when `from_originals`, detail masks when the data has them); and the
  `time.perf_counter()` at which the first batch was requested."""
  devices = common.LocalDevices()
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
               "from the originals" if from_originals else ref_path)
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
    if from_originals:
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
  return local, start
