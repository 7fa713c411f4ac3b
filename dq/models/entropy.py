"""Patch entropy of images and the dataset threshold tables built from it.

The entropy router sends a region to a finer grain when the Shannon entropy of
its grayscale histogram is above a threshold. Thresholds are dataset
percentiles: a threshold at the (1 - r) quantile sends a fraction r of the
regions to the fine grain. `python -m dq.tools.entropy_thresholds` writes them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dq.models.grains import GrainTargets, grid_factors

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
EPSILON = 1e-40
TABLE_FORMAT = "dq-entropy-thresholds/v1"
PERCENTILE_STEP = 0.1
_TOOL_HINT = ("run `python -m dq.tools.entropy_thresholds --config=... "
              "--output=PATH` to create it")


def patch_entropy(x: jax.Array,
                  patch_size: int,
                  *,
                  num_bins: int = 32,
                  value_range: tuple[float, float] = (-1.0, 1.0),
                  sigma: float = 0.01) -> jax.Array:
  """Soft-histogram Shannon entropy of non-overlapping grayscale patches.

  Matches the official `Entropy` module: grayscale 0.2989R+0.5870G+0.1140B,
  Gaussian kernels on `num_bins` centres spanning `value_range`, averaged over
  the patch pixels, `p = h / (sum h + 1e-40) + 1e-40`, entropy `-sum p ln p`.

  Args:
    x: images [B, H, W, 3] in [-1, 1].
    patch_size: side of a square patch; must divide H and W.
    num_bins: number of histogram bin centres.
    value_range: first and last bin centre.
    sigma: standard deviation of the Gaussian kernel.

  Returns:
    Entropies [B, H / patch_size, W / patch_size] float32 (natural log).
  """
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"patch_entropy expects images [B, H, W, 3]; got shape {x.shape}")
  batch, height, width, _ = x.shape
  if patch_size < 1 or height % patch_size or width % patch_size:
    raise ValueError(f"patch_size {patch_size} must divide the image size {height}x{width}")
  rows, cols = height // patch_size, width // patch_size
  gray = x.astype(jnp.float32) @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)  # [B, H, W]
  patches = gray.reshape(batch, rows, patch_size, cols, patch_size)
  centres = jnp.linspace(value_range[0], value_range[1], num_bins, dtype=jnp.float32)

  def bin_density(centre: jax.Array) -> jax.Array:
    kernel = jnp.exp(-0.5 * jnp.square((patches - centre) / sigma))  # [B, r, p, c, p]
    return kernel.mean(axis=(2, 4))  # [B, r, c]

  # One bin at a time keeps the temporaries at image size, not 32x of it.
  density = jax.lax.map(bin_density, centres)  # [bins, B, r, c]
  prob = density / (density.sum(axis=0) + EPSILON) + EPSILON
  return -jnp.sum(jax.scipy.special.xlogy(prob, prob), axis=0)  # [B, r, c]


def entropy_threshold_table(entropies: np.ndarray) -> dict[str, Any]:
  """Percentiles 0, 0.1, ..., 100 of a set of region entropies.

  Args:
    entropies: any-shaped array of region entropies (flattened).

  Returns:
    Dict with `percentiles` and `values` (lists of floats, linear
    interpolation as `np.percentile`), `num_regions`, `min`, `max`, `mean`.
  """
  values = np.asarray(entropies, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("entropy_threshold_table needs at least one entropy value; got none")
  if not np.all(np.isfinite(values)):
    raise ValueError("entropy_threshold_table got non-finite entropy values")
  percentiles = np.round(np.arange(0, 1000 + 1) * PERCENTILE_STEP, 10)
  return {
      "percentiles": percentiles.tolist(),
      "values": np.percentile(values, percentiles).tolist(),
      "num_regions": int(values.size),
      "min": float(values.min()),
      "max": float(values.max()),
      "mean": float(values.mean()),
  }


def _quantile(table: Mapping[str, Any], quantile: float) -> float:
  percentiles = np.asarray(table["percentiles"], np.float64)
  values = np.asarray(table["values"], np.float64)
  return float(np.interp(100.0 * quantile, percentiles, values))


def threshold_for_ratio(table: Mapping[str, Any], fine_ratio: float) -> float:
  """Entropy threshold above which a fraction `fine_ratio` of regions lies."""
  if not 0.0 <= fine_ratio <= 1.0:
    raise ValueError(f"fine_ratio must be in [0, 1]; got {fine_ratio}")
  return _quantile(table, 1.0 - fine_ratio)


def thresholds_for_ratios(table: Mapping[str, Any], median_ratio: float,
                          fine_ratio: float) -> tuple[float, float]:
  """Triple-grain thresholds `(t_median, t_fine)`.

  Regions above `t_fine` (a fraction `fine_ratio`) go to the finest grain,
  those between `t_median` and `t_fine` (a fraction `median_ratio`) to the
  median grain, the rest stay coarse.
  """
  if median_ratio < 0 or fine_ratio < 0 or median_ratio + fine_ratio > 1:
    raise ValueError("median_ratio and fine_ratio must be >= 0 with a sum <= 1; "
                     f"got median_ratio={median_ratio}, fine_ratio={fine_ratio}")
  t_fine = _quantile(table, 1.0 - fine_ratio)
  t_median = _quantile(table, 1.0 - fine_ratio - median_ratio)
  return t_median, t_fine


def save_threshold_table(path: str | os.PathLike, table: Mapping[str, Any],
                         meta: Mapping[str, Any]) -> None:
  """Writes `table` and `meta` (patch size, bins, range, sigma, data...) as JSON."""
  payload = {"format": TABLE_FORMAT, "meta": dict(meta), "table": dict(table)}
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f)
    f.write("\n")


def load_threshold_table(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a table written by `save_threshold_table`; `meta` is under 'meta'."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"entropy threshold table {path!r} does not exist; {_TOOL_HINT}")
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"entropy threshold table {path!r} is not readable JSON ({e}); "
                     f"{_TOOL_HINT}") from e
  if not isinstance(payload, dict) or payload.get("format") != TABLE_FORMAT:
    raise ValueError(f"entropy threshold table {path!r} lacks format {TABLE_FORMAT!r}; "
                     f"{_TOOL_HINT}")
  table = payload.get("table")
  if not isinstance(table, dict):
    raise ValueError(f"entropy threshold table {path!r} has no 'table' object; {_TOOL_HINT}")
  percentiles = np.asarray(table.get("percentiles", []), np.float64)
  values = np.asarray(table.get("values", []), np.float64)
  if (percentiles.ndim != 1 or percentiles.size < 2 or percentiles.shape != values.shape
      or percentiles[0] != 0 or percentiles[-1] != 100 or np.any(np.diff(percentiles) <= 0)
      or np.any(np.diff(values) < 0) or not np.all(np.isfinite(values))):
    raise ValueError(f"entropy threshold table {path!r} needs increasing 'percentiles' from 0 "
                     f"to 100 and non-decreasing finite 'values' of the same length; "
                     f"{_TOOL_HINT}")
  return {**table, "meta": payload.get("meta", {})}


def compute_entropy_thresholds(data_cfg: Any, patch_size: int, num_images: int,
                               batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
  """Entropy threshold table over the first `num_images` un-augmented train images.

  Adds `num_images` (images actually used) and `image_size` [H, W] to the table.
  """
  from dq.data.pipeline import make_dataset  # Deferred: the data stack is heavy.

  if num_images < 1:
    raise ValueError(f"num_images must be >= 1; got {num_images}")
  batch_size = min(batch_size, num_images)
  dataset = make_dataset(data_cfg, split="train", batch_size=batch_size, seed=seed,
                         train=False, num_epochs=1, drop_remainder=False)
  entropy_fn = jax.jit(patch_entropy, static_argnums=1)
  collected, seen, image_size = [], 0, None
  for batch in dataset:
    images = np.asarray(batch["image"])[:num_images - seen]  # [b, H, W, 3]
    image_size = list(images.shape[1:3])
    collected.append(np.asarray(entropy_fn(images, patch_size)).reshape(-1))
    seen += images.shape[0]
    if seen >= num_images:
      break
  if not seen:
    raise ValueError("the train split of the configured data pipeline yielded no images")
  table = entropy_threshold_table(np.concatenate(collected))
  table.update(num_images=seen, image_size=image_size)
  return table



def _data_description(data_cfg: Any) -> str:
  """Names the data source, e.g. 'embedded', 'folder:/data/ffhq', 'tfds:imagenet2012'."""
  name = data_cfg.get("name", "unknown")
  if name == "folder":
    return f"folder:{data_cfg.folder.train_path}"
  if name == "tfds":
    return f"tfds:{data_cfg.tfds.name}"
  return str(name)


def write_thresholds_for_config(config: Any, output: str, num_images: int,
                                batch_size: int = 32, seed: int = 0) -> dict:
  """Computes the table for a full config (region size = coarsest factor), saves it with its
  meta to `output` and returns it (with `meta`)."""
  patch_size = grid_factors(config.model.ch_mult, 1)[0]  # the coarsest factor
  table = compute_entropy_thresholds(config.data, patch_size, num_images,
                                     batch_size=batch_size, seed=seed)
  meta = {
      "patch_size": patch_size,
      "num_bins": 32,
      "value_range": [-1.0, 1.0],
      "sigma": 0.01,
      "image_size": table["image_size"],
      "num_images": table["num_images"],
      "num_regions": table["num_regions"],
      "data": _data_description(config.data),
      "split": "train",
      "seed": seed,
  }
  save_threshold_table(output, table, meta)
  return {**table, "meta": meta}


def resolve_entropy_thresholds(config: Any, workdir: str) -> tuple[float, ...]:
  """Thresholds for the entropy router (or the feature router's entropy warm-up teacher):
  from `router.thresholds_path`, else computed once from the configured training data and
  stored as `WORKDIR/entropy_thresholds.json`."""
  from dq.models.router import needs_entropy_thresholds  # Deferred: imports flax.

  router = config.model.router
  if router.kind != "entropy" and not needs_entropy_thresholds(router):
    return ()
  path = router.thresholds_path
  if not path:
    path = os.path.join(workdir, "entropy_thresholds.json")
    if not os.path.exists(path):
      logging.info("Computing entropy thresholds from %d training images -> %s",
                   router.threshold_images, path)
      if jax.process_index() == 0:
        write_thresholds_for_config(config, path, router.threshold_images, seed=config.seed)
      else:
        table = compute_entropy_thresholds(
            config.data, patch_size=grid_factors(config.model.ch_mult, 1)[0],
            num_images=router.threshold_images, seed=config.seed)
        return thresholds_from_table(table, router, config.model.num_grains)
  table = load_threshold_table(path)
  return thresholds_from_table(table, router, config.model.num_grains)


def thresholds_from_table(table: Mapping[str, Any], router: Any, num_grains: int
                          ) -> tuple[float, ...]:
  """The router's thresholds for its grain targets (`fine_ratio`, and `median_ratio` for
  triple grain; `dq.models.grains.GrainTargets`)."""
  targets = GrainTargets.from_router(router, num_grains)
  if num_grains == 2:
    return (float(threshold_for_ratio(table, targets.fine)),)
  return tuple(float(t) for t in thresholds_for_ratios(table, targets.median, targets.fine))
