"""FID statistics and metrics: against scipy, closed forms, brute force and the golden fixture."""
import numpy as np
import pytest
import scipy.linalg
from conftest import fixture_path

from dq.evaluation import fid


def random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
  factor = rng.standard_normal((dim, rank or dim + 3))
  return factor @ factor.T / factor.shape[1]


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
  root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(fixture_path("fid_golden.npz")))


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(dim):
  rng = np.random.default_rng(dim)
  for _ in range(3):
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_spd(rng, dim), 2.0 * random_spd(rng, dim)
    expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert expected > 0.1
    np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2), expected,
                               rtol=1e-9)
    # Symmetric in its two distributions.
    np.testing.assert_allclose(fid.frechet_distance(mu2, sigma2, mu1, sigma1), expected,
                               rtol=1e-9)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  dim = 16
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), diagonal,
                             rtol=1e-12)
  sigma = random_spd(rng, dim)
  shift = rng.standard_normal(dim)
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma, mu1 + shift, sigma),
                             shift @ shift, rtol=1e-8, atol=1e-10)
  assert fid.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-10)
  # Rank-deficient covariances (fewer samples than dims) stay finite and are clamped at 0.
  low_rank = random_spd(rng, dim, rank=4)
  value = fid.frechet_distance(mu1, low_rank, mu1, low_rank)
  assert 0.0 <= value < 1e-6


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D, D\]"):
    fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="different dims: 3 and 4"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="NaN or inf"):
    fid.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_fid_from_features_gram_path_matches_statistics_path():
  rng = np.random.default_rng(2)
  dim = 40
  a = rng.standard_normal((25, dim))
  b = 1.5 * rng.standard_normal((18, dim)) + 0.2
  # Fewer samples than dims: the [N1, N2] SVD path, against the covariance/eigh path.
  by_stats = fid.frechet_distance(*fid.FeatureStats().update(a).stats(),
                                  *fid.FeatureStats().update(b).stats())
  assert by_stats > 10
  np.testing.assert_allclose(fid.fid_from_features(a, b), by_stats, rtol=0, atol=1e-5)
  assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
  # More samples than dims: the statistics path itself.
  a, b = rng.standard_normal((60, 8)), rng.standard_normal((70, 8)) + 1
  expected = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                           np.cov(b, rowvar=False))
  np.testing.assert_allclose(fid.fid_from_features(a, b), expected, rtol=1e-9)
  with pytest.raises(ValueError, match="at least 2 samples per set, got 1 and 70"):
    fid.fid_from_features(a[:1], b)
  with pytest.raises(ValueError, match="same D"):
    fid.fid_from_features(a, b[:, :3])


def test_feature_stats_match_numpy_for_any_batching():
  rng = np.random.default_rng(1)
  features = (rng.standard_normal((103, 7)) * 3 + 50).astype(np.float32)
  expected_mu = features.astype(np.float64).mean(0)
  expected_sigma = np.cov(features.astype(np.float64), rowvar=False)
  for sizes in ([103], [1, 2, 100], [50, 0, 53], [10] * 10 + [3]):
    stats = fid.FeatureStats()
    start = 0
    for size in sizes:
      stats.update(features[start:start + size])
      start += size
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, expected_mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.covariance, expected_sigma, rtol=1e-11, atol=1e-12)
  left, right = fid.FeatureStats().update(features[:40]), fid.FeatureStats().update(features[40:])
  mu, sigma = left.merge(right).stats()
  np.testing.assert_allclose(mu, expected_mu, atol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-11, atol=1e-12)
  assert mu.dtype == sigma.dtype == np.float64


def test_feature_stats_errors():
  stats = fid.FeatureStats(dim=4)
  with pytest.raises(ValueError, match="dim 3, the accumulator has 4"):
    stats.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    stats.update(np.zeros(4))
  with pytest.raises(ValueError, match="no features accumulated"):
    _ = stats.mean
  stats.update(np.ones((1, 4)))
  with pytest.raises(ValueError, match="at least 2 samples, got 1"):
    _ = stats.covariance


def test_inception_score_extremes():
  assert fid.inception_score(np.zeros((40, 1008)), splits=4) == pytest.approx((1.0, 0.0))
  classes = 10
  one_hot = np.tile(np.eye(classes) * 200.0, (3, 1))  # each split sees all 10 classes once
  mean, std = fid.inception_score(one_hot, splits=3)
  assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Against a direct float64 evaluation on random logits.
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((30, 5)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in np.split(probs, 3):
    marginal = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * np.log(part / marginal), 1))))
  np.testing.assert_allclose(fid.inception_score(logits, splits=3), (np.mean(scores),
                                                                      np.std(scores)), rtol=1e-12)
  with pytest.raises(ValueError, match="splits=5 for N=4"):
    fid.inception_score(np.zeros((4, 3)), splits=5)


def brute_force_precision_recall(real, fake, k):
  def radii(x):
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(dist, axis=1)[:, k]

  def coverage(manifold, probes):
    dist = np.linalg.norm(probes[:, None] - manifold[None], axis=-1)
    return np.mean(np.any(dist <= radii(manifold)[None], axis=1))

  return coverage(real, fake), coverage(fake, real)


def test_precision_recall_toy_clouds():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((200, 2))
  assert fid.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
  # A far-away cloud: nothing in either manifold.
  assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
  # Mode collapse: fakes sit in the middle of the real cloud; precise but low recall.
  collapsed = 0.05 * rng.standard_normal((200, 2))
  precision, recall = fid.precision_recall(real, collapsed, k=3)
  assert precision == 1.0 and recall < 0.2
  # Random clouds in 8-d against a direct O(N^2) evaluation, with blocks smaller than N.
  real, fake = rng.standard_normal((90, 8)), 1.2 * rng.standard_normal((70, 8)) + 1.5
  expected = brute_force_precision_recall(real, fake, k=5)
  assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95
  assert fid.precision_recall(real, fake, k=5, block=16) == pytest.approx(expected)
  with pytest.raises(ValueError, match="more than 3 samples, got 3"):
    fid.precision_recall(real[:3], fake, k=3)
  with pytest.raises(ValueError, match="same D"):
    fid.precision_recall(real, fake[:, :4])


def test_save_and_load_stats(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = rng.standard_normal(6), random_spd(rng, 6)
  path = tmp_path / "ref" / "stats.npz"
  fid.save_stats(path, mu, sigma)
  loaded_mu, loaded_sigma = fid.load_stats(path, dim=6)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  with np.load(path) as archive:
    assert sorted(archive.files) == ["mu", "sigma"]
  # ADM reference batches carry more arrays next to mu/sigma.
  np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma,
           mu_s=mu[:2], sigma_s=sigma[:2, :2])
  np.testing.assert_array_equal(fid.load_stats(tmp_path / "adm.npz")[0], mu)


def test_load_stats_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    fid.load_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
  with pytest.raises(ValueError, match=r"no_sigma.npz.*missing \['sigma'\], found \['mu'\]"):
    fid.load_stats(tmp_path / "no_sigma.npz")
  np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
  with pytest.raises(ValueError, match=r"shapes.npz: mu must be \[D\]"):
    fid.load_stats(tmp_path / "shapes.npz")
  (tmp_path / "garbage.npz").write_bytes(b"not an npz file at all")
  with pytest.raises(ValueError, match="garbage.npz"):
    fid.load_stats(tmp_path / "garbage.npz")
  np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(ValueError, match="dim 3, expected 2048"):
    fid.load_stats(tmp_path / "small.npz", dim=2048)
  with pytest.raises(ValueError, match="must end in .npz"):
    fid.save_stats(tmp_path / "stats.txt", np.zeros(3), np.eye(3))


def test_golden_statistics_and_fid_from_stored_features(golden):
  stats_a = fid.FeatureStats()
  for start in range(0, 64, 24):
    stats_a.update(golden["features_A"][start:start + 24])
  mu_a, sigma_a = stats_a.stats()
  mu_b, sigma_b = fid.FeatureStats().update(golden["features_B"]).stats()
  np.testing.assert_allclose(mu_a, golden["mu_A"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(mu_b, golden["mu_B"], rtol=0, atol=1e-12)
  for sigma, name in ((sigma_a, "A"), (sigma_b, "B")):
    np.testing.assert_allclose(np.trace(sigma), golden[f"sigma_{name}_trace"], rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(sigma), golden[f"sigma_{name}_fro"], rtol=1e-10)
  distance = fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
  assert abs(distance - golden["fid_AB_eigh"]) <= 1e-4
  assert abs(distance - golden["fid_AB_sqrtm"]) <= 1e-4
  # The exact SVD form on the features (64 samples < 2048 dims) agrees within the eigh floor.
  by_features = fid.fid_from_features(golden["features_A"], golden["features_B"])
  assert abs(by_features - golden["fid_AB_eigh"]) <= 1e-4
  # Rank-63 covariances: the fixture's eigh value of FID(A, A) is slightly negative; ours is
  # clamped to 0.
  assert golden["fid_AA_eigh"] < 0
  assert fid.fid_from_features(golden["features_A"], golden["features_A"]) == 0.0
