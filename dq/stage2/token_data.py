"""Pre-encoded token datasets: the tokens folder's format and reading it (the encoding that
writes it is `dq.stage2.token_encoding`).

Layout of a tokens folder:
  meta.json              grids, codebook, image size, classes, flips, the stage-1 source and its
                         tokenizer fingerprint, per split {num_images, shards, fine_ratio_mean}
  {split}-{i:05d}.npz    codes [N, hf, wf] (int16 when the codebook has < 32768 codes),
                         grain uint8 [N, hc, wc], label int32 [N], and with flips the codes and
                         grain of the horizontally flipped images (codes_flip, grain_flip)

Shards and meta.json are written atomically (temp file + rename), and meta.json last, so an
interrupted encode leaves no split listed; re-running it redoes that split, and a split already
listed for the same stage-1 model is skipped.
"""
from __future__ import annotations

import collections
import json
import os
import threading
from typing import Any, Optional

from absl import logging
import grain
import numpy as np

from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import pack_tokens

META_FILE = "meta.json"
FINGERPRINT_FIELD = "stage1_fingerprint"  # dq.tokenizer.tokenizer_fingerprint
META_FORMAT = "dq-tokens/v1"
LAYOUT_FIELDS = ("coarse_size", "fine_size", "codebook_size", "num_classes")
RECORD_FIELDS = ("codes", "grain", "label")
FLIP_FIELDS = ("codes_flip", "grain_flip")
ENCODE_HINT = ("create it with the encode job (python -m dq.main "
               "--config=configs/demo_transformer.py:stage1=VAE_DIR --config.mode=encode "
               "--config.tokens.dir=DIR --workdir=WORKDIR) or "
               "dq.stage2.token_encoding.encode_dataset")


def write_atomic(path: str, write: Any) -> None:
  """Calls write(file) on a temp file next to `path`, then renames it over `path`."""
  directory, name = os.path.split(path)
  temp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}")
  try:
    with open(temp, "wb") as f:
      write(f)
    os.replace(temp, path)
  finally:
    if os.path.exists(temp):
      os.remove(temp)


def write_json_atomic(path: str, payload: dict) -> None:
  """Writes `payload` as JSON to `path` through a temp file and a rename."""
  data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()
  write_atomic(path, lambda f: f.write(data))


def codes_dtype(codebook_size: int) -> np.dtype:
  return np.dtype(np.int16) if codebook_size < 2**15 else np.dtype(np.int32)


def load_token_meta(tokens_dir: str) -> dict:
  """Reads `tokens_dir/meta.json`; FileNotFoundError (saying how to make it) when missing."""
  path = os.path.join(tokens_dir, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"token folder {tokens_dir} has no {META_FILE}; {ENCODE_HINT}")
  with open(path) as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
    raise ValueError(f"{path} is not a token meta file (format {META_FORMAT!r}); {ENCODE_HINT}")
  return meta


def _layout_values(layout: TokenLayout) -> dict[str, Any]:
  return {"coarse_size": list(layout.coarse_size), "fine_size": list(layout.fine_size),
          "codebook_size": layout.codebook_size, "num_classes": layout.num_classes}


def check_token_meta(meta: dict, layout: TokenLayout, tokens_dir: str,
                     stage1_source: Optional[str] = None,
                     stage1_fingerprint: Optional[str] = None) -> None:
  """ValueError naming the first of coarse_size / fine_size / codebook_size / num_classes on
  which the tokens in `tokens_dir` disagree with `layout` (and, when `stage1_source` or
  `stage1_fingerprint` is given, when they were encoded by another stage-1 model: tokens
  written before fingerprints existed are not checked for it)."""
  expected_values = _layout_values(layout)
  if stage1_source is not None:
    expected_values["stage1"] = os.path.abspath(stage1_source)
  for field, expected in expected_values.items():
    stored = meta.get(field)
    if stored != expected:
      raise ValueError(f"tokens in {tokens_dir} have {field}={stored} but the token layout "
                       f"needs {field}={expected}; re-encode them into another tokens dir")
  stored = meta.get(FINGERPRINT_FIELD)
  if stage1_fingerprint and stored and stored != stage1_fingerprint:
    raise ValueError(
        f"tokens in {tokens_dir} were encoded by a stage-1 model with tokenizer fingerprint "
        f"{stored} (from {meta.get('stage1')}), but config.stage1.path gives fingerprint "
        f"{stage1_fingerprint}: its encoder, router or codebook differ (another or a further-"
        "trained DQ-VAE), so the tokens mean other codes. Re-encode them into another tokens "
        "dir, or point config.stage1.path at the checkpoint they were made with")


def _split_meta(meta: dict, split: str, tokens_dir: str) -> dict:
  splits = meta.get("splits", {})
  if split not in splits:
    raise ValueError(f"tokens in {tokens_dir} have no {split!r} split (have {sorted(splits)}); "
                     f"{ENCODE_HINT}")
  return splits[split]


class TokenSource:
  """Random-access grain source over the token shards of one split.

  Records: {'codes' [hf, wf], 'grain' [hc, wc], 'label' int32, and 'codes_flip', 'grain_flip'
  when the shards have flips}. Shards are loaded on first use; the `max_cached_shards` most
  recently used stay in memory.
  """

  def __init__(self, tokens_dir: str, split: str, max_cached_shards: int = 8):
    self.tokens_dir, self.split = tokens_dir, split
    self.max_cached_shards = max(1, int(max_cached_shards))
    meta = load_token_meta(tokens_dir)
    entry = _split_meta(meta, split, tokens_dir)
    self.has_flips = bool(meta.get("flips", False))
    self.shards = [os.path.join(tokens_dir, name) for name in entry["shards"]]
    missing = [path for path in self.shards if not os.path.isfile(path)]
    if missing:
      raise FileNotFoundError(f"token shard {missing[0]} listed in {tokens_dir}/{META_FILE} is "
                              f"missing; delete the folder and re-encode")
    sizes = []
    for path in self.shards:
      with np.load(path) as shard:
        sizes.append(int(shard["label"].shape[0]))
    self.ends = np.cumsum(sizes, dtype=np.int64)  # [num_shards]
    if sum(sizes) != entry["num_images"]:
      raise ValueError(f"{split} shards in {tokens_dir} hold {sum(sizes)} records but "
                       f"{META_FILE} lists {entry['num_images']}; delete the folder and "
                       "re-encode")
    self._init_cache()

  def _init_cache(self) -> None:
    self._cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def _shard(self, index: int) -> dict:
    with self._lock:
      if index in self._cache:
        self._cache.move_to_end(index)
        return self._cache[index]
    with np.load(self.shards[index]) as npz:
      arrays = {name: npz[name] for name in npz.files}
    with self._lock:
      self._cache[index] = arrays
      self._cache.move_to_end(index)
      while len(self._cache) > self.max_cached_shards:
        self._cache.popitem(last=False)
    return arrays

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"token record {index} outside [0, {len(self)})")
    shard = int(np.searchsorted(self.ends, index, side="right"))
    offset = index - (int(self.ends[shard - 1]) if shard else 0)
    arrays = self._shard(shard)
    fields = RECORD_FIELDS + (FLIP_FIELDS if self.has_flips else ())
    return {name: arrays[name][offset] for name in fields}

  def __repr__(self) -> str:
    return f"TokenSource({self.tokens_dir!r}, split={self.split!r}, size={len(self)})"


class _RandomFlip(grain.transforms.RandomMap):
  """Picks the flipped tokens with probability 0.5."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    flip = rng.random() < 0.5
    return {"codes": element["codes_flip" if flip else "codes"],
            "grain": element["grain_flip" if flip else "grain"], "label": element["label"]}


class _DropFlips(grain.transforms.Map):

  def map(self, element: dict) -> dict:
    return {name: element[name] for name in RECORD_FIELDS}


class _PackBatch(grain.transforms.Map):
  """Batched records -> packed token arrays + labels."""

  def __init__(self, layout: TokenLayout, fine_order: str):
    self.layout, self.fine_order = layout, fine_order

  def map(self, batch: dict) -> dict:
    labels = np.asarray(batch["label"], np.int32)
    packed = pack_tokens(np.asarray(batch["codes"], np.int32),
                         np.asarray(batch["grain"], np.int32), self.layout,
                         labels=labels if self.layout.num_classes > 0 else None,
                         fine_order=self.fine_order)
    return {**packed, "label": labels}


def make_token_dataset(tokens_dir: str, layout: TokenLayout, *, split: str, batch_size: int,
                       seed: int, train: bool, shard_index: int = 0, shard_count: int = 1,
                       num_epochs: Optional[int] = None, flip: bool = True,
                       fine_order: str = "row", drop_remainder: bool = True
                       ) -> grain.IterDataset:
  """Batches {'content', 'position', 'segment' int32 [B, max_len], 'valid' bool [B, max_len],
  'label' int32 [B]} from the token shards of `split`.

  Per-process sharded (records shard_index::shard_count), shuffled per epoch with `seed` and
  repeated forever when train and num_epochs is None; when train and flip and the shards have
  flips, each record uses its flipped tokens with probability 0.5. The iterator's state is
  checkpointable by grain.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
  check_token_meta(load_token_meta(tokens_dir), layout, tokens_dir)
  source = TokenSource(tokens_dir, split)
  if shard_count > len(source):
    raise ValueError(f"{len(source)} token records of the {split} split cannot be split into "
                     f"{shard_count} non-empty shards")
  dataset = grain.MapDataset.source(source)[shard_index::shard_count]
  dataset = dataset.seed(seed % 2**32)
  if train:
    dataset = dataset.shuffle()
  if num_epochs is None and train:
    dataset = dataset.repeat(None)
  elif num_epochs is not None and num_epochs > 1:
    dataset = dataset.repeat(num_epochs)
  if train and flip and not source.has_flips:
    logging.warning("Tokens in %s have no flipped copies; training without flips", tokens_dir)
  if train and flip and source.has_flips:
    dataset = dataset.random_map(_RandomFlip())
  else:
    dataset = dataset.map(_DropFlips())
  read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size)
  batches = dataset.to_iter_dataset(read_options).batch(batch_size,
                                                        drop_remainder=drop_remainder)
  return batches.map(_PackBatch(layout, fine_order))
