"""FID statistics and metrics: running mean/covariance, Fréchet distance, IS, precision/recall.

All statistics are float64 numpy. Reference files follow the pytorch-fid / ADM layout: an `.npz`
with `mu` [D] and `sigma` [D, D] (ddof=1 covariance); other arrays in the file are ignored.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterator

import numpy as np

STATS_KEYS = ("mu", "sigma")


class FeatureStats:
  """Mean and covariance of feature batches, accumulated in float64.

  Batches are merged with the pairwise (Chan et al.) update of the mean and the scatter matrix
  about it, so no large raw second moment is formed and the result does not depend on how the
  samples were split into batches (up to rounding).
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._mean: np.ndarray | None = None  # [D]
    self._scatter: np.ndarray | None = None  # [D, D], sum of (x - mean)(x - mean)^T

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Adds a batch of features [B, D] (any float dtype; converted to float64)."""
    batch = np.asarray(features, dtype=np.float64)
    if batch.ndim != 2:
      raise ValueError(f"features must be [batch, dim], got shape {batch.shape}")
    if self.dim is None:
      self.dim = batch.shape[1]
    if batch.shape[1] != self.dim:
      raise ValueError(f"features have dim {batch.shape[1]}, the accumulator has {self.dim}")
    if batch.shape[0] == 0:
      return self
    if not np.all(np.isfinite(batch)):
      raise ValueError("features contain NaN or inf")
    batch_mean = batch.mean(axis=0)
    centred = batch - batch_mean
    batch_scatter = centred.T @ centred
    self._merge(batch.shape[0], batch_mean, batch_scatter)
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds the samples summarised by another accumulator (e.g. from another host)."""
    if other.count == 0:
      return self
    if self.dim is not None and other.dim != self.dim:
      raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
    self.dim = other.dim
    self._merge(other.count, other._mean, other._scatter)
    return self

  def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    if self.count == 0:
      self.count, self._mean, self._scatter = count, mean.copy(), scatter.copy()
      return
    total = self.count + count
    delta = mean - self._mean
    self._mean = self._mean + delta * (count / total)
    self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * count / total)
    self.count = total

  @property
  def mean(self) -> np.ndarray:
    if self.count == 0:
      raise ValueError("no features accumulated")
    return self._mean.copy()

  @property
  def covariance(self) -> np.ndarray:
    """Unbiased (ddof=1) covariance, as `np.cov(features, rowvar=False)`."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
    return self._scatter / (self.count - 1)

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64."""
    return self.mean, self.covariance


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{name}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{name}: statistics contain NaN or inf")
  return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped to 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr sqrt(S1 S2) for PSD S1, S2 via tr sqrt(R S2 R) with R = sqrt(S1) (symmetric, eigh)."""
  root = _psd_sqrt(np.asarray(sigma1, np.float64))
  inner = root @ np.asarray(sigma2, np.float64) @ root
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, clamped at 0.

  |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), where tr sqrt(S1 S2) comes from the
  eigenvalues of the symmetric matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), so no
  non-symmetric matrix square root (scipy.linalg.sqrtm) is needed.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(f"statistics have different dims: {mu1.shape[0]} and {mu2.shape[0]}")
  diff = mu1 - mu2
  distance = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
              - 2.0 * trace_sqrt_product(sigma1, sigma2))
  return max(float(distance), 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D] and [N2, D] (float64, clamped at 0).

  With fewer samples than dimensions the covariances are X^T X / (N - 1) of the centred
  features X, and tr sqrt(S1 S2) is the nuclear norm of X1 X2^T / sqrt((N1-1)(N2-1)): an
  [N1, N2] SVD instead of two [D, D] eigendecompositions. Otherwise `frechet_distance` on
  the statistics.
  """
  x1 = np.asarray(features1, np.float64)
  x2 = np.asarray(features2, np.float64)
  if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
    raise ValueError(f"features must be [N, D] with the same D, got {x1.shape} and {x2.shape}")
  if min(x1.shape[0], x2.shape[0]) < 2:
    raise ValueError(f"FID needs at least 2 samples per set, got {x1.shape[0]} and "
                     f"{x2.shape[0]}")
  if max(x1.shape[0], x2.shape[0]) >= x1.shape[1]:
    return frechet_distance(*FeatureStats().update(x1).stats(),
                            *FeatureStats().update(x2).stats())
  mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
  c1, c2 = x1 - mu1, x2 - mu2
  n1, n2 = x1.shape[0] - 1, x2.shape[0] - 1
  trace_sqrt = np.sum(np.linalg.svd(c1 @ c2.T, compute_uv=False)) / np.sqrt(n1 * n2)
  diff = mu1 - mu2
  distance = diff @ diff + np.sum(c1 * c1) / n1 + np.sum(c2 * c2) / n2 - 2.0 * trace_sqrt
  return max(float(distance), 0.0)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over `splits` equal chunks) from class logits [N, K].

  Per chunk: exp(mean_i KL(p(y|x_i) || p(y))), p(y) the chunk's mean prediction; softmax in
  float64. Samples beyond a multiple of `splits` are dropped, as in the reference code.
  """
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, classes], got shape {logits.shape}")
  if splits < 1 or logits.shape[0] < splits:
    raise ValueError(f"need 1 <= splits <= N, got splits={splits} for N={logits.shape[0]}")
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))  # [N, K]
  chunk = logits.shape[0] // splits
  scores = []
  for index in range(splits):
    part = log_probs[index * chunk:(index + 1) * chunk]
    probs = np.exp(part)
    log_marginal = np.log(np.mean(probs, axis=0))  # [K]
    kl = np.sum(probs * (part - log_marginal), axis=1)  # [chunk]
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def _row_blocks(count: int, block: int) -> Iterator[slice]:
  for start in range(0, count, block):
    yield slice(start, min(start + block, count))


def _squared_distances(rows: np.ndarray, cols: np.ndarray, cols_sq: np.ndarray) -> np.ndarray:
  rows_sq = np.sum(rows * rows, axis=1)
  return np.maximum(rows_sq[:, None] + cols_sq[None, :] - 2.0 * rows @ cols.T, 0.0)


def knn_radii(features: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
  """Squared distance of each sample to its k-th nearest other sample [N]."""
  features = np.asarray(features, np.float64)
  if features.shape[0] <= k:
    raise ValueError(f"k={k} nearest neighbours need more than {k} samples, "
                     f"got {features.shape[0]}")
  squares = np.sum(features * features, axis=1)
  radii = np.empty(features.shape[0])
  for rows in _row_blocks(features.shape[0], block):
    dist = _squared_distances(features[rows], features, squares)
    # Index k: the sample itself sits at distance 0, index 0.
    radii[rows] = np.partition(dist, k, axis=1)[:, k]
  return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, probes: np.ndarray, block: int) -> float:
  """Fraction of probes within radius of at least one manifold sample."""
  squares = np.sum(manifold * manifold, axis=1)
  inside = 0
  for rows in _row_blocks(probes.shape[0], block):
    dist = _squared_distances(probes[rows], manifold, squares)
    inside += int(np.sum(np.any(dist <= radii[None, :], axis=1)))
  return inside / probes.shape[0]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block: int = 4096) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of k-NN feature manifolds.

  Precision: fraction of fake samples inside the real manifold (the union of balls around each
  real sample with radius = distance to its k-th nearest real neighbour); recall: fraction of
  real samples inside the fake manifold. Distances in float64, `block` rows at a time.
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] with the same D, got {real.shape} and "
                     f"{fake.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  precision = _coverage(real, knn_radii(real, k, block), fake, block)
  recall = _coverage(fake, knn_radii(fake, k, block), real, block)
  return precision, recall


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
  """Writes `mu` [D] and `sigma` [D, D] (float64) to an `.npz` (plus any extra arrays)."""
  mu, sigma = _check_stats(mu, sigma, str(path))
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"statistics path {str(path)!r} must end in .npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma, **extra)


def load_stats(path: str | os.PathLike, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) from a pytorch-fid / ADM style `.npz`; checks shapes (and `dim`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"FID statistics file {str(path)!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as archive:
      files = list(archive.files)
      missing = [key for key in STATS_KEYS if key not in files]
      if missing:
        raise ValueError(f"{path}: FID statistics need arrays {list(STATS_KEYS)}; missing "
                         f"{missing}, found {files}")
      mu, sigma = archive["mu"], archive["sigma"]
  except (OSError, EOFError) as error:
    raise ValueError(f"{path}: not a readable .npz file ({error})") from error
  except ValueError as error:
    if str(path) in str(error):
      raise
    raise ValueError(f"{path}: not a readable .npz of FID statistics ({error})") from error
  mu, sigma = _check_stats(mu, sigma, str(path))
  if dim is not None and mu.shape[0] != dim:
    raise ValueError(f"{path}: statistics have dim {mu.shape[0]}, expected {dim}")
  return mu, sigma
