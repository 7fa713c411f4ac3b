"""Stage-2 sampling: the `sample` mode of `python -m dq.main` and the sample grids that
training writes (`make_generate_fn`, `write_sample_grid`). `dq.train.transformer_trainer`
re-exports these names."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from dq import viz
from dq.stage2 import progressive
from dq.stage2 import sampler as sampling
from dq.stage2 import stage1 as stage1_lib
from dq.stage2.build import build_transformer
from dq.stage2.tokens import TokenLayout, unpack_tokens_jax
from dq.train import checkpoint as ckpt
from dq.train.progress import Progress
from dq.train.transformer_step import PACKED_KEYS, make_init_fn, make_transformer_optimizer

NUM_GRAINS = 2  # the token layout is dual grain
GRID_COLUMNS = 4  # (sample | grain overlay) pairs per grid row


def make_generate_fn(model: Any, layout: TokenLayout, stage1: stage1_lib.Stage1,
                     sampling_cfg: sampling.SamplingConfig
                     ) -> Callable[[Any, jax.Array, Any], dict]:
  """(params, rng, labels [B] or batch size) -> host dict codes, grain, images, length and the
  packed sequences as `packed_<field>` (content, position, segment, valid)."""
  sampler = sampling.make_sampler(model, layout, sampling_cfg)
  decode = stage1_lib.make_decode_fn(stage1)
  device = jax.local_devices()[0]

  def generate(params: Any, rng: jax.Array, labels_or_batch: Any) -> dict:
    # One device: a replicated sampling loop would repeat the same work on every device.
    params = jax.device_put(params, device)
    packed = sampler(params, jax.device_put(rng, device), labels_or_batch)
    codes, grain = unpack_tokens_jax(packed, layout)  # [B, hf, wf], [B, hc, wc]
    images = decode(codes)  # [B, H, W, 3] in [-1, 1]
    return jax.device_get({"codes": codes, "grain": grain, "images": images,
                           "length": packed["length"],
                           **{f"packed_{k}": packed[k] for k in PACKED_KEYS}})

  return generate


def sample_labels(config: Any, layout: TokenLayout, count: int) -> Optional[np.ndarray]:
  """Labels of `count` samples: `sample.labels` cycled, or a cycle over the classes when it is
  empty; None for an unconditional model."""
  text = str(config.sample.get("labels", "")).strip()
  if layout.num_classes == 0:
    if text:
      raise ValueError(f"config.sample.labels={text!r} but the model is unconditional "
                       "(config.class_conditional=False); leave it empty")
    return None
  if not text:
    return (np.arange(count) % layout.num_classes).astype(np.int32)
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(f"config.sample.labels={text!r}: expected comma-separated ints") from e
  bad = [v for v in values if not 0 <= v <= layout.num_classes]
  if not values or bad:
    raise ValueError(f"config.sample.labels={text!r}: labels must lie in [0, "
                     f"{layout.num_classes}] ({layout.num_classes} = null class)")
  return np.resize(np.asarray(values, np.int32), count)


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
  step_h, step_w = height + viz.SEPARATOR, width + viz.SEPARATOR
  grid = np.full((rows * step_h - viz.SEPARATOR, 2 * columns * step_w - viz.SEPARATOR, 3),
                 viz.SEPARATOR_VALUE, np.uint8)
  for i in range(count):
    top, left = (i // columns) * step_h, 2 * (i % columns) * step_w
    grid[top:top + height, left:left + width] = images[i]
    grid[top:top + height, left + step_w:left + step_w + width] = viz.grain_overlay(
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
  fine = float(np.mean(out["grain"]))
  writer.write_scalars(step, {"sample/fine_ratio": fine,
                              "sample/length": float(np.mean(out["length"]))})
  strip = progressive.generation_strip(packed_of(out), layout, decode_partial, max_images=4,
                                       scale=2)
  writer.write_images(step, {"samples": sample_grid(viz.to_uint8(out["images"]),
                                                    out["grain"])[None],
                             "generation_strip": strip[None]})


def restore_params(config: Any, workdir: str, abstract_params: Any,
                   layout: Optional[TokenLayout] = None,
                   stage1: Optional[stage1_lib.Stage1] = None) -> tuple[Any, int, str]:
  """(params, step, source) from the latest checkpoint in the workdir, else `init_from`; with
  `layout`, a checkpoint trained for another stage 1 or token layout is named as such, and with
  `stage1`, a run trained on another DQ-VAE of the same shapes (`check_stage1_of_run`)."""
  from dq.train.transformer_trainer import check_stage1_of_run  # Deferred: it imports this.
  manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints, async_save=False)
  source = workdir if manager.latest_step() is not None else config.get("init_from")
  if not source:
    raise FileNotFoundError(f"sample: no checkpoint in {workdir}/checkpoints and no "
                            "config.init_from; train first (mode 'train') or set "
                            "--config.init_from=DIR")
  restored = ckpt.restore_params_from(source)
  params = restored["params"]
  if layout is not None:
    sampling.check_checkpoint_matches_layout(params, layout, f"checkpoint {source}")
  if stage1 is not None:  # same shapes, other weights
    check_stage1_of_run(source, stage1)
  if jax.tree.structure(params) != jax.tree.structure(abstract_params) or any(
      np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(params),
                                             jax.tree.leaves(abstract_params))):
    raise ValueError(f"checkpoint {source}: its parameters do not match config.model and the "
                     "token layout (different widths, depths, stage 1 or classes)")
  params = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, abstract_params)
  return params, int(restored["step"]), source


def sample(config: Any, workdir: str) -> str:
  """Sample mode: `sample.num_images` images -> one PNG each, `grid.png` and `samples.npz`
  (codes, grain, labels (-1 when unconditional), images uint8, length and the sampling
  settings) under `sample.out_dir` (default WORKDIR/samples). Returns the .npz path."""
  from dq.train.transformer_trainer import (load_stage1, make_layout,  # Deferred: it imports
                                            resolve_data_config)       # this module.
  stage1 = load_stage1(config)
  layout = make_layout(config, stage1, resolve_data_config(config, stage1))
  model = build_transformer(config.model, layout)
  sampling_cfg = sampling.sampling_config_from(config.sample)
  count, batch_size = int(config.sample.num_images), int(config.sample.batch_size)
  if count < 1 or batch_size < 1:
    raise ValueError(f"config.sample.num_images={count} and config.sample.batch_size="
                     f"{batch_size} must be >= 1")
  labels = sample_labels(config, layout, count)
  tx, _ = make_transformer_optimizer(config.optim, config.train.num_steps)
  abstract = jax.eval_shape(make_init_fn(model, tx, layout), jax.random.PRNGKey(0))
  params, step, source = restore_params(config, workdir, abstract.params, layout, stage1)
  params = jax.device_put(params, jax.local_devices()[0])  # once, not per batch
  generate = make_generate_fn(model, layout, stage1, sampling_cfg)
  logging.info("Sampling %d images in batches of %d from %s (step %d), %s", count, batch_size,
               source, step, sampling_cfg)

  num_batches = -(-count // batch_size)
  progress = Progress(num_batches, 0, every=1)
  base_rng = jax.random.PRNGKey(config.sample.seed)
  parts = []
  for index in range(num_batches):
    take = min(batch_size, count - index * batch_size)
    if labels is None:
      request = batch_size
    else:  # pad the last batch to one shape (one compilation), then trim
      request = np.resize(labels[index * batch_size:index * batch_size + take], batch_size)
    out = generate(params, jax.random.fold_in(base_rng, index), request)
    parts.append({k: v[:take] for k, v in out.items()})
    progress(index + 1)
  result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  images = viz.to_uint8(result["images"])  # [N, H, W, 3]

  out_dir = config.sample.out_dir or os.path.join(workdir, "samples")
  npz_path = os.path.join(out_dir, "samples.npz")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images):
      viz.save_png(os.path.join(out_dir, f"sample_{i:05d}.png"), image)
    viz.save_png(os.path.join(out_dir, "grid.png"), sample_grid(images[:64], result["grain"][:64]))
    viz.save_png(os.path.join(out_dir, "generation_strip.png"), progressive.generation_strip(
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
