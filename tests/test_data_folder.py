"""Image folders: scanning, labels, decoding of every mode, corrupt files skipped and counted."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from bad_images import make_bad_folder, rgb
from dq.data import config, decode, folder, pipeline, stats


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[str, set[str], set[str]]:
  root = str(tmp_path_factory.mktemp("bad_folder"))
  valid, bad = make_bad_folder(root)
  return root, valid, bad


def make_class_folder(root: str) -> None:
  for name, count in (("zebra", 3), ("ant", 2), ("cat", 4)):
    os.makedirs(os.path.join(root, name, "nested"), exist_ok=True)
    for i in range(count):
      where = os.path.join(root, name, "nested" if i == 0 else "")
      Image.fromarray(rgb(12, 14)).save(os.path.join(where, f"img{i}.png"))
  os.makedirs(os.path.join(root, "empty_class"))
  os.makedirs(os.path.join(root, ".hidden"))
  Image.fromarray(rgb(12, 14)).save(os.path.join(root, ".hidden", "x.png"))


def test_scan_sorted_recursive_and_labels(tmp_path):
  make_class_folder(str(tmp_path))
  paths = folder.scan_image_files(tmp_path)
  assert paths == sorted(paths) and len(paths) == 9
  assert all(".hidden" not in p for p in paths)
  paths, labels, classes = folder.index_folder(tmp_path, labels_from_subfolders=True)
  assert classes == ["ant", "cat", "zebra"]
  for path, label in zip(paths, labels):
    top = os.path.relpath(path, tmp_path).split(os.sep)[0]
    assert classes[label] == top
  assert np.bincount(labels).tolist() == [2, 4, 3]
  _, labels, classes = folder.index_folder(tmp_path, labels_from_subfolders=False)
  assert labels == [0] * 9 and classes == []


def test_labels_need_class_folders(tmp_path):
  make_class_folder(str(tmp_path))
  Image.fromarray(rgb(8, 8)).save(tmp_path / "loose.png")
  with pytest.raises(ValueError, match="loose.png"):
    folder.index_folder(tmp_path, labels_from_subfolders=True)


def test_missing_and_empty_folders(tmp_path):
  missing = tmp_path / "does_not_exist"
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    folder.scan_image_files(missing)
  empty = tmp_path / "empty"
  (empty / "deeper").mkdir(parents=True)
  (empty / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"empty.*\.jpg.*\.png"):
    folder.scan_image_files(empty)
  with pytest.raises(NotADirectoryError, match="readme.txt"):
    folder.scan_image_files(empty / "readme.txt")
  cfg = config.default_data_config()
  cfg.name = "folder"
  cfg.folder.train_path = str(missing)
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    pipeline.make_dataset(cfg, split="train", batch_size=2, seed=0, train=True)
  cfg.folder.train_path = ""
  with pytest.raises(ValueError, match="train_path"):
    pipeline.build_source(cfg, "train")


def test_decode_modes(bad_folder):
  root, _, _ = bad_folder
  cmyk = decode.decode_image(os.path.join(root, "cmyk.jpg"))
  expected = np.asarray(Image.new("CMYK", (1, 1), (10, 200, 30, 0)).convert("RGB"))[0, 0]
  assert cmyk.shape == (20, 30, 3) and np.abs(cmyk.astype(int) - expected).max() <= 3
  gray16 = decode.decode_image(os.path.join(root, "gray16.png"))
  source16 = np.arange(600).reshape(20, 30) * 100
  np.testing.assert_array_equal(gray16[..., 0], np.round(source16 / 257).astype(np.uint8))
  assert (gray16 == gray16[..., :1]).all()
  gray = decode.decode_image(os.path.join(root, "gray.png"))
  assert gray.shape == (16, 16, 3) and (gray == gray[..., :1]).all()
  rgba_file = np.asarray(Image.open(os.path.join(root, "rgba.png")))
  composited = decode.decode_image(os.path.join(root, "rgba.png"))
  expected = np.round(rgba_file[..., :3] * (128 / 255) + 255 * (1 - 128 / 255))
  np.testing.assert_allclose(composited, expected, atol=1)
  palette = decode.decode_image(os.path.join(root, "palette.gif"))
  reference = np.asarray(Image.open(os.path.join(root, "palette.gif")).convert("RGB"))
  np.testing.assert_array_equal(palette, reference)
  large = decode.decode_image(os.path.join(root, "large.jpg"), min_size=64)
  assert large.shape == (150, 125, 3)  # JPEG draft at 1/8 keeps both sides >= 64.
  assert decode.decode_image(os.path.join(root, "large.jpg")).shape == (1200, 1000, 3)


def test_decode_alpha_composites_on_white():
  array = np.zeros((2, 2, 4), np.uint8)
  array[..., :3] = (10, 20, 30)
  array[0, 0, 3], array[0, 1, 3] = 255, 0
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  decoded = decode.decode_image(buffer.getvalue())
  np.testing.assert_array_equal(decoded[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(decoded[0, 1], (255, 255, 255))
  transparent_gif = io.BytesIO()
  image = Image.new("P", (2, 1))
  image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  image.putpixel((1, 0), 1)
  image.save(transparent_gif, format="GIF", transparency=0)
  decoded = decode.decode_image(transparent_gif.getvalue())
  np.testing.assert_array_equal(decoded[0], [(255, 255, 255), (0, 0, 255)])


def test_huge_image_between_limits_loads(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
  Image.fromarray(rgb(120, 110)).save(tmp_path / "big.jpg")  # 1.3x the limit: warn zone.
  Image.fromarray(rgb(150, 150)).save(tmp_path / "bomb.jpg")  # 2.25x: refused.
  with pytest.warns(Image.DecompressionBombWarning):
    assert decode.decode_image(tmp_path / "big.jpg", min_size=32).shape == (60, 55, 3)
  with pytest.raises(Image.DecompressionBombError):
    decode.decode_image(tmp_path / "bomb.jpg")


def test_bad_files_are_skipped_and_counted(bad_folder, caplog):
  root, valid, bad = bad_folder
  paths = folder.scan_image_files(root)
  assert {os.path.basename(p) for p in paths} == valid | bad
  source = folder.FolderSource(paths, [0] * len(paths), name="bad-folder-direct",
                               min_size=32)
  with caplog.at_level(logging.WARNING):
    records = [source[i] for i in range(len(source))]
  good = [r for r in records if r["valid"]]
  assert {os.path.basename(paths[r["index"]]) for r in good} == valid
  for record in good:
    assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
    assert record["image"].shape[-1] == 3
  assert stats.skipped_counts()["bad-folder-direct"] == len(bad)
  for name in bad:
    assert any(name in message for message in caplog.messages), name
  records = [source[i] for i in range(len(source))]  # A second epoch: same distinct count.
  assert stats.skipped_counts()["bad-folder-direct"] == len(bad)
  assert stats.read_counts()["bad-folder-direct"] == (2 * len(paths), 2 * len(bad))


def test_bad_folder_through_pipeline(bad_folder):
  root, valid, bad = bad_folder
  cfg = config.default_data_config()
  cfg.name, cfg.image_size, cfg.prefetch_buffer = "folder", 16, 0
  cfg.folder.train_path = cfg.folder.eval_path = root
  batches = list(pipeline.make_dataset(cfg, split="eval", batch_size=4, seed=0, train=False,
                                       drop_remainder=False))
  images = np.concatenate([b["image"] for b in batches])
  assert images.shape == (len(valid), 16, 16, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1
  assert pipeline.skipped_counts()[f"folder:{root}:eval"] == len(bad)
  indices = np.concatenate([b["index"] for b in batches])
  assert np.all(np.diff(indices) > 0)  # One pass, in order.


def test_too_many_bad_files_raise(tmp_path):
  Image.fromarray(rgb(8, 8)).save(tmp_path / "a_good.png")
  for name in ("b.png", "c.jpg", "d.gif"):
    (tmp_path / name).write_bytes(b"garbage")
  cfg = config.default_data_config()
  cfg.name, cfg.image_size, cfg.prefetch_buffer = "folder", 8, 0
  cfg.folder.train_path = cfg.folder.eval_path = str(tmp_path)
  dataset = pipeline.make_dataset(cfg, split="eval", batch_size=1, seed=0, train=False)
  with pytest.raises(RuntimeError, match=f"folder:{tmp_path}:eval.*3 of 4"):
    list(dataset)


def test_held_out_tail_split(tmp_path):
  make_class_folder(str(tmp_path))
  kwargs = dict(train_path=str(tmp_path), eval_path="", eval_fraction=0.3,
                labels_from_subfolders=True)
  train, classes = folder.build_folder_source("train", **kwargs)
  eval_, _ = folder.build_folder_source("eval", **kwargs)
  assert classes == ["ant", "cat", "zebra"]
  assert not set(train.paths) & set(eval_.paths)
  assert sorted(train.paths + eval_.paths) == folder.scan_image_files(tmp_path)
  assert sorted(set(eval_.labels)) == [0, 1, 2]  # Every class held out from.
  assert len(eval_) == 1 + 2 + 1  # ceil(0.3 * n) for n = 2, 4, 3.
  for source in (train, eval_):
    for path, label in zip(source.paths, source.labels):
      assert classes[label] in path


def test_eval_folder_uses_train_class_names(tmp_path):
  make_class_folder(str(tmp_path / "train"))
  os.makedirs(tmp_path / "val" / "zebra")
  Image.fromarray(rgb(8, 8)).save(tmp_path / "val" / "zebra" / "z.png")
  eval_, classes = folder.build_folder_source(
      "eval", train_path=str(tmp_path / "train"), eval_path=str(tmp_path / "val"),
      eval_fraction=0.02, labels_from_subfolders=True)
  assert eval_.labels == [classes.index("zebra")] == [2]
  os.makedirs(tmp_path / "val" / "unicorn")
  Image.fromarray(rgb(8, 8)).save(tmp_path / "val" / "unicorn" / "u.png")
  with pytest.raises(ValueError, match="unicorn"):
    folder.build_folder_source(
        "eval", train_path=str(tmp_path / "train"), eval_path=str(tmp_path / "val"),
        eval_fraction=0.02, labels_from_subfolders=True)


def test_single_image_cannot_hold_out(tmp_path):
  Image.fromarray(rgb(8, 8)).save(tmp_path / "only.png")
  with pytest.raises(ValueError, match="eval_path"):
    folder.build_folder_source("eval", train_path=str(tmp_path), eval_path="",
                               eval_fraction=0.02, labels_from_subfolders=False)
