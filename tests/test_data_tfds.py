"""TFDS source: a tiny ArrayRecord dataset built offline, and a fake random-access source."""
import io

import numpy as np
import pytest
from PIL import Image

from dq.data import config, pipeline, stats, tfds_source

SIZES = [(20 + i, 30 - i) for i in range(7)]


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> tuple[str, list[np.ndarray]]:
  """Builds 'dq_tiny' (train 7, validation 3) as ArrayRecord under a temp data_dir."""
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=3)})
  splits = {"train": [(i, {"image": im, "label": i % 3}) for i, im in enumerate(images)],
            "validation": [(i, {"image": im, "label": 2}) for i, im in enumerate(images[:3])]}
  tfds.dataset_builders.store_as_tfds_dataset(
      name="dq_tiny", version="1.0.0", features=features, split_datasets=splits,
      data_dir=data_dir, file_format="array_record")
  return data_dir, images


def tfds_config(data_dir: str):
  cfg = config.default_data_config()
  cfg.name, cfg.image_size, cfg.prefetch_buffer = "tfds", 16, 0
  cfg.tfds.name, cfg.tfds.data_dir = "dq_tiny", data_dir
  return cfg


def test_tfds_source_records(tiny_tfds):
  data_dir, images = tiny_tfds
  source = pipeline.build_source(tfds_config(data_dir), "train")
  assert len(source) == 7 and source.num_classes() == 3
  shapes = set()
  for i in range(7):
    record = source[i]
    assert record["valid"] and record["index"] == i
    shapes.add(record["image"].shape)
    matches = [j for j, im in enumerate(images) if np.array_equal(im, record["image"])]
    assert len(matches) == 1 and record["label"] == matches[0] % 3
  assert shapes == {(h, w, 3) for h, w in SIZES}
  assert len(pipeline.build_source(tfds_config(data_dir), "eval")) == 3
  assert pipeline.num_classes(tfds_config(data_dir)) == 3


def test_tfds_pipeline_batches(tiny_tfds):
  data_dir, _ = tiny_tfds
  cfg = tfds_config(data_dir)
  batches = list(pipeline.make_dataset(cfg, split="eval", batch_size=2, seed=0, train=False,
                                       drop_remainder=False))
  assert [b["image"].shape for b in batches] == [(2, 16, 16, 3), (1, 16, 16, 3)]
  assert np.concatenate([b["label"] for b in batches]).tolist() == [2, 2, 2]
  train = next(iter(pipeline.make_dataset(cfg, split="train", batch_size=7, seed=0,
                                          train=True)))
  assert sorted(train["index"].tolist()) == list(range(7))
  source = pipeline.build_source(cfg, "train")
  assert train["label"].tolist() == [source[i]["label"] for i in train["index"]]


def test_tfds_errors(tiny_tfds):
  data_dir, _ = tiny_tfds
  cfg = tfds_config(data_dir)
  cfg.tfds.image_key = "picture"
  with pytest.raises(KeyError, match="picture"):
    pipeline.build_source(cfg, "train")
  cfg = tfds_config(data_dir)
  cfg.tfds.name = "dq_missing_dataset"
  with pytest.raises(FileNotFoundError, match="dq_missing_dataset.*array_record"):
    pipeline.build_source(cfg, "train")
  cfg = tfds_config(data_dir)
  cfg.tfds.eval_split = "test"
  with pytest.raises(FileNotFoundError, match="'test'"):
    pipeline.build_source(cfg, "eval")
  cfg.tfds.name = ""
  with pytest.raises(ValueError, match="data.tfds.name"):
    pipeline.build_source(cfg, "train")


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_fake_source_decodes_and_skips():
  rng = np.random.default_rng(1)
  color = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (5, 6, 1), dtype=np.uint8)
  rgba = np.dstack([color, np.zeros((5, 6), np.uint8)])
  wide = (rng.integers(0, 65536, (5, 6))).astype(np.uint16)
  fake = [{"jpeg": png_bytes(color), "y": 1},
          {"jpeg": np.array(png_bytes(color), dtype=object), "y": 2},
          {"jpeg": b"not an image", "y": 3},
          {"jpeg": gray, "y": 4},
          {"jpeg": rgba, "y": 5},
          {"jpeg": wide, "y": 6}]
  source = tfds_source.TfdsSource(fake, name="fake-tfds", image_key="jpeg", label_key="y")
  records = [source[i] for i in range(len(fake))]
  assert [r["valid"] for r in records] == [True, True, False, True, True, True]
  np.testing.assert_array_equal(records[0]["image"], color)
  np.testing.assert_array_equal(records[1]["image"], color)
  np.testing.assert_array_equal(records[3]["image"], np.repeat(gray, 3, -1))
  np.testing.assert_array_equal(records[4]["image"], np.full((5, 6, 3), 255))
  np.testing.assert_array_equal(records[5]["image"][..., 1], np.round(wide / 257))
  assert [int(r["label"]) for r in records if r["valid"]] == [1, 2, 4, 5, 6]
  assert stats.skipped_counts()["fake-tfds"] == 1
  no_labels = tfds_source.TfdsSource(fake, name="fake-tfds-unlabelled", image_key="jpeg",
                                     label_key="")
  assert no_labels[0]["label"] == 0 and no_labels.num_classes() is None
