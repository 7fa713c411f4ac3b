"""The input pipeline the trainers use: config -> source -> grain batches.

Order: source -> shard (record `shard_index::shard_count`) -> shuffle (train, reshuffled
every epoch) -> repeat -> drop undecodable records -> crop / flip / scale -> batch
[-> worker processes]. Shards of the same source are disjoint and cover it; their sizes
differ by at most one record.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from dq.data import embedded, folder, stats, tfds_source, transforms

SPLITS = ("train", "eval")
DATASET_NAMES = ("embedded", "folder", "tfds")
skipped_counts = stats.skipped_counts


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def build_source(data_cfg: Any, split: str):
  """Random-access source (len + __getitem__) of raw records for the configured dataset.

  Raw records: {'image': uint8 [h, w, 3], 'label': int32, 'index': int64, 'valid': bool,
  'detail_mask': float32 [h, w] or None}.
  """
  _check_split(split)
  name, image_size = data_cfg.name, data_cfg.image_size
  if name == "embedded":
    cfg = data_cfg.embedded
    return embedded.EmbeddedSource(
        split, image_size=image_size,
        size=cfg.train_size if split == "train" else cfg.eval_size,
        procedural_fraction=cfg.procedural_fraction, photos=cfg.photos)
  if name == "folder":
    cfg = data_cfg.folder
    source, _ = folder.build_folder_source(
        split, train_path=cfg.train_path, eval_path=cfg.eval_path,
        eval_fraction=cfg.eval_fraction, labels_from_subfolders=cfg.labels_from_subfolders,
        min_size=image_size, max_bad_fraction=data_cfg.max_bad_fraction)
    return source
  if name == "tfds":
    cfg = data_cfg.tfds
    return tfds_source.build_tfds_source(
        split, name=cfg.name, data_dir=cfg.data_dir, train_split=cfg.train_split,
        eval_split=cfg.eval_split, image_key=cfg.image_key, label_key=cfg.label_key,
        min_size=image_size, max_bad_fraction=data_cfg.max_bad_fraction)
  raise ValueError(f"data.name={name!r}; expected one of {DATASET_NAMES}")


def num_classes(data_cfg: Any) -> int:
  """Number of label values of the configured dataset (1 when it has no labels)."""
  if data_cfg.name == "embedded":
    return embedded.NUM_CLASSES
  if data_cfg.name == "folder":
    cfg = data_cfg.folder
    if not cfg.labels_from_subfolders:
      return 1
    _, classes = folder.build_folder_source(
        "train", train_path=cfg.train_path, eval_path=cfg.eval_path,
        eval_fraction=cfg.eval_fraction, labels_from_subfolders=True)
    return len(classes)
  count = build_source(data_cfg, "train").num_classes()
  if count is None:
    raise ValueError(f"TFDS feature data.tfds.label_key={data_cfg.tfds.label_key!r} is not a "
                     "ClassLabel; its number of classes is unknown")
  return count


def detail_mask_available(data_cfg: Any) -> bool:
  """True when batches carry a real detail mask (embedded data with procedural images)."""
  if data_cfg.name != "embedded":
    return False
  cfg = data_cfg.embedded
  return cfg.procedural_fraction > 0 or not cfg.photos


class ProcessSlice(grain.MapDataset):
  """Process `index`'s part of every global batch of a global record order.

  Global batch b is records [b * G, (b + 1) * G) of the parent (G = local_batch * count); process
  p reads records [b * G + p * L, b * G + (p + 1) * L). Every process sees the same global order,
  so a run's global batches do not depend on how many processes feed them.
  """

  def __init__(self, parent: grain.MapDataset, local_batch: int, count: int, index: int):
    super().__init__(parent)
    self._local, self._count, self._index = local_batch, count, index

  def __len__(self) -> int:
    return len(self._parent) // (self._local * self._count) * self._local

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    batch, i = divmod(j, self._local)
    return self._parent[(batch * self._count + self._index) * self._local + i]

  def __str__(self) -> str:
    return f"ProcessSlice(local_batch={self._local}, count={self._count}, index={self._index})"


class _IsValid(grain.transforms.Filter):

  def filter(self, element: dict[str, Any]) -> bool:
    return bool(element["valid"])


class _TrainTransform(grain.transforms.RandomMap):
  """Random crop / flip per the config, then scaling; seeded per element by grain."""

  def __init__(self, image_size: int, random_crop: bool, random_flip: bool):
    self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return transforms.preprocess(element, image_size=self.image_size, rng=rng,
                                 random_crop=self.random_crop, random_flip=self.random_flip)


class _EvalTransform(grain.transforms.Map):
  """Centre crop and scaling, no randomness."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return transforms.preprocess(element, image_size=self.image_size, rng=None,
                                 random_crop=False, random_flip=False)


class _AttachNewSkips(grain.transforms.Map):
  """Adds `skipped_records`: records this (maybe worker) process skipped since its last batch."""

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "skipped_records": np.int64(stats.take_new_skips())}


def order_records(dataset: grain.MapDataset, *, split: str, seed: int, train: bool,
                  shard_index: int, shard_count: int,
                  num_epochs: int | None) -> grain.MapDataset:
  """Record order before per-record transforms.

  Train: one global order, shuffled with `seed` and reshuffled every epoch, the same in every
  process (each later keeps its part with `process_slice`). Eval: the records strided over
  processes (`[shard_index::shard_count]`), in order.
  """
  if shard_count > len(dataset):
    raise ValueError(f"{len(dataset)} records of the {split} split cannot be split into "
                     f"{shard_count} non-empty shards")
  if not train:
    dataset = dataset[shard_index::shard_count].seed(seed % 2**32)
    return dataset.repeat(num_epochs) if num_epochs is not None and num_epochs > 1 else dataset
  dataset = dataset.seed(seed % 2**32).shuffle()
  if num_epochs is None:
    return dataset.repeat(None)
  return dataset.repeat(num_epochs) if num_epochs > 1 else dataset


def process_slice(dataset: grain.MapDataset, *, train: bool, batch_size: int, shard_index: int,
                  shard_count: int) -> grain.MapDataset:
  """Train: this process's part of every global batch. Random transforms applied before this
  are seeded by the global record position, so augmentations do not depend on the process
  count either."""
  if not train or shard_count == 1:
    return dataset
  return ProcessSlice(dataset, batch_size, shard_count, shard_index)


def make_dataset(data_cfg: Any, *, split: str, batch_size: int, seed: int, train: bool,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                 drop_remainder: bool = True) -> grain.IterDataset:
  """Batches of {'image': f32 [B,H,W,3] in [-1,1], 'label': i32 [B],
  'detail_mask': f32 [B,H,W] (zeros where the source has none), 'index': i64 [B],
  'skipped_records': i64 [] (corrupt records skipped by the reading process since its previous
  batch; sum them for a run's count, also with worker processes)}.

  Per-process (shard_index/shard_count = jax process index/count; see `order_records`: in train
  mode every process reads its part of the same global batches), shuffled per epoch with `seed`
  when train, repeated forever when train and num_epochs is None; eval: one pass,
  no shuffle, no random augmentation. Corrupt files are filtered out (counted in
  `dq.data.stats`). `index` is the record's index in the split's source.
  """
  _check_split(split)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
  source = build_source(data_cfg, split)
  dataset = order_records(grain.MapDataset.source(source), split=split, seed=seed, train=train,
                          shard_index=shard_index, shard_count=shard_count,
                          num_epochs=num_epochs)
  dataset = dataset.filter(_IsValid())
  if train:
    dataset = dataset.random_map(_TrainTransform(data_cfg.image_size, data_cfg.random_crop,
                                                 data_cfg.random_flip))
  else:
    dataset = dataset.map(_EvalTransform(data_cfg.image_size))
  dataset = process_slice(dataset, train=train, batch_size=batch_size, shard_index=shard_index,
                          shard_count=shard_count)
  prefetch = int(data_cfg.prefetch_buffer)
  buffered = max(1, prefetch * batch_size)  # Elements read ahead by a thread pool.
  read_options = grain.ReadOptions(num_threads=min(16, buffered) if prefetch > 0 else 0,
                                   prefetch_buffer_size=buffered)
  batches = dataset.to_iter_dataset(read_options).batch(batch_size,
                                                        drop_remainder=drop_remainder)
  batches = batches.map(_AttachNewSkips())
  if data_cfg.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain reads absl flags (defaults) outside `app.run` too
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_cfg.worker_count), per_worker_buffer_size=max(1, prefetch)))
  return batches
