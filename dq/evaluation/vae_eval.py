"""Stage-1 evaluation on the held-out split: PSNR, SSIM, L1, grain statistics, codebook use."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dq import sharding as sh
from dq.data.embedded import PHOTO_LABEL
from dq.data.pipeline import detail_mask_available, make_dataset
from dq.evaluation import detail, metrics
from dq.models.grains import fine_fraction


def grain_costs(num_grains: int) -> np.ndarray:
  """Codes spent by one region of each granularity (coarse first): 1, 4 (, 16)."""
  return 4 ** np.arange(num_grains)


def make_eval_fn(model, num_grains: int, with_lpips: bool = False):
  """(variables, x, lpips_params) -> per-image metrics and the grain map, all eval mode."""
  lpips_net = None
  if with_lpips:
    from dq.losses.lpips import LPIPS
    lpips_net = LPIPS(precision="highest")

  def eval_fn(variables, x, lpips_params):
    out = model.apply(variables, x, train=False)
    xrec = jnp.clip(out["xrec"], -1.0, 1.0)
    result = {
        "psnr": metrics.psnr(x, xrec),
        "ssim": metrics.ssim(x, xrec),
        "l1": metrics.l1(x, xrec),
        "grain": out["grain"],
        "codes": out["codes"],
    }
    if lpips_net is not None:
      result["lpips"] = lpips_net.apply({"params": lpips_params}, x, xrec)
    if getattr(model, "router_kind", "") == "feature":
      top2 = jax.lax.top_k(out["gate_logits"], 2)[0]  # [B, hc, wc, 2]
      result["router_margin"] = top2[..., 0] - top2[..., 1]  # [B, hc, wc]
    return result

  return eval_fn


def evaluate_vae(model, variables: Any, data_cfg: Any, *, mesh, batch_size: int,
                 num_grains: int, codebook_size: int, max_images: int | None = None,
                 lpips_params: Any = None, per_image: bool = False) -> dict:
  """Runs the eval split once (last batch padded) and returns a JSON-able dict.

  With `lpips_params` (LPIPS VGG16 weights) the per-image LPIPS distance is reported too.
  With `per_image`, the dict also holds `fine_ratio_per_image` (float [N], not JSON-able)."""
  dp = sh.data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(f"config.eval.batch_size={batch_size} must be divisible by the "
                     f"data-parallel size {dp}")
  local_bs = batch_size // jax.process_count()
  ds = make_dataset(data_cfg, split="eval", batch_size=local_bs, seed=0, train=False,
                    shard_index=jax.process_index(), shard_count=jax.process_count(),
                    num_epochs=1, drop_remainder=False)
  with_lpips = lpips_params is not None
  metric_names = ("psnr", "ssim", "l1") + (("lpips",) if with_lpips else ())
  eval_fn = jax.jit(make_eval_fn(model, num_grains, with_lpips),
                    in_shardings=(sh.replicated(mesh), sh.batch_sharding(mesh),
                                  sh.replicated(mesh)),
                    out_shardings=sh.replicated(mesh))
  with_mask = detail_mask_available(data_cfg)
  maps = ("grain", "codes") + (("router_margin",) if getattr(model, "router_kind", "") ==
                                "feature" else ())
  acc: dict[str, list] = {k: [] for k in metric_names + maps + ("mask", "procedural")}
  seen = 0
  for batch in ds:
    n = batch["image"].shape[0]
    image = _pad_to(batch["image"], local_bs)
    out = jax.device_get(eval_fn(variables, sh.shard_batch({"image": image}, mesh)["image"],
                                 lpips_params if with_lpips else {}))
    # Each process keeps its own rows of the global batch.
    start = jax.process_index() * local_bs
    for k in metric_names + maps:
      acc[k].append(np.asarray(out[k])[start:start + n])
    acc["mask"].append(np.asarray(batch["detail_mask"]))
    acc["procedural"].append(np.asarray(batch["label"]) != PHOTO_LABEL)
    seen += n
    if max_images and seen >= max_images:
      break
  if not seen:
    raise RuntimeError("evaluation: the eval split produced no images")
  cat = {k: np.concatenate(v)[:max_images or None] for k, v in acc.items()}
  result = summarize(cat, num_grains=num_grains, codebook_size=codebook_size,
                     with_detail_mask=with_mask)
  if with_lpips:
    result["lpips"] = float(cat["lpips"].mean())
  if "router_margin" in cat:
    # Decisiveness of the learned router: the gap between its two logits per region, and the
    # fraction of regions below 1 (a Gumbel sample at T = 1 often flips those).
    result["router_margin_mean"] = float(cat["router_margin"].mean())
    result["router_undecided"] = float((cat["router_margin"] < 1.0).mean())
  if per_image:
    grain = cat["grain"]  # [N, hc, wc]
    result["fine_ratio_per_image"] = fine_fraction(grain, num_grains, per_image=True)
  return result


def summarize(cat: dict, *, num_grains: int, codebook_size: int,
              with_detail_mask: bool) -> dict:
  grain = cat["grain"]                                   # [N, hc, wc]
  regions = grain.shape[1] * grain.shape[2]
  fine = fine_fraction(grain, num_grains, per_image=True)
  costs = grain_costs(num_grains)[grain].reshape(len(grain), -1).sum(1)
  result = {
      "num_images": int(len(grain)),
      "psnr": float(cat["psnr"].mean()),
      "ssim": float(cat["ssim"].mean()),
      "l1": float(cat["l1"].mean()),
      "fine_ratio_mean": float(fine.mean()),
      "fine_ratio_std": float(fine.std()),
      "fine_ratio_min": float(fine.min()),
      "fine_ratio_max": float(fine.max()),
      "codes_per_image": float(costs.mean()),
      "regions_per_image": int(regions),
  }
  if num_grains == 3:
    result["median_ratio_mean"] = float((grain == 1).mean())
  stats = metrics.codebook_stats(jnp.asarray(cat["codes"]), codebook_size)
  result["codebook_usage"] = float(stats["usage"])
  result["codebook_perplexity"] = float(stats["perplexity"])
  if with_detail_mask:
    has = cat["procedural"]  # images with a ground-truth detail mask
    if has.any():
      overlap = detail.detail_overlap(grain[has], cat["mask"][has], finest_grain=num_grains - 1)
      result.update({f"detail_{k}": float(v) for k, v in overlap.items()})
  return result


def write_results(workdir: str, name: str, step: int, results: dict) -> str:
  path = os.path.join(workdir, "eval", f"{name}_{step:07d}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({"step": step, **results}, f, indent=1)
    logging.info("eval %s @%d: %s", name, step, json.dumps(results))
  return path


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.repeat(x[-1:], n - x.shape[0], axis=0)
  return np.concatenate([x, pad])
