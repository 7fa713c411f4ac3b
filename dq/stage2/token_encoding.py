"""Encodes a split once with the DQ-VAE into a tokens folder (format: `dq.stage2.token_data`).

Shards and meta.json are written atomically (temp file + rename), and meta.json last, so an
interrupted encode leaves no split listed; re-running it redoes that split, and a split already
listed for the same stage-1 model is skipped.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

from absl import logging
import numpy as np

from dq.data import pipeline
from dq.stage2.token_data import (FINGERPRINT_FIELD, FLIP_FIELDS, META_FILE, META_FORMAT,
                                  RECORD_FIELDS, codes_dtype, load_token_meta, write_atomic,
                                  write_json_atomic)
from dq.tokenizer import Stage1, make_encode_fn


class _ShardWriter:
  """Buffers encoded records and writes `{split}-{i:05d}.npz` shards of `shard_size`."""

  def __init__(self, out_dir: str, split: str, shard_size: int, fields: tuple[str, ...]):
    self.out_dir, self.split, self.shard_size, self.fields = out_dir, split, shard_size, fields
    self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    self.buffered = 0
    self.shards: list[str] = []

  def add(self, arrays: dict[str, np.ndarray]) -> None:
    count = len(arrays["label"])
    start = 0
    while start < count:
      take = min(count - start, self.shard_size - self.buffered)
      for name in self.fields:
        self.buffer[name].append(arrays[name][start:start + take])
      self.buffered += take
      start += take
      if self.buffered == self.shard_size:
        self.flush()

  def flush(self) -> None:
    if not self.buffered:
      return
    name = f"{self.split}-{len(self.shards):05d}.npz"
    arrays = {field: np.concatenate(parts) for field, parts in self.buffer.items()}
    write_atomic(os.path.join(self.out_dir, name), lambda f: np.savez(f, **arrays))
    self.shards.append(name)
    self.buffer = {field: [] for field in self.fields}
    self.buffered = 0


def _encode_padded(encode, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a batch padded to `batch_size` (one compiled shape), padding dropped."""
  count = images.shape[0]
  if count < batch_size:
    pad = np.zeros((batch_size - count, *images.shape[1:]), images.dtype)
    images = np.concatenate([images, pad])
  codes, grain_map = encode(images)
  return np.asarray(codes)[:count], np.asarray(grain_map)[:count]


def _global_meta(stage1: Stage1, layout_values: dict, flips: bool) -> dict:
  return {"format": META_FORMAT, **layout_values, "image_size": stage1.image_size,
          "flips": bool(flips), "stage1": stage1.source, FINGERPRINT_FIELD: stage1.fingerprint}


def _matching_meta(out_dir: str, expected: dict) -> dict:
  """The tokens folder's meta (or a new one): its global fields must be `expected`'s."""
  meta_path = os.path.join(out_dir, META_FILE)
  meta = load_token_meta(out_dir) if os.path.isfile(meta_path) else {**expected, "splits": {}}
  for field, value in expected.items():
    if meta.get(field) != value and (field != FINGERPRINT_FIELD or field in meta):
      raise ValueError(f"tokens in {out_dir} were made with {field}={meta.get(field)!r}, not "
                       f"{value!r}; encode into another tokens dir or delete this one")
  return meta


def _encode_into(writer: "_ShardWriter", dataset, encode, *, split: str, batch_size: int,
                 flips: bool, max_images: int, num_classes: int,
                 codes_dtype) -> tuple[int, float]:
  """Encodes the dataset's batches into `writer`; returns (images seen, fine regions)."""
  seen, fine_sum, start = 0, 0.0, time.time()
  for batch in dataset:
    images = np.asarray(batch["image"], np.float32)  # [b, H, W, 3]
    labels = np.asarray(batch["label"], np.int32)  # [b]
    if max_images:
      images, labels = images[:max_images - seen], labels[:max_images - seen]
    if num_classes > 0 and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"{split} labels must lie in [0, {num_classes}) for num_classes="
                       f"{num_classes}; got range [{labels.min()}, {labels.max()}]")
    codes, grain_map = _encode_padded(encode, images, batch_size)
    arrays = {"codes": codes.astype(codes_dtype), "grain": grain_map.astype(np.uint8),
              "label": labels}
    if flips:
      codes_flip, grain_flip = _encode_padded(encode, images[:, :, ::-1], batch_size)
      arrays.update(codes_flip=codes_flip.astype(codes_dtype),
                    grain_flip=grain_flip.astype(np.uint8))
    written = len(writer.shards)
    writer.add(arrays)
    seen += len(labels)
    fine_sum += float(grain_map.sum())
    if len(writer.shards) > written:
      logging.info("Encoded %d %s images, %d shards (%.1f images/s)", seen, split,
                   len(writer.shards), seen / max(time.time() - start, 1e-9))
    if max_images and seen >= max_images:
      break
  return seen, fine_sum


def encode_dataset(stage1: Stage1, data_cfg: Any, out_dir: str, *, split: str = "train",
                   batch_size: int = 32, shard_size: int = 4096, flips: bool = True,
                   max_images: int = 0, num_classes: Optional[int] = None) -> dict:
  """Encodes one pass over `split` of `data_cfg` (eval-mode images) into token shards.

  Args:
    stage1: the DQ-VAE.
    data_cfg: `config.data`; its image_size must be the stage-1 model's.
    out_dir: the tokens folder (created; may already hold other splits of the same model).
    split: 'train' or 'eval'.
    batch_size: images per encoder call.
    shard_size: images per shard file.
    flips: also store the tokens of each image flipped horizontally.
    max_images: encode at most this many images (0: all).
    num_classes: classes of the layout the tokens are for (0: unconditional); None: the data's
      class count. Labels must lie in [0, num_classes) when it is > 0.

  Returns:
    The split's meta entry {num_images, shards, fine_ratio_mean}.
  """
  if batch_size < 1 or shard_size < 1 or max_images < 0:
    raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be >= 1 "
                     f"and max_images ({max_images}) >= 0")
  if data_cfg.image_size != stage1.image_size:
    raise ValueError(f"data.image_size={data_cfg.image_size} but the stage-1 model "
                     f"{stage1.source} codes {stage1.image_size} px images")
  num_classes = pipeline.num_classes(data_cfg) if num_classes is None else int(num_classes)
  layout_values = {"coarse_size": list(stage1.coarse_size), "fine_size": list(stage1.fine_size),
                   "codebook_size": stage1.codebook_size, "num_classes": num_classes}
  meta_path = os.path.join(out_dir, META_FILE)
  meta = _matching_meta(out_dir, _global_meta(stage1, layout_values, flips))
  if split in meta["splits"]:
    logging.info("Tokens of the %s split of %s are already in %s (%d images); skipping",
                 split, stage1.source, out_dir, meta["splits"][split]["num_images"])
    return meta["splits"][split]

  os.makedirs(out_dir, exist_ok=True)
  dataset = pipeline.make_dataset(data_cfg, split=split, batch_size=batch_size, seed=0,
                                  train=False, num_epochs=1, drop_remainder=False)
  fields = RECORD_FIELDS + (FLIP_FIELDS if flips else ())
  writer = _ShardWriter(out_dir, split, shard_size, fields)
  logging.info("Encoding the %s split into %s (batch %d, flips %s)", split, out_dir,
               batch_size, flips)
  start = time.time()
  seen, fine_sum = _encode_into(writer, dataset, make_encode_fn(stage1), split=split,
                                batch_size=batch_size, flips=flips, max_images=max_images,
                                num_classes=num_classes,
                                codes_dtype=codes_dtype(stage1.codebook_size))
  writer.flush()
  if not seen:
    raise ValueError(f"the {split} split of the configured data yielded no images to encode")
  regions = stage1.coarse_size[0] * stage1.coarse_size[1]
  entry = {"num_images": seen, "shards": writer.shards,
           "fine_ratio_mean": fine_sum / (seen * regions)}
  meta = load_token_meta(out_dir) if os.path.isfile(meta_path) else meta
  meta.setdefault("splits", {})[split] = entry
  write_json_atomic(meta_path, meta)
  logging.info("Encoded %d %s images into %d shards under %s (fine ratio %.3f, %.1f s)", seen,
               split, len(writer.shards), out_dir, entry["fine_ratio_mean"],
               time.time() - start)
  return entry
