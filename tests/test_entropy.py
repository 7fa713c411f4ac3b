"""Patch entropy vs a float64 reference and the official fixture; threshold tables."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import ndimage

from dq.data.config import default_data_config
from dq.data.pipeline import make_dataset
from dq.models import entropy

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reference_entropy(x: np.ndarray, patch: int, bins: int = 32, low: float = -1.0,
                       high: float = 1.0, sigma: float = 0.01) -> np.ndarray:
  """Float64 transcription of the official module on [B, H, W, 3] images."""
  x = x.astype(np.float64)
  gray = 0.2989 * x[..., 0] + 0.5870 * x[..., 1] + 0.1140 * x[..., 2]
  b, h, w = gray.shape
  rows, cols = h // patch, w // patch
  patches = gray.reshape(b, rows, patch, cols, patch).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(b, rows * cols, -1)  # [B, N, P]
  centres = np.linspace(low, high, bins)
  kernel = np.exp(-0.5 * ((patches[..., None] - centres) / sigma)**2)  # [B, N, P, bins]
  pdf = kernel.mean(axis=2)
  pdf = pdf / (pdf.sum(-1, keepdims=True) + 1e-40) + 1e-40
  return -(pdf * np.log(pdf)).sum(-1).reshape(b, rows, cols)


def _test_images(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  noise = rng.uniform(-1, 1, (2, 32, 32, 3))
  smooth = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, 32, 32, 3)), sigma=(0, 4, 4, 0))
  smooth = smooth / np.abs(smooth).max()
  flat = np.full((1, 32, 32, 3), 0.3)
  return np.concatenate([noise, smooth, flat]).astype(np.float32)


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_patch_entropy_matches_float64_reference(patch):
  x = _test_images(patch)
  got = np.asarray(jax.jit(entropy.patch_entropy, static_argnums=1)(x, patch))
  assert got.shape == (5, 32 // patch, 32 // patch) and got.dtype == np.float32
  np.testing.assert_allclose(got, _reference_entropy(x, patch), atol=1e-5, rtol=0)
  # Noise patches are far more uncertain than a flat patch.
  assert got[0].min() > got[4].max() + 1.0


def test_patch_entropy_keyword_arguments():
  x = _test_images(3)
  got = np.asarray(entropy.patch_entropy(x, 8, num_bins=16, value_range=(0.0, 1.0), sigma=0.05))
  np.testing.assert_allclose(got, _reference_entropy(x, 8, 16, 0.0, 1.0, 0.05), atol=1e-5, rtol=0)


def test_patch_entropy_matches_official_fixture(official_dqvae):
  x = official_dqvae["x"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  got = np.asarray(entropy.patch_entropy(x, 16))
  np.testing.assert_allclose(got, official_dqvae["entropy"], atol=1e-5, rtol=0)


def test_patch_entropy_rejects_bad_shapes():
  with pytest.raises(ValueError, match="must divide"):
    entropy.patch_entropy(np.zeros((1, 20, 20, 3), np.float32), 8)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    entropy.patch_entropy(np.zeros((1, 16, 16), np.float32), 8)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9, 0.333])
def test_threshold_for_ratio_splits_exactly(ratio):
  values = np.random.default_rng(0).gamma(2.0, 1.0, 1000)
  table = entropy.entropy_threshold_table(values)
  threshold = entropy.threshold_for_ratio(table, ratio)
  assert np.sum(values > threshold) == round(ratio * values.size)


def test_threshold_table_contents():
  values = np.random.default_rng(1).normal(size=(10, 20))
  table = entropy.entropy_threshold_table(values)
  assert table["percentiles"][0] == 0 and table["percentiles"][-1] == 100
  assert np.all(np.diff(table["percentiles"]) <= 0.5)
  np.testing.assert_allclose(table["values"][0], values.min())
  np.testing.assert_allclose(table["values"][-1], values.max())
  assert table["num_regions"] == 200
  assert entropy.threshold_for_ratio(table, 0.0) == pytest.approx(values.max())
  with pytest.raises(ValueError, match="fine_ratio"):
    entropy.threshold_for_ratio(table, 1.5)
  with pytest.raises(ValueError, match="non-finite"):
    entropy.entropy_threshold_table(np.array([1.0, np.nan]))


def test_thresholds_for_ratios_triple_grain():
  values = np.random.default_rng(2).uniform(0, 3, 2000)
  table = entropy.entropy_threshold_table(values)
  t_median, t_fine = entropy.thresholds_for_ratios(table, median_ratio=0.3, fine_ratio=0.25)
  assert t_median < t_fine
  assert np.sum(values > t_fine) == 500
  assert np.sum((values > t_median) & (values <= t_fine)) == 600
  assert t_fine == entropy.threshold_for_ratio(table, 0.25)
  with pytest.raises(ValueError, match="sum <= 1"):
    entropy.thresholds_for_ratios(table, 0.7, 0.5)


def test_save_and_load_round_trip(tmp_path):
  table = entropy.entropy_threshold_table(np.arange(100.0))
  meta = {"patch_size": 16, "num_bins": 32, "value_range": [-1.0, 1.0], "sigma": 0.01}
  path = tmp_path / "sub" / "thresholds.json"
  entropy.save_threshold_table(path, table, meta)
  loaded = entropy.load_threshold_table(path)
  assert loaded["meta"] == meta
  assert loaded["values"] == table["values"] and loaded["percentiles"] == table["percentiles"]
  assert entropy.threshold_for_ratio(loaded, 0.5) == entropy.threshold_for_ratio(table, 0.5)


def test_load_errors_name_the_tool(tmp_path):
  with pytest.raises(FileNotFoundError, match="dq.tools.entropy_thresholds"):
    entropy.load_threshold_table(tmp_path / "missing.json")
  broken = tmp_path / "broken.json"
  broken.write_text("{not json")
  with pytest.raises(ValueError, match="not readable JSON.*dq.tools.entropy_thresholds"):
    entropy.load_threshold_table(broken)
  wrong_format = tmp_path / "wrong.json"
  wrong_format.write_text(json.dumps({"percentiles": [0, 100], "values": [0, 1]}))
  with pytest.raises(ValueError, match="format.*dq.tools.entropy_thresholds"):
    entropy.load_threshold_table(wrong_format)
  unsorted = tmp_path / "unsorted.json"
  unsorted.write_text(json.dumps({"format": entropy.TABLE_FORMAT, "meta": {},
                                  "table": {"percentiles": [0, 50, 100], "values": [2, 1, 3]}}))
  with pytest.raises(ValueError, match="non-decreasing.*dq.tools.entropy_thresholds"):
    entropy.load_threshold_table(unsorted)


_TINY_CONFIG = '''
from dq.data.config import default_data_config
from dq.models.build import default_model_config
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.data = default_data_config()
  config.data.image_size = 64
  config.model = default_model_config()
  config.model.ch_mult = (1, 2, 2)  # regions of 4x4 pixels
  if arg == "triple":
    config.model.ch_mult = (1, 2, 2, 4)
    config.model.num_grains = 3
    config.model.router.median_ratio = 0.3
    config.model.router.fine_ratio = 0.25
  return config
'''


def _run_tool(tmp_path, *args):
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(_TINY_CONFIG)
  command = [sys.executable, "-m", "dq.tools.entropy_thresholds"]
  command += [arg.replace("CONFIG", str(config_file)) for arg in args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _first_train_images(data_cfg, count):
  dataset = make_dataset(data_cfg, split="train", batch_size=count, seed=0, train=False,
                         num_epochs=1, drop_remainder=False)
  return np.asarray(next(iter(dataset))["image"])


def test_compute_entropy_thresholds_uses_unaugmented_train_images():
  data_cfg = default_data_config()
  data_cfg.image_size = 32
  table = entropy.compute_entropy_thresholds(data_cfg, patch_size=8, num_images=10, batch_size=4)
  assert table["num_images"] == 10 and table["image_size"] == [32, 32]
  assert table["num_regions"] == 10 * 16
  want = entropy.entropy_threshold_table(_reference_entropy(_first_train_images(data_cfg, 10), 8))
  np.testing.assert_allclose(table["values"], want["values"], atol=1e-5)


def test_entropy_thresholds_tool_end_to_end(tmp_path):
  output = tmp_path / "out" / "thresholds.json"
  result = _run_tool(tmp_path, "--config=CONFIG", "--config.data.image_size=32",
                     f"--output={output}", "--num_images=12", "--batch_size=5")
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = entropy.load_threshold_table(output)
  meta = loaded["meta"]
  assert meta["patch_size"] == 4 and meta["image_size"] == [32, 32]
  assert meta["num_images"] == 12 and meta["num_regions"] == 12 * 64
  assert meta["value_range"] == [-1.0, 1.0] and meta["num_bins"] == 32 and meta["sigma"] == 0.01
  assert meta["data"] == "embedded"
  data_cfg = default_data_config()
  data_cfg.image_size = 32
  region_entropies = _reference_entropy(_first_train_images(data_cfg, 12), 4)
  want = entropy.entropy_threshold_table(region_entropies)
  np.testing.assert_allclose(loaded["values"], want["values"], atol=1e-5)
  for ratio in (0.25, 0.5, 0.75):
    threshold = entropy.threshold_for_ratio(loaded, ratio)
    assert f"fine_ratio {ratio:.2f}: threshold {threshold:.6f}" in result.stdout
    assert abs(np.mean(region_entropies > threshold) - ratio) < 2 / region_entropies.size


def test_entropy_thresholds_tool_triple_and_errors(tmp_path):
  output = tmp_path / "triple.json"
  result = _run_tool(tmp_path, "--config=CONFIG:triple", "--config.data.image_size=32",
                     f"--output={output}", "--num_images=4")
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = entropy.load_threshold_table(output)
  assert loaded["meta"]["patch_size"] == 8 and loaded["meta"]["num_regions"] == 4 * 16
  t_median, t_fine = entropy.thresholds_for_ratios(loaded, 0.3, 0.25)
  assert f"t_median {t_median:.6f}, t_fine {t_fine:.6f}" in result.stdout
  missing_output = _run_tool(tmp_path, "--config=CONFIG", "--num_images=2")
  assert missing_output.returncode != 0 and "--output" in missing_output.stderr
