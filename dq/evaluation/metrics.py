"""Per-image reconstruction metrics and codebook statistics (jnp, jittable)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array, name: str) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"{name} expects two images [B, H, W, C] of one shape; "
                     f"got {x.shape} and {y.shape}")


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error per image: [B, H, W, C] x2 -> [B]."""
  _check_pair(x, y, "l1")
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image (images in [-1, 1] by default) -> [B]."""
  _check_pair(x, y, "psnr")
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))  # [B]
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float, truncate: float) -> jax.Array:
  radius = int(truncate * sigma + 0.5)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  return taps / taps.sum()


def _gaussian_blur(x: jax.Array, taps: jax.Array) -> jax.Array:
  """Separable blur of [B, H, W, C] with half-sample symmetric borders (scipy 'reflect')."""
  radius = (taps.shape[0] - 1) // 2
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="symmetric")
  x = sum(taps[k] * padded[:, k:k + height] for k in range(taps.shape[0]))
  padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="symmetric")
  return sum(taps[k] * padded[:, :, k:k + width] for k in range(taps.shape[0]))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Mean structural similarity per image -> [B].

  Same as `skimage.metrics.structural_similarity(a, b, channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=data_range)`: Gaussian window (sigma 1.5, truncate 3.5, so 11
  taps), population covariances, and the mean over all channels of the SSIM
  map with a 5-pixel border cropped.
  """
  _check_pair(x, y, "ssim")
  taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
  window = taps.shape[0]
  if min(x.shape[1:3]) < window:
    raise ValueError(f"ssim needs images of at least {window}x{window} pixels; got {x.shape[1:3]}")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  mean_x = _gaussian_blur(x, taps)
  mean_y = _gaussian_blur(y, taps)
  var_x = _gaussian_blur(x * x, taps) - mean_x * mean_x
  var_y = _gaussian_blur(y * y, taps) - mean_y * mean_y
  cov_xy = _gaussian_blur(x * y, taps) - mean_x * mean_y
  c1 = (SSIM_K1 * data_range)**2
  c2 = (SSIM_K2 * data_range)**2
  ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2) /
              ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)))  # [B, H, W, C]
  pad = (window - 1) // 2
  return jnp.mean(ssim_map[:, pad:-pad, pad:-pad, :], axis=(1, 2, 3))


def codebook_stats(codes: jax.Array, codebook_size: int,
                   weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Codebook usage over a batch of code maps.

  Args:
    codes: integer code indices, any shape.
    codebook_size: number of codes K.
    weights: optional per-code weights of the same shape (for instance 0.25 at
      positions that repeat a coarse code, so each region counts once).

  Returns:
    Dict with `usage` (fraction of the K codes used at least once), `dead_fraction`
    (1 - usage), `perplexity` (exp of the entropy of the code histogram) and
    `counts` [K].
  """
  codes = codes.reshape(-1)
  weights = jnp.ones(codes.shape, jnp.float32) if weights is None else (
      jnp.asarray(weights, jnp.float32).reshape(-1))
  if weights.shape != codes.shape:
    raise ValueError(f"codebook_stats: weights have {weights.shape[0]} entries, "
                     f"codes {codes.shape[0]}")
  counts = jnp.zeros((codebook_size,), jnp.float32).at[codes].add(weights)  # [K]
  probs = counts / jnp.maximum(counts.sum(), 1e-12)
  usage = jnp.mean((counts > 0).astype(jnp.float32))
  perplexity = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(probs, probs)))
  return {"usage": usage, "dead_fraction": 1.0 - usage, "perplexity": perplexity, "counts": counts}
