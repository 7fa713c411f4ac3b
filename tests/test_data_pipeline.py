"""grain pipeline: batch format, determinism, epochs, iterator state, sharding, transforms."""
import itertools
import os

import grain
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dq.data import config, pipeline, stats, transforms


def embedded_config(train_size: int = 24, eval_size: int = 20, image_size: int = 16):
  cfg = config.default_data_config()
  cfg.image_size = image_size
  cfg.embedded.train_size, cfg.embedded.eval_size = train_size, eval_size
  return cfg


def take(dataset_or_iterator, count: int) -> list[dict]:
  return list(itertools.islice(dataset_or_iterator, count))


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_default_config_fields():
  cfg = config.default_data_config()
  assert cfg.name == "embedded" and cfg.image_size == 64
  assert cfg.random_crop and cfg.random_flip
  assert cfg.embedded.to_dict() == dict(procedural_fraction=0.5, train_size=10_000,
                                        eval_size=256, photos=True)
  assert cfg.folder.to_dict() == dict(train_path="", eval_path="", eval_fraction=0.02,
                                      labels_from_subfolders=False)
  assert cfg.tfds.to_dict() == dict(name="", data_dir="", train_split="train",
                                    eval_split="validation", image_key="image",
                                    label_key="label")
  assert (cfg.max_bad_fraction, cfg.worker_count, cfg.prefetch_buffer) == (0.5, 0, 2)


def test_batch_format():
  stats.reset()  # skips left by earlier tests' bad files would be attached to this batch
  cfg = embedded_config()
  dataset = pipeline.make_dataset(cfg, split="train", batch_size=6, seed=0, train=True)
  assert isinstance(dataset, grain.IterDataset)
  iterator = iter(dataset)
  assert isinstance(iterator, grain.DatasetIterator)
  batch = next(iterator)
  assert set(batch) == {"image", "label", "detail_mask", "index", "skipped_records"}
  assert batch["skipped_records"].dtype == np.int64 and batch["skipped_records"] == 0
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert batch["detail_mask"].shape == (6, 16, 16) and batch["detail_mask"].dtype == np.float32
  assert batch["index"].shape == (6,) and batch["index"].dtype == np.int64
  assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
  assert set(np.unique(batch["detail_mask"])) <= {0.0, 1.0}


def test_train_is_deterministic_per_seed():
  cfg = embedded_config()
  first = take(pipeline.make_dataset(cfg, split="train", batch_size=4, seed=7, train=True), 3)
  second = take(pipeline.make_dataset(cfg, split="train", batch_size=4, seed=7, train=True), 3)
  assert_batches_equal(first, second)
  other = take(pipeline.make_dataset(cfg, split="train", batch_size=4, seed=8, train=True), 3)
  assert not np.array_equal(np.concatenate([b["index"] for b in first]),
                            np.concatenate([b["index"] for b in other]))


def test_train_epochs_reshuffle_and_repeat_forever():
  cfg = embedded_config(train_size=12)
  batches = take(pipeline.make_dataset(cfg, split="train", batch_size=4, seed=0, train=True), 9)
  epochs = np.concatenate([b["index"] for b in batches]).reshape(3, 12)
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])
  finite = list(pipeline.make_dataset(cfg, split="train", batch_size=4, seed=0, train=True,
                                      num_epochs=2))
  assert len(finite) == 6


def test_eval_is_one_ordered_pass_without_augmentation():
  cfg = embedded_config(eval_size=10)
  kwargs = dict(split="eval", batch_size=4, seed=0, train=False)
  batches = list(pipeline.make_dataset(cfg, drop_remainder=False, **kwargs))
  assert [len(b["index"]) for b in batches] == [4, 4, 2]
  assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(10))
  assert len(list(pipeline.make_dataset(cfg, **kwargs))) == 2  # drop_remainder default.
  again = list(pipeline.make_dataset(cfg, drop_remainder=False, **{**kwargs, "seed": 5}))
  assert_batches_equal(batches, again)  # The seed does not matter for eval.
  source = pipeline.build_source(cfg, "eval")
  np.testing.assert_array_equal(batches[0]["image"][1],
                                transforms.to_unit_range(source[1]["image"]))


def test_train_and_eval_splits_are_disjoint():
  cfg = embedded_config(train_size=64, eval_size=32)
  train = pipeline.build_source(cfg, "train")
  eval_ = pipeline.build_source(cfg, "eval")
  train_images = {train[i]["image"].tobytes() for i in range(64)}
  assert not train_images & {eval_[i]["image"].tobytes() for i in range(32)}


def assert_resumes_exactly(cfg, *, batch_size, seed):
  """3 batches, save the iterator state, 2 more; a fresh iterator restored from the state
  yields the same 2 batches."""
  make = lambda: pipeline.make_dataset(cfg, split="train", batch_size=batch_size, seed=seed,  # noqa: E731
                                       train=True)
  iterator = iter(make())
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 2)
  fresh = iter(make())
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)


@pytest.mark.parametrize("prefetch_buffer", [0, 2])
def test_iterator_state_round_trip(prefetch_buffer):
  cfg = embedded_config(train_size=20)
  cfg.prefetch_buffer = prefetch_buffer
  assert_resumes_exactly(cfg, batch_size=3, seed=1)


def test_iterator_state_round_trip_with_skipped_files(tmp_path):
  for i in range(10):
    Image.fromarray(np.full((10, 12, 3), i * 20, np.uint8)).save(tmp_path / f"img{i}.png")
  (tmp_path / "img3_bad.png").write_bytes(b"")
  cfg = config.default_data_config()
  cfg.name, cfg.image_size = "folder", 8
  cfg.folder.train_path = cfg.folder.eval_path = str(tmp_path)
  assert_resumes_exactly(cfg, batch_size=4, seed=3)


def test_shards_are_disjoint_and_cover():
  cfg = embedded_config(eval_size=11)
  shards = []
  for shard_index in range(2):
    batches = pipeline.make_dataset(cfg, split="eval", batch_size=2, seed=0, train=False,
                                    shard_index=shard_index, shard_count=2,
                                    drop_remainder=False)
    shards.append(np.concatenate([b["index"] for b in batches]).tolist())
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(11))
  assert abs(len(shards[0]) - len(shards[1])) <= 1
  train_cfg = embedded_config(train_size=12)
  train_shards = []
  for shard_index in range(2):
    batches = take(pipeline.make_dataset(train_cfg, split="train", batch_size=3, seed=0,
                                         train=True, shard_index=shard_index, shard_count=2), 2)
    train_shards.append(set(np.concatenate([b["index"] for b in batches]).tolist()))
  assert train_shards[0] | train_shards[1] == set(range(12))
  assert not train_shards[0] & train_shards[1]


@pytest.mark.parametrize("count", [2, 3])
def test_train_global_batches_do_not_depend_on_process_count(count):
  """Concatenating every process's local batch gives the one-process global batch, epochs too."""
  cfg = embedded_config(train_size=12)
  single = take(pipeline.make_dataset(cfg, split="train", batch_size=6, seed=5, train=True), 5)
  parts = [take(pipeline.make_dataset(cfg, split="train", batch_size=6 // count, seed=5,
                                      train=True, shard_index=p, shard_count=count), 5)
           for p in range(count)]
  for step, batch in enumerate(single):
    joined = np.concatenate([parts[p][step]["index"] for p in range(count)])
    np.testing.assert_array_equal(joined, batch["index"])
    np.testing.assert_array_equal(
        np.concatenate([parts[p][step]["image"] for p in range(count)]), batch["image"])


def test_detail_mask_follows_the_image():
  cfg = embedded_config(train_size=64, image_size=32)
  cfg.embedded.procedural_fraction = 1.0
  batch = next(iter(pipeline.make_dataset(cfg, split="train", batch_size=64, seed=2,
                                          train=True)))
  gray = batch["image"].mean(-1)  # [B, H, W]
  mean = ndimage.uniform_filter(gray, (1, 3, 3))
  std = np.sqrt(np.maximum(ndimage.uniform_filter(gray * gray, (1, 3, 3)) - mean * mean, 0))
  mask = batch["detail_mask"] > 0
  core = ndimage.binary_erosion(mask, np.ones((1, 5, 5)))
  far = ~ndimage.binary_dilation(mask, np.ones((1, 5, 5)))
  assert std[core].mean() > 5 * std[far].mean()
  assert 0.05 < mask.mean() < 0.6


def test_detail_mask_available_and_zero_masks(tmp_path):
  cfg = config.default_data_config()
  assert pipeline.detail_mask_available(cfg)
  cfg.embedded.procedural_fraction = 0.0
  assert not pipeline.detail_mask_available(cfg)
  cfg.name = "folder"
  assert not pipeline.detail_mask_available(cfg)
  for i in range(3):
    Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  cfg.folder.train_path = cfg.folder.eval_path = str(tmp_path)
  cfg.image_size = 8
  batch = next(iter(pipeline.make_dataset(cfg, split="eval", batch_size=3, seed=0,
                                          train=False)))
  assert batch["detail_mask"].shape == (3, 8, 8) and not batch["detail_mask"].any()
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0], np.array([0, 40, 80]) / 127.5 - 1,
                             atol=1e-6)


def test_num_classes(tmp_path):
  cfg = config.default_data_config()
  assert pipeline.num_classes(cfg) == 9
  for name in ("b", "a"):
    os.makedirs(tmp_path / name)
    for i in range(2):
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
  cfg.name = "folder"
  cfg.folder.train_path = str(tmp_path)
  assert pipeline.num_classes(cfg) == 1
  cfg.folder.labels_from_subfolders = True
  assert pipeline.num_classes(cfg) == 2


def test_bad_arguments():
  cfg = embedded_config()
  with pytest.raises(ValueError, match="split"):
    pipeline.make_dataset(cfg, split="validation", batch_size=2, seed=0, train=False)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_dataset(cfg, split="train", batch_size=0, seed=0, train=True)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_dataset(cfg, split="train", batch_size=2, seed=0, train=True,
                          shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="num_epochs"):
    pipeline.make_dataset(cfg, split="train", batch_size=2, seed=0, train=True, num_epochs=0)
  cfg.name = "imagenet"
  with pytest.raises(ValueError, match="'imagenet'"):
    pipeline.build_source(cfg, "train")


def test_crop_resize_matches_full_image_resize():
  image = np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)
  for box in [(0, 0, 90, 90), (40, 0, 130, 90), (13.5, 7.25, 71.5, 65.25), (50, 20, 60, 30)]:
    expected = np.asarray(Image.fromarray(image).resize((24, 24), Image.Resampling.BICUBIC,
                                                        box=box))
    np.testing.assert_array_equal(transforms.crop_resize(image, box, 24), expected)


def test_preprocess_eval_center_crop_equals_resize_then_crop():
  image = np.random.default_rng(1).integers(0, 256, (40, 80, 3), dtype=np.uint8)
  record = {"image": image, "label": 3, "index": 5, "detail_mask": None}
  out = transforms.preprocess(record, image_size=20, rng=None, random_crop=True,
                              random_flip=True)
  resized = np.asarray(Image.fromarray(image).resize((40, 20), Image.Resampling.BICUBIC))
  reference = resized[:, 10:30].astype(np.float32) / 127.5 - 1
  assert np.abs(out["image"] - reference).mean() < 2 / 127.5
  assert out["label"] == 3 and out["index"] == 5
  assert out["detail_mask"].shape == (20, 20) and not out["detail_mask"].any()


def test_preprocess_random_crop_and_flip_move_mask_with_image():
  image = np.zeros((32, 64, 3), np.uint8)
  image[:, :16] = 255  # A white band on the left quarter.
  mask = np.zeros((32, 64), np.float32)
  mask[:, :16] = 1
  record = {"image": image, "label": 0, "index": 0, "detail_mask": mask}
  flips = 0
  for seed in range(40):
    out = transforms.preprocess(record, image_size=16, rng=np.random.default_rng(seed),
                                random_crop=True, random_flip=True)
    white = out["image"].mean(-1) > 0
    np.testing.assert_array_equal(white, out["detail_mask"] > 0)
    flips += bool(white[:, -1].all() and not white[:, 0].any())
  assert 5 < flips < 35  # Some crops flipped the band to the right.
  centred = dict(record, detail_mask=np.roll(mask, 16, axis=1))  # Band at columns 16-31.
  plain = transforms.preprocess(centred, image_size=16, rng=np.random.default_rng(0),
                                random_crop=False, random_flip=False)
  assert plain["detail_mask"][:, :8].all() and not plain["detail_mask"][:, 8:].any()


def test_preprocess_rejects_bad_images():
  record = {"image": np.zeros((4, 4), np.uint8), "label": 0, "index": 9, "detail_mask": None}
  with pytest.raises(ValueError, match="record 9"):
    transforms.preprocess(record, image_size=4, rng=None, random_crop=False, random_flip=False)
