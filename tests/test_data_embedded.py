"""Embedded default data: procedural images with detail masks, and the packaged photos."""
import time

import numpy as np
import pytest
from scipy import ndimage

from dq.data import embedded, procedural


def local_std(image: np.ndarray) -> np.ndarray:
  """3x3 local standard deviation of the grey level of uint8 [H, W, 3] -> [H, W]."""
  gray = image.astype(np.float64).mean(-1) / 255.0
  mean = ndimage.uniform_filter(gray, 3)
  return np.sqrt(np.maximum(ndimage.uniform_filter(gray * gray, 3) - mean * mean, 0))


def test_procedural_shapes_and_determinism():
  example = procedural.make_example(3, 17, 48)
  assert example["image"].shape == (48, 48, 3) and example["image"].dtype == np.uint8
  assert example["detail_mask"].shape == (48, 48) and example["detail_mask"].dtype == np.float32
  assert set(np.unique(example["detail_mask"])) <= {0.0, 1.0}
  again = procedural.make_example(3, 17, 48)
  for key in example:
    np.testing.assert_array_equal(example[key], again[key])
  assert not np.array_equal(example["image"], procedural.make_example(3, 18, 48)["image"])
  assert not np.array_equal(example["image"], procedural.make_example(4, 17, 48)["image"])
  with pytest.raises(ValueError, match="image_size"):
    procedural.make_example(0, 0, 4)


def test_procedural_labels_cover_all_kinds():
  labels = np.array([procedural.make_example(0, i, 16)["label"] for i in range(400)])
  counts = np.bincount(labels, minlength=len(procedural.KINDS))
  assert len(counts) == len(procedural.KINDS)
  assert counts.min() > 400 / len(procedural.KINDS) / 2  # Roughly uniform.


def test_procedural_is_fast():
  procedural.make_example(0, 0, 64)
  times = []
  for i in range(60):
    start = time.perf_counter()
    procedural.make_example(0, i, 64)
    times.append(time.perf_counter() - start)
  assert np.median(times) < 2e-3, f"median {np.median(times) * 1e3:.2f} ms per 64px image"


def test_detail_mask_marks_fine_texture():
  inside, outside, textured_main, coverage = [], [], 0, []
  for i in range(120):
    example = procedural.make_example(1, i, 64)
    mask = example["detail_mask"] > 0
    std = local_std(example["image"])
    # Away from mask borders, so object edges count on neither side.
    core = ndimage.binary_erosion(mask, iterations=2)
    far = ~ndimage.binary_dilation(mask, iterations=2)
    inside.append(std[core])
    outside.append(std[far])
    coverage.append(mask.mean())
    if example["label"] in procedural.TEXTURED_KINDS:
      textured_main += 1
      assert mask.sum() > 0.05 * mask.size, f"example {i}: textured main object without mask"
  inside, outside = np.concatenate(inside), np.concatenate(outside)
  assert textured_main > 30
  assert inside.mean() > 8 * outside.mean(), (inside.mean(), outside.mean())
  assert np.median(outside) < 0.01
  coverage = np.array(coverage)
  assert 0.2 < (coverage > 0).mean() < 0.95  # Non-trivial: some images have none.


def test_procedural_eval_stream_is_disjoint():
  train = {procedural.make_example(0, i, 32, stream=0)["image"].tobytes() for i in range(300)}
  eval_ = {procedural.make_example(0, i, 32, stream=1)["image"].tobytes() for i in range(300)}
  assert len(train) == 300 and len(eval_) == 300
  assert not train & eval_


def test_photos_load_offline():
  photos = embedded.load_photos()
  assert set(photos) == set(embedded.PHOTO_LOADERS)
  assert "cat" not in photos  # Same picture as chelsea.
  for name, photo in photos.items():
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3, name
    assert min(photo.shape[:2]) >= 256, name
  assert embedded.load_photos() is photos  # Cached.


def test_photo_splits_are_disjoint():
  train, eval_ = embedded.photo_names("train"), embedded.photo_names("eval")
  assert set(eval_) == set(embedded.EVAL_PHOTOS)
  assert not set(train) & set(eval_)
  assert len(train) >= 8
  source = embedded.EmbeddedSource("eval", image_size=32, size=64)
  origins = {source.origin(i) for i in range(64)}
  assert origins == {"procedural", *embedded.EVAL_PHOTOS}
  train_source = embedded.EmbeddedSource("train", image_size=32, size=200)
  assert not {train_source.origin(i) for i in range(200)} & set(embedded.EVAL_PHOTOS)


def test_embedded_source_records():
  source = embedded.EmbeddedSource("train", image_size=32, size=40, procedural_fraction=0.25)
  assert len(source) == 40
  procedural_ids = [i for i in range(40) if source.is_procedural(i)]
  assert len(procedural_ids) == 10
  for i in range(8):
    record = source[i]
    assert record["valid"] and record["index"] == i
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    if source.is_procedural(i):
      assert record["detail_mask"].shape == (32, 32)
      assert 0 <= record["label"] < len(procedural.KINDS)
    else:
      assert record["detail_mask"] is None and record["label"] == embedded.PHOTO_LABEL
  with pytest.raises(IndexError, match="40"):
    source[40]


def test_embedded_source_is_deterministic():
  first = embedded.EmbeddedSource("train", image_size=32, size=20)
  second = embedded.EmbeddedSource("train", image_size=32, size=20)
  for i in range(6):
    np.testing.assert_array_equal(first[i]["image"], second[i]["image"])
  photo_ids = [i for i in range(20) if not first.is_procedural(i)]
  crops = {first[i]["image"].tobytes() for i in photo_ids}
  assert len(crops) == len(photo_ids)  # Different crops per index.
  other_seed = embedded.EmbeddedSource("train", image_size=32, size=20, seed=1)
  assert any(not np.array_equal(first[i]["image"], other_seed[i]["image"]) for i in photo_ids)


def test_embedded_options_and_errors():
  only_procedural = embedded.EmbeddedSource("eval", image_size=16, size=10, photos=False)
  assert all(only_procedural.is_procedural(i) for i in range(10))
  assert only_procedural.photo_names == ()
  only_photos = embedded.EmbeddedSource("eval", image_size=16, size=10, procedural_fraction=0)
  assert not any(only_photos.is_procedural(i) for i in range(10))
  with pytest.raises(ValueError, match="split"):
    embedded.EmbeddedSource("test", image_size=16, size=10)
  with pytest.raises(ValueError, match="procedural_fraction"):
    embedded.EmbeddedSource("train", image_size=16, size=10, procedural_fraction=1.5)
  with pytest.raises(ValueError, match="empty"):
    embedded.EmbeddedSource("train", image_size=16, size=10, procedural_fraction=0,
                            photos=False)
