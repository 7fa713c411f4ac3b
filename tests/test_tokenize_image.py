"""python -m dq.tools.tokenize_image on the tiny DQ-VAE: files, PNG contents, counts, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dq import summaries as viz
from dq.data import transforms
from dq import tokenizer as stage1_lib
from dq.tools import tokenize_image as tool


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_stage1_dir):
  return tiny_stage1_dir


def _write_images(folder) -> dict:
  """A wide RGBA PNG and a tall grayscale JPEG (modes and aspect ratios the tool must handle)."""
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (50, 90, 4), dtype=np.uint8)
  tall = rng.integers(0, 256, (120, 70), dtype=np.uint8)
  paths = {"wide": os.path.join(folder, "wide.png"), "tall": os.path.join(folder, "tall.jpg")}
  Image.fromarray(wide, "RGBA").save(paths["wide"])
  Image.fromarray(tall, "L").save(paths["tall"], quality=95)
  return paths


def test_load_image_is_the_eval_centre_crop(tmp_path):
  paths = _write_images(str(tmp_path))
  image, original = tool.load_image(paths["tall"], 32)
  assert original == (120, 70) and image.shape == (32, 32, 3) and image.dtype == np.uint8
  from dq.data import decode
  record = decode.make_record(decode.decode_image(paths["tall"]), 0, 0)
  expected = transforms.preprocess(record, image_size=32, rng=None, random_crop=False,
                                   random_flip=False)["image"]
  np.testing.assert_array_equal(transforms.to_unit_range(image), expected)


def test_cli_writes_overlay_reconstruction_and_count(tiny_checkpoint, tmp_path, capsys):
  paths = _write_images(str(tmp_path))
  out_dir = tmp_path / "out"
  assert tool.main([paths["wide"], paths["tall"], "--checkpoint", tiny_checkpoint,
                    "--out", str(out_dir)]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [os.path.basename(p["image"]) for p in printed] == ["wide.png", "tall.jpg"]

  vae = stage1_lib.load_stage1(tiny_checkpoint)
  scale = tool.default_scale(32)
  assert scale == 8
  for stem, summary in zip(("wide", "tall"), printed):
    with open(out_dir / f"{stem}_tokens.json") as f:
      assert json.load(f) == summary
    image, _ = tool.load_image(paths[stem], 32)
    codes, grain = (np.asarray(a) for a in stage1_lib.make_encode_fn(vae)(
        transforms.to_unit_range(image)[None]))
    fine = int(grain.sum())
    assert summary["fine_regions"] == fine and summary["regions"] == 16
    assert summary["num_tokens"] == (16 - fine) + 4 * fine
    assert summary["sequence_length"] == summary["num_tokens"] + 4
    assert summary["original_size"] == ([50, 90] if stem == "wide" else [120, 70])

    overlay = np.asarray(Image.open(out_dir / f"{stem}_grain.png"))
    assert overlay.shape == (256, 256, 3)
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    np.testing.assert_array_equal(overlay, viz.grain_overlay(big, grain[0], 2))
    # Region borders: the last pixel row of every region is a border row in its colour.
    for r in range(4):
      row = overlay[64 * r + 63]
      colours = np.asarray(viz.GRAIN_COLOURS[2])[np.repeat(grain[0, r], 64)]
      np.testing.assert_array_equal(row, colours)

    recon = np.asarray(Image.open(out_dir / f"{stem}_reconstruction.png"))
    expected = viz.to_uint8(np.asarray(stage1_lib.make_decode_fn(vae)(codes))[0])
    assert recon.shape == (256, 256, 3)
    assert np.abs(recon[::scale, ::scale].astype(int) - expected).max() <= 1
    grid = np.asarray(Image.open(out_dir / f"{stem}_grid.png"))
    assert grid.shape == (32 * scale, (4 * 34 - 2) * scale, 3)


def test_same_file_names_in_other_folders_get_distinct_outputs(tiny_checkpoint, tmp_path,
                                                              capsys):
  rng = np.random.default_rng(1)
  paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.jpg"),
           str(tmp_path / "c" / "x.png")]
  for path in paths:
    os.makedirs(os.path.dirname(path))
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
  out_dir = tmp_path / "out"
  assert tool.main([*paths, "--checkpoint", tiny_checkpoint, "--out", str(out_dir)]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  stems = [os.path.basename(p["files"]["tokens"])[:-len("_tokens.json")] for p in printed]
  assert stems == ["a_x_png", "x_jpg", "c_x_png"]
  for path, summary in zip(paths, printed):  # each file was written once, for its own image
    with open(summary["files"]["tokens"]) as f:
      assert json.load(f)["image"] == path
  assert len(os.listdir(out_dir)) == 3 * 4
  assert tool.output_stems(["one.png"]) == ["one"]
  assert tool.output_stems(["d/y.png", "d/y.png"]) == ["y", "y_2"]


def test_cli_errors(tiny_checkpoint, tmp_path, capsys):
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  assert tool.main([str(bad), "--checkpoint", tiny_checkpoint, "--out", str(tmp_path)]) == 2
  assert f"{bad} is not a readable image file" in capsys.readouterr().err
  missing = tmp_path / "missing.jpg"
  assert tool.main([str(missing), "--checkpoint", tiny_checkpoint]) == 2
  assert f"image file {missing} does not exist" in capsys.readouterr().err
  assert tool.main([str(bad), "--checkpoint", str(tmp_path / "nowhere")]) == 2
  assert "nowhere does not exist" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--scale must be >= 1"):
    tool.tokenize_image(str(bad), stage1_lib.load_stage1(tiny_checkpoint), str(tmp_path), 0)


def test_module_entry_point(tiny_checkpoint, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dq.tools.tokenize_image", str(tmp_path / "absent.png"),
       "--checkpoint", tiny_checkpoint], capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2
  assert "absent.png does not exist" in result.stderr
