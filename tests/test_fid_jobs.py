"""FID jobs (reference, stage-1 rFID, stage-2 FID) on tiny models with random Inception weights.

Every job result is checked against the same quantity computed directly: pipeline images ->
uint8 -> `features_in_batches` (one device, unsharded) -> float64 statistics.
"""
import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq import generator as gen
from dq.configs import fid_base_config
from dq.data.pipeline import make_dataset
from dq.evaluation import fid
from dq.evaluation import fid_jobs
from dq.evaluation import inception as inc
from dq.evaluation.evaluators import common, reconstruction
from dq.evaluation.evaluators.reference import reference_features
from dq.evaluation.reference_stats import features_in_batches
from dq.stage2.build import build_transformer
from dq.tokenizer import load_stage1
from dq.official import transformer as convert_transformer
from dq import checkpoint as ckpt
from dq.train import transformer_step as ts
from stage2_util import tiny_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
EVAL_IMAGES = 8
BATCH = 8  # = the 8 fake devices: no padded Inception rows in the jobs


@pytest.fixture(scope="module")
def inception_params():
  return inc.random_inception_params(5, include_logits=True)


@pytest.fixture(scope="module")
def stage1_dir(tiny_stage1_dir):
  return tiny_stage1_dir


@pytest.fixture(scope="module")
def vae(stage1_dir):
  return load_stage1(stage1_dir)


def fid_config(mode, **fid_fields):
  config = fid_base_config()
  config.mode = mode
  config.data.name = "embedded"
  config.data.image_size = 32
  config.data.prefetch_buffer = 0
  config.data.embedded.update(dict(procedural_fraction=1.0, photos=False, train_size=64,
                                   eval_size=EVAL_IMAGES))
  config.fid.update(dict(batch_size=BATCH, pr_images=6, pr_k=2, is_splits=2, log_every=1,
                         tensorboard=False))
  config.fid.update(fid_fields)
  config.stage1.lpips = False
  return config


def eval_images(config, count=EVAL_IMAGES):
  """uint8 eval images [count, 32, 32, 3] straight from the pipeline."""
  batch = next(iter(make_dataset(config.data, split="eval", batch_size=count, seed=0,
                                 train=False, num_epochs=1)))
  return to_uint8(batch["image"])


def to_uint8(images):
  """numpy `inc.images_to_uint8` (no eager jax ops to compile)."""
  return np.round(np.clip((np.asarray(images) + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def direct_features(params, images):
  """{'pool_3', 'logits'} of uint8 images, BATCH at a time on one device (the compilation
  `features_in_batches` and `compute_reference_stats` use)."""
  outputs = []
  for start in range(0, len(images), BATCH):
    chunk = images[start:start + BATCH]
    padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk), *chunk.shape[1:]), np.uint8)])
    out = jax.device_get(inc.extract_features(params, jnp.asarray(padded)))
    outputs.append({key: value[:len(chunk)] for key, value in out.items()})
  return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def stats_of(features):
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_reference_job_writes_stats_and_features(tmp_path, inception_params):
  # Weights through the config (an .npz the loader reads), not the override.
  weights = tmp_path / "inception.npz"
  np.savez(weights, **{k: np.asarray(v) for k, v in inc.flatten_params(inception_params).items()})
  config = fid_config("reference", inception_weights=str(weights))
  results = fid_jobs.reference(config, str(tmp_path))

  path = tmp_path / "eval" / "reference_eval.npz"
  assert results["path"] == str(path) and results["num_images"] == EVAL_IMAGES
  assert results["num_features"] == 6
  features = features_in_batches(inception_params, eval_images(config), BATCH)
  mu, sigma = stats_of(features)
  with np.load(path) as archive:
    assert archive["mu"].shape == (2048,) and archive["sigma"].shape == (2048, 2048)
    assert int(archive["num_images"]) == EVAL_IMAGES
    np.testing.assert_allclose(archive["mu"], mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(archive["sigma"], sigma, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(archive["features"], features[:6], rtol=1e-6, atol=1e-6)
  saved = read_json(tmp_path / "eval" / "fid_reference_0000000.json")
  assert saved["num_images"] == EVAL_IMAGES and saved["split"] == "eval"
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["fid_reference/num_images"] == EVAL_IMAGES

  # FID of the same images (split into per-process parts) against the stored statistics is 0.
  parts = [features[:3], features[3:5], features[5:]]
  assert common.fid_to_reference(parts, *fid.load_stats(path)) == pytest.approx(0.0, abs=1e-6)
  assert common.fid_to_reference(parts, mu + 0.1, sigma) == pytest.approx(0.01 * 2048,
                                                                            rel=1e-6)

  # Without features: mu/sigma only (the compute_reference_stats file), same statistics.
  other = fid_config("reference", save_features=False, max_images=4,
                     reference_stats=str(tmp_path / "four.npz"))
  assert fid_jobs.reference(other, str(tmp_path), inception_params)["num_features"] == 0
  with np.load(tmp_path / "four.npz") as archive:
    assert "features" not in archive.files
    np.testing.assert_allclose(archive["mu"], features[:4].mean(0), rtol=1e-6, atol=1e-9)
  assert reference_features(str(tmp_path / "four.npz")) is None


def test_stage1_job_rfid_matches_direct_computation(tmp_path, stage1_dir, vae,
                                                    inception_params, caplog):
  config = fid_config("stage1", max_images=4)
  config.stage1.path = stage1_dir
  config.stage1.lpips = True
  config.stage1.lpips_weights = str(tmp_path / "no_lpips.npz")  # missing: warn and skip
  with caplog.at_level(logging.WARNING):
    results = fid_jobs.stage1(config, str(tmp_path), inception_params)
  assert "without LPIPS" in caplog.text and "lpips" not in results

  originals = eval_images(config)[:4]
  # The job's jitted reconstruction (same shapes and shardings: no second compilation); the
  # features come from the unsharded single-device path.
  devices = common.LocalDevices()
  out = jax.device_get(reconstruction.reconstruct_batch(
      vae.model, False, jax.device_put(vae.variables, devices.replicated), {},
      devices.put_batch(originals.astype(np.float32) / 127.5 - 1.0, BATCH)))
  np.testing.assert_array_equal(out["original"][:4], originals)
  reconstructed = out["reconstruction"][:4]
  both = features_in_batches(inception_params, np.concatenate([reconstructed, originals]), BATCH)
  rec_features, orig_features = both[:4], both[4:]
  expected = fid.fid_from_features(rec_features, orig_features)
  assert expected > 1e-3
  assert results["rfid"] == pytest.approx(expected, rel=1e-5)
  assert results["num_images"] == 4 and results["reference"] == "originals"
  np.testing.assert_allclose(results["psnr"], np.mean(out["psnr"][:4]), rtol=1e-6)
  np.testing.assert_allclose(results["fine_ratio_mean"], np.mean(out["grain"][:4]), rtol=1e-6)
  saved = read_json(tmp_path / "eval" / "fid_stage1_0000000.json")
  assert saved["rfid"] == pytest.approx(expected, rel=1e-5)

  # With a reference file for the split, the reconstructions are compared to it instead.
  shift = np.linspace(0.0, 1.0, 2048)
  reference_mu, reference_sigma = stats_of(orig_features)
  fid.save_stats(tmp_path / "eval" / "reference_eval.npz", reference_mu + shift, reference_sigma)
  config.stage1.lpips = False
  again = fid_jobs.stage1(config, str(tmp_path), inception_params)
  assert again["reference"] == str(tmp_path / "eval" / "reference_eval.npz")
  # Only the mean term changes: |m_rec - m_orig - shift|^2 replaces |m_rec - m_orig|^2.
  delta = rec_features.astype(np.float64).mean(0) - reference_mu
  shifted = expected - delta @ delta + (delta - shift) @ (delta - shift)
  assert again["rfid"] == pytest.approx(shifted, rel=1e-5)


@pytest.fixture(scope="module")
def stage2_dir(stage1_dir, vae, tmp_path_factory):
  """A stage-2 workdir as the trainer leaves it: config.json and an orbax checkpoint at step 1
  whose `params` (random, drawn in numpy: no init compilation) and `step` the trainer's
  `restore_params` reads."""
  workdir = str(tmp_path_factory.mktemp("stage2"))
  config = tiny_config(stage1_dir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  layout = gen.make_layout(config, vae, gen.resolve_data_config(config, vae))
  model = build_transformer(config.model, layout)
  tx, _ = ts.make_transformer_optimizer(config.optim, config.train.num_steps)
  abstract = jax.eval_shape(ts.make_init_fn(model, tx, layout), jax.random.PRNGKey(0)).params
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    return (0.0 if name == "bias" else 0.2) * rng.standard_normal(leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract)
  manager = ckpt.make_manager(workdir, keep=1, async_save=False)
  ckpt.save(manager, 1, {"step": np.int32(1), "params": params}, None)
  manager.wait_until_finished()
  return workdir


def test_stage2_job_fid_precision_recall_and_images(tmp_path, stage1_dir, stage2_dir,
                                                    inception_params):
  config = fid_config("stage2", num_images=10, save_images=True, pr_images=EVAL_IMAGES)
  config.stage2.workdir = stage2_dir
  config.sample.batch_size = 8  # 2 batches, the last one padded
  results = fid_jobs.stage2(config, str(tmp_path), inception_params)

  # The reference was missing: computed first, with features.
  reference = tmp_path / "eval" / "reference_eval.npz"
  real_features = reference_features(str(reference))
  assert real_features.shape == (EVAL_IMAGES, 2048)  # the whole reference split
  samples = np.load(results["images_path"])
  assert results["images_path"] == str(tmp_path / "eval" / "fid_samples.npz")
  assert samples["arr_0"].shape == (10, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(samples["labels"], np.arange(10) % 9)  # class-balanced
  assert len({image.tobytes() for image in samples["arr_0"]}) == 10

  # FID, IS and precision/recall of the saved images, computed directly.
  out = direct_features(inception_params, samples["arr_0"])
  fake = out["pool_3"]
  assert results["fid"] == pytest.approx(fid.fid_from_features(fake, real_features), rel=1e-5)
  assert results["num_images"] == 10 and results["checkpoint_step"] == 1
  precision, recall = fid.precision_recall(real_features, fake[:EVAL_IMAGES], k=2)
  assert (results["precision"], results["recall"]) == pytest.approx((precision, recall))
  assert results["pr_images"] == EVAL_IMAGES
  assert results["inception_score"] == pytest.approx(
      fid.inception_score(np.asarray(out["logits"]), splits=2)[0], rel=1e-5)
  assert 0.0 <= results["fine_ratio"] <= 1.0 and results["class_balanced"]
  saved = read_json(tmp_path / "eval" / "fid_stage2_0000001.json")
  for key in ("fid", "precision", "recall", "num_images", "inception_score"):
    assert saved[key] == pytest.approx(results[key])
  assert saved["sampling"]["content_temperature"] == 1.0 and saved["sampling"]["seed"] == 0
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 1 and rows[-1]["fid_stage2/fid"] == pytest.approx(results["fid"])

  # The same params as a converted official folder (stage 1 from config.stage1.path): the same
  # first batch of samples (same key, labels and sampler settings).
  converted = str(tmp_path / "converted")
  params = ckpt.restore_params_from(stage2_dir)["params"]
  convert_transformer.save_converted_transformer(
      converted, params, convert_transformer.infer_transformer_config(params, 2, 16, 9))
  config = fid_config("stage2", num_images=8, save_images=True,
                      images_path=str(tmp_path / "converted.npz"))
  config.stage2.workdir = converted
  config.stage1.path = stage1_dir
  config.sample.batch_size = 8
  again = fid_jobs.stage2(config, str(tmp_path), inception_params)
  assert again["stage2"] == converted and again["checkpoint_step"] == 0
  np.testing.assert_array_equal(np.load(again["images_path"])["arr_0"], samples["arr_0"][:8])


def test_job_config_errors(tmp_path, inception_params):
  config = fid_config("stage2")
  with pytest.raises(ValueError, match="config.stage2.workdir is empty"):
    fid_jobs.stage2(config, str(tmp_path), inception_params)
  config.stage2.workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither config.json"):
    fid_jobs.stage2(config, str(tmp_path), inception_params)
  with pytest.raises(ValueError, match="config.stage1.path is empty"):
    fid_jobs.stage1(fid_config("stage1"), str(tmp_path), inception_params)
  config = fid_config("reference", split="test")
  with pytest.raises(ValueError, match="config.fid.split='test'"):
    fid_jobs.reference(config, str(tmp_path), inception_params)
  config = fid_config("reference")
  config.data.image_size = 0
  with pytest.raises(ValueError, match="config.data.image_size=0"):
    fid_jobs.reference(config, str(tmp_path), inception_params)
  with pytest.raises(ValueError, match="codes 64 px images"):
    common.data_config(fid_config("stage1"), 64)


def test_fid_to_reference_matches_frechet_distance():
  rng = np.random.default_rng(0)
  dim = 48
  reference = rng.standard_normal((200, dim)) @ rng.standard_normal((dim, dim)) / 4
  mu, sigma = stats_of(reference)
  for count in (5, 30, 60):  # fewer samples than dims (the [N, N] form) and more
    samples = 0.8 * rng.standard_normal((count, dim)) + 0.3
    parts = [samples[:count // 3], samples[count // 3:]]
    expected = fid.frechet_distance(*stats_of(samples), mu, sigma)
    assert common.fid_to_reference(parts, mu, sigma) == pytest.approx(expected, rel=1e-6)
  merged = common.merged_stats(parts)
  np.testing.assert_allclose(merged.covariance, np.cov(samples, rowvar=False), rtol=1e-10)
  assert merged.count == 60


def test_process_share_and_gather_on_one_process():
  assert common.process_share(10) == range(0, 10)
  rows = np.arange(12, dtype=np.float32).reshape(4, 3)
  parts = common.gather_rows(rows)
  assert len(parts) == 1 and np.array_equal(parts[0], rows)
  assert [len(p) for p in common.trim_rows([rows, rows[:2]], 5)] == [4, 1]


@pytest.mark.parametrize("name,arg", [("fid_demo", "stage2=/runs/demo"),
                                      ("fid_ffhq", "data=/data/ffhq,stage2=/runs/ffhq"),
                                      ("fid_imagenet", "data=/d/train,eval_data=/d/val,tfds")])
def test_fid_configs(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  assert config.stage == "fid" and config.mode in fid_jobs.MODES
  base = fid_base_config()
  assert set(config.fid.keys()) == set(base.fid.keys())
  assert set(config.sample.keys()) == set(base.sample.keys())
  gen.sampling_config(config, gen.Generator(None, None, None, 0, "", None, "row"))
  if name == "fid_imagenet":
    assert config.data.name == "tfds" and config.fid.split == "train"
    assert config.fid.num_images == 50_000 and config.sample.labels == ""
  if name == "fid_ffhq":
    assert config.data.folder.eval_path == "/data/ffhq" and config.fid.split == "eval"


def test_package_exports_load_lazily():
  import dq.evaluation as evaluation
  assert evaluation.fid_base_config is fid_base_config
  assert evaluation.FeatureStats is fid.FeatureStats
  assert set(evaluation.__all__) <= set(dir(evaluation))
  with pytest.raises(AttributeError, match="no attribute 'missing'"):
    evaluation.missing  # pylint: disable=pointless-statement
