"""Stage-2 sampling: the `sample` mode of `python -m dq.main` and the sample grids that
training writes (`write_sample_grid`). Loading and the batched generation loop are
`dq.generator`'s (`make_generate_fn`, `sample_labels`, `restore_params`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from dq import generator as gen
from dq.summaries import images as pictures
from dq.summaries.png import save_png
from dq.models.grains import fine_fraction
from dq.generator import make_generate_fn, restore_params, sample_labels
from dq.stage2 import progressive
from dq.stage2 import sampler as sampling
from dq.stage2.build import build_transformer
from dq.train.progress import Progress
from dq.train.transformer_step import PACKED_KEYS

NUM_GRAINS = 2  # the token layout is dual grain
GRID_COLUMNS = 4  # (sample | grain overlay) pairs per grid row


def sample_grid(images: np.ndarray, grains: np.ndarray, columns: int = GRID_COLUMNS
                ) -> np.ndarray:
  """Pairs (sample | grain overlay) in rows of `columns` pairs, 2-px white separators.

  Args:
    images: uint8 [N, H, W, 3]; grains: int [N, hc, wc] (0 coarse, 1 fine).

  Returns:
    uint8 grid [rows * (H + 2) - 2, 2 * columns * (W + 2) - 2, 3].
  """
  count, height, width = images.shape[:3]
  columns = max(1, min(columns, count))
  rows = -(-count // columns)
  separator = pictures.SEPARATOR
  step_h, step_w = height + separator, width + separator
  grid = np.full((rows * step_h - separator, 2 * columns * step_w - separator, 3),
                 pictures.SEPARATOR_VALUE, np.uint8)
  for i in range(count):
    top, left = (i // columns) * step_h, 2 * (i % columns) * step_w
    grid[top:top + height, left:left + width] = images[i]
    grid[top:top + height, left + step_w:left + step_w + width] = pictures.grain_overlay(
        images[i], grains[i], NUM_GRAINS)
  return grid


def packed_of(out: dict) -> dict:
  """The packed sequences of a `generate` result (its `packed_<field>` entries)."""
  return {k: out[f"packed_{k}"] for k in PACKED_KEYS}


def write_sample_grid(writer, generate, decode_partial, params, config, layout, step) -> None:
  count = config.train.sample_images
  labels = sample_labels(config, layout, count)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.sample.seed), step)
  out = generate(params, rng, count if labels is None else labels)
  fine = float(fine_fraction(np.asarray(out["grain"]), NUM_GRAINS))
  writer.write_scalars(step, {"sample/fine_ratio": fine,
                              "sample/length": float(np.mean(out["length"]))})
  strip = progressive.generation_strip(packed_of(out), layout, decode_partial, max_images=4,
                                       scale=2)
  writer.write_images(step, {"samples": sample_grid(pictures.to_uint8(out["images"]),
                                                    out["grain"])[None],
                             "generation_strip": strip[None]})


def sample(config: Any, workdir: str) -> str:
  """Sample mode: `sample.num_images` images -> one PNG each, `grid.png` and `samples.npz`
  (codes, grain, labels (-1 when unconditional), images uint8, length and the sampling
  settings) under `sample.out_dir` (default WORKDIR/samples). Returns the .npz path."""
  stage1 = gen.load_stage1(config)
  layout = gen.make_layout(config, stage1, gen.resolve_data_config(config, stage1))
  model = build_transformer(config.model, layout)
  sampling_cfg = sampling.sampling_config_from(config.sample)
  count, batch_size = int(config.sample.num_images), int(config.sample.batch_size)
  if count < 1 or batch_size < 1:
    raise ValueError(f"config.sample.num_images={count} and config.sample.batch_size="
                     f"{batch_size} must be >= 1")
  labels = sample_labels(config, layout, count)
  params, step, source = restore_params(config, workdir, gen.abstract_params(model, layout),
                                        layout, stage1)
  params = jax.device_put(params, jax.local_devices()[0])  # once, not per batch
  generate = make_generate_fn(model, layout, stage1, sampling_cfg)
  logging.info("Sampling %d images in batches of %d from %s (step %d), %s", count, batch_size,
               source, step, sampling_cfg)

  progress = Progress(gen.count_batches(count, batch_size), 0, every=1)
  parts = [{k: v[:take] for k, v in out.items()} for take, out in gen.generate_in_batches(
      lambda rng, request: generate(params, rng, request), range(count), batch_size, labels,
      jax.random.PRNGKey(config.sample.seed), progress)]
  result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  images = pictures.to_uint8(result["images"])  # [N, H, W, 3]

  out_dir = config.sample.out_dir or os.path.join(workdir, "samples")
  npz_path = os.path.join(out_dir, "samples.npz")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images):
      save_png(os.path.join(out_dir, f"sample_{i:05d}.png"), image)
    save_png(os.path.join(out_dir, "grid.png"), sample_grid(images[:64], result["grain"][:64]))
    save_png(os.path.join(out_dir, "generation_strip.png"), progressive.generation_strip(
        packed_of(result), layout, progressive.make_partial_decode_fn(stage1), max_images=4,
        scale=2))
    settings = {f"setting_{k}": np.asarray(v) for k, v in _settings(config, sampling_cfg,
                                                                    step).items()}
    np.savez(npz_path, codes=result["codes"].astype(np.int32),
             grain=result["grain"].astype(np.int32),
             labels=(np.full(count, -1, np.int32) if labels is None else labels),
             images=images, length=result["length"].astype(np.int32), **settings)
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
      json.dump(_settings(config, sampling_cfg, step), f, indent=1)
  logging.info("Wrote %d samples to %s", count, out_dir)
  return npz_path


def _settings(config: Any, sampling_cfg: sampling.SamplingConfig, step: int) -> dict:
  return {**dataclasses.asdict(sampling_cfg), "seed": int(config.sample.seed),
          "checkpoint_step": step, "labels": str(config.sample.get("labels", ""))}
