"""Reference FID statistics of the embedded dataset, with random Inception weights."""
import jax.numpy as jnp
import numpy as np
import pytest

from dq.data.config import default_data_config
from dq.data.pipeline import make_dataset
from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation.reference_stats import compute_reference_stats, features_in_batches

BATCH = 4


@pytest.fixture(scope="module")
def params():
  return inc.random_inception_params(3)


def small_data_config():
  cfg = default_data_config()
  cfg.image_size = 32
  cfg.embedded.eval_size = 9
  cfg.prefetch_buffer = 0
  return cfg


def test_reference_stats_match_direct_features(tmp_path, params):
  cfg = small_data_config()
  # All 9 eval images straight from the pipeline; [-1, 1] -> uint8 must be exact.
  batch = next(iter(make_dataset(cfg, split="eval", batch_size=9, seed=0, train=False,
                                 num_epochs=1)))
  scaled = (batch["image"].astype(np.float64) + 1.0) * 127.5
  np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)
  images = np.round(scaled).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(inc.images_to_uint8(jnp.asarray(batch["image"]))),
                                images)
  features = features_in_batches(params, images, BATCH).astype(np.float64)
  assert features.shape == (9, 2048) and np.all(np.isfinite(features))
  assert np.std(features) > 1e-3  # random weights still give varied features

  out = tmp_path / "stats" / "embedded_eval.npz"
  result = compute_reference_stats(cfg, "eval", out, batch_size=BATCH, max_images=6,
                                   params=params)
  assert result["num_images"] == 6
  mu, sigma = fid.load_stats(out, dim=2048)
  np.testing.assert_allclose(mu, features[:6].mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(features[:6], rowvar=False), rtol=1e-5, atol=1e-9)
  with np.load(out) as archive:
    assert int(archive["num_images"]) == 6
  # The whole split (last batch of 1 padded to 4) when max_images is None.
  whole = compute_reference_stats(cfg, "eval", tmp_path / "all.npz", batch_size=BATCH,
                                  params=params)
  assert whole["num_images"] == 9
  np.testing.assert_allclose(whole["mu"], features.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(whole["sigma"], np.cov(features, rowvar=False), rtol=1e-5,
                             atol=1e-9)


def test_reference_stats_errors(tmp_path, params):
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    compute_reference_stats(small_data_config(), "eval", tmp_path / "x.npz", batch_size=0,
                            params=params)
  with pytest.raises(ValueError, match="max_images must be None or >= 2"):
    compute_reference_stats(small_data_config(), "eval", tmp_path / "x.npz", max_images=1,
                            params=params)
  with pytest.raises(ValueError, match="split must be one of"):
    compute_reference_stats(small_data_config(), "test", tmp_path / "x.npz", params=params)
