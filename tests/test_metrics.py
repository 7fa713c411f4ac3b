"""Reconstruction metrics vs skimage, codebook statistics, detail overlap."""
import math

import jax
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dq.evaluation import detail, metrics


def _smooth_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  base = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma=(0, 3, 3, 0))
  base = base / np.abs(base).max()
  noisy = np.clip(base + 0.05 * rng.standard_normal(shape), -1, 1)
  return base.astype(np.float32), noisy.astype(np.float32)


def _random_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  return (rng.uniform(-1, 1, shape).astype(np.float32),
          rng.uniform(-1, 1, shape).astype(np.float32))


@pytest.mark.parametrize("make_pair", [_smooth_pair, _random_pair])
def test_ssim_and_psnr_match_skimage(make_pair):
  rng = np.random.default_rng(0)
  x, y = make_pair(rng, (3, 24, 32, 3))
  got_ssim = np.asarray(jax.jit(metrics.ssim)(x, y))
  got_psnr = np.asarray(jax.jit(metrics.psnr)(x, y))
  for i in range(x.shape[0]):
    want = structural_similarity(x[i].astype(np.float64), y[i].astype(np.float64), channel_axis=-1,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=2.0)
    np.testing.assert_allclose(got_ssim[i], want, atol=1e-4)
    want_psnr = peak_signal_noise_ratio(x[i].astype(np.float64), y[i].astype(np.float64),
                                        data_range=2.0)
    np.testing.assert_allclose(got_psnr[i], want_psnr, rtol=1e-5)


def test_ssim_identical_is_one_and_small_images_rejected():
  x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(x[:, :8, :8], x[:, :8, :8])
  with pytest.raises(ValueError, match="one shape"):
    metrics.psnr(x, x[:, :8])


def test_l1_and_psnr_values():
  x = np.zeros((2, 4, 4, 3), np.float32)
  y = np.stack([np.full((4, 4, 3), 0.5), np.full((4, 4, 3), -0.1)]).astype(np.float32)
  np.testing.assert_allclose(metrics.l1(x, y), [0.5, 0.1], rtol=1e-6)
  want = [10 * math.log10(4 / 0.25), 10 * math.log10(4 / 0.01)]
  np.testing.assert_allclose(metrics.psnr(x, y), want, rtol=1e-5)


def test_codebook_stats():
  codes = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])  # counts 2, 2, 4 of K = 8
  stats = jax.jit(metrics.codebook_stats, static_argnums=1)(codes, 8)
  probs = np.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(stats["usage"], 3 / 8)
  np.testing.assert_allclose(stats["dead_fraction"], 5 / 8)
  np.testing.assert_allclose(stats["perplexity"], np.exp(-(probs * np.log(probs)).sum()), rtol=1e-6)
  np.testing.assert_allclose(stats["counts"], [2, 2, 4, 0, 0, 0, 0, 0])
  uniform = metrics.codebook_stats(np.arange(16) % 4, 4)
  np.testing.assert_allclose(uniform["perplexity"], 4.0, rtol=1e-6)
  weighted = metrics.codebook_stats(codes, 8, weights=np.array([[1, 1, 1, 1], [0.25] * 4]))
  np.testing.assert_allclose(weighted["counts"][:3], [2, 2, 1])


def test_detail_overlap_hand_made():
  # Two images, 2x2 regions of 4x4 pixels each.
  grain = np.array([[[1, 0], [1, 0]], [[0, 0], [1, 1]]])
  mask = np.zeros((2, 8, 8), np.float32)
  mask[0, :4, :4] = 1.0  # region (0,0): coverage 1, fine
  mask[0, :4, 4:6] = 1.0  # region (0,1): coverage 0.5, coarse
  mask[0, 4, 0] = 1.0  # region (1,0): coverage 1/16 < 0.1, fine
  mask[1, 4:6, 4:8] = 1.0  # region (1,1) of image 1: coverage 0.5, fine
  out = detail.detail_overlap(grain, mask, finest_grain=1, min_coverage=0.1)
  # fine: 4 regions, detailed: (0,0,0) (0,0,1) (1,1,1) -> 3; fine & detailed: 2.
  assert out["num_fine"] == 4 and out["num_detailed"] == 3 and out["num_regions"] == 8
  assert out["precision"] == pytest.approx(2 / 4)
  assert out["recall"] == pytest.approx(2 / 3)
  assert out["base_rate"] == pytest.approx(3 / 8)
  assert out["lift"] == pytest.approx((2 / 4) / (3 / 8))
  assert out["fine_coverage"] == pytest.approx((1 + 1 / 16 + 0 + 0.5) / 4)
  assert out["coarse_coverage"] == pytest.approx((0.5 + 0 + 0 + 0) / 4)


def test_detail_overlap_empty_sets_and_bad_shapes():
  grain = np.zeros((1, 2, 2), np.int32)
  out = detail.detail_overlap(grain, np.zeros((1, 8, 8)), finest_grain=1)
  assert math.isnan(out["precision"]) and math.isnan(out["recall"]) and out["base_rate"] == 0
  with pytest.raises(ValueError, match="does not divide"):
    detail.detail_overlap(np.zeros((1, 3, 3), np.int32), np.zeros((1, 8, 8)), finest_grain=1)
  with pytest.raises(ValueError, match="expects grain"):
    detail.detail_overlap(np.zeros((2, 2)), np.zeros((1, 8, 8)), finest_grain=1)
