"""Stage-1 trainer: end-to-end run on the embedded data, and exact resume from a checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from dq.train import vae_trainer


def tiny_config(num_steps, **train):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "demo_vae", os.path.join(os.path.dirname(__file__), "..", "configs", "demo_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"steps={num_steps}")
  config.data.image_size = config.model.resolution = 32
  config.data.embedded.train_size = 64
  config.data.embedded.eval_size = 16
  config.model.codebook_size = 32
  config.train.update(dict(batch_size=8, log_every=1, summary_every=0, checkpoint_every=1,
                           async_checkpointing=False, tensorboard=False))
  config.train.update(train)
  config.optim.update(dict(schedule="constant", warmup_steps=0))
  config.eval.update(dict(at_end=False, batch_size=8, max_images=16))
  return config


def params_of(state):
  return jax.tree.leaves(jax.device_get((state.params, state.codebook, state.opt_state)))


def test_resume_matches_uninterrupted_run(tmp_path):
  full = vae_trainer.train_and_evaluate(tiny_config(3), str(tmp_path / "a"))
  # Interrupted run: 2 steps, then a new process-like call continues to 3 from the checkpoint.
  vae_trainer.train_and_evaluate(tiny_config(2), str(tmp_path / "b"))
  assert "2" in os.listdir(tmp_path / "b" / "checkpoints")
  resumed = vae_trainer.train_and_evaluate(tiny_config(3), str(tmp_path / "b"))
  assert int(resumed.step) == 3
  for a, b in zip(params_of(full), params_of(resumed)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, not from scratch
  np.testing.assert_allclose(
      [r["loss"] for r in rows],
      [json.loads(l)["loss"] for l in open(tmp_path / "a" / "metrics.jsonl")], rtol=0, atol=0)


def test_train_writes_summaries_and_eval(tmp_path):
  config = tiny_config(2, summary_every=2, summary_images=4)
  config.eval.at_end = True
  # PatchGAN on from step 1: its state is checkpointed and restored with the rest.
  config.loss.update(dict(disc_weight=0.75, disc_start=1, disc_ndf=8, disc_layers=2))
  state = vae_trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  pngs = os.listdir(tmp_path / "summaries")
  assert any(p.startswith("reconstruction_") and p.endswith(".png") for p in pngs)
  from PIL import Image
  shape = lambda name: np.asarray(Image.open(tmp_path / "summaries" / name)).shape
  assert shape("code_histogram_0000002.png") == (4 * 200, 400, 3)  # one 4x2 in panel per image
  assert shape("fine_ratio_distribution_0000002.png") == (300, 500, 3)
  assert shape("eval/fine_ratio_distribution_0000002.png") == (300, 500, 3)
  result = json.load(open(tmp_path / "eval" / "reconstruction_0000002.json"))
  assert result["num_images"] == 16
  assert 0.0 <= result["fine_ratio_mean"] <= 1.0
  assert np.isfinite(result["psnr"]) and -1.0 <= result["ssim"] <= 1.0
  assert 0.0 < result["lpips"] < 2.0  # the installed LPIPS weights are found
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  for key in ("loss", "loss_l1", "loss_codebook", "loss_budget", "fine_ratio", "perplexity",
              "dead_fraction", "steps_per_sec", "disc_loss", "adaptive_weight"):
    assert key in rows[0], key
  assert rows[0]["adaptive_weight"] == 0.0 and rows[1]["adaptive_weight"] > 0
  # Eval mode restores the checkpoint and reproduces the same numbers.
  config.mode = "eval"
  again = vae_trainer.evaluate(config, str(tmp_path))
  assert again["psnr"] == pytest.approx(result["psnr"], abs=1e-5)


def test_batch_size_must_divide_devices(tmp_path):
  config = tiny_config(1, batch_size=6)
  with pytest.raises(ValueError, match="batch_size=6"):
    vae_trainer.train_and_evaluate(config, str(tmp_path))


def test_config_init_from_applies_on_a_fresh_start_only(vae_run_4_steps, tmp_path):
  from dq import checkpoint as ckpt
  saved = ckpt.restore_params_from(vae_run_4_steps)
  config = tiny_config(4, checkpoint_every=2)
  config.init_from = vae_run_4_steps
  state = vae_trainer.setup(config, str(tmp_path / "new"))[4]
  assert int(state.step) == 0  # training starts at 0 from the run's params and codebook
  for a, b in zip(jax.tree.leaves(jax.device_get((state.params, state.codebook))),
                  jax.tree.leaves((saved["params"], saved["codebook"]))):
    np.testing.assert_array_equal(a, b)
  # A workdir with checkpoints resumes from them; init_from (here: a missing path) is not read.
  import shutil
  shutil.copytree(vae_run_4_steps, tmp_path / "run")
  config.init_from = str(tmp_path / "missing")
  assert int(vae_trainer.setup(config, str(tmp_path / "run"))[4].step) == 4


def test_init_from_converted_official_weights(tmp_path, official_dqvae):
  import ml_collections
  from dq.models.build import build_dqvae
  from dq.official import dqvae as conv
  from dq.train.optim import make_optimizer
  from dq.train.state import abstract_with_shardings
  sd = {k[3:]: v for k, v in official_dqvae.items() if k.startswith("sd/")}
  params, codebook = conv.convert_state_dict(sd)
  model_cfg = conv.infer_model_config(sd)
  conv.save_converted(str(tmp_path / "official"), {"params": params, "codebook": codebook},
                      model_cfg)
  config = tiny_config(1)
  config.model = ml_collections.ConfigDict(model_cfg)
  model = build_dqvae(config.model)
  tx, _ = make_optimizer(config.optim, 1)
  init_fn = vae_trainer.make_init_fn(model, tx, model_cfg["resolution"])
  rng = jax.random.PRNGKey(0)
  state = init_fn(rng)
  repl = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)),
                                    jax.sharding.PartitionSpec())
  abstract = abstract_with_shardings(init_fn, rng, jax.tree.map(lambda _: repl, state))
  loaded = vae_trainer.init_from(str(tmp_path / "official"), state, abstract)
  for a, b in zip(jax.tree.leaves((loaded.params, loaded.codebook)),
                  jax.tree.leaves((params, codebook))):
    np.testing.assert_array_equal(a, b)
  # A model of another width cannot take these weights: the error names the field to fix.
  config.model.ch = 64
  other = build_dqvae(config.model)
  init_other = vae_trainer.make_init_fn(other, tx, model_cfg["resolution"])
  state_other = init_other(rng)
  abstract_other = abstract_with_shardings(init_other, rng,
                                           jax.tree.map(lambda _: repl, state_other))
  with pytest.raises(ValueError, match="do not match config.model"):
    vae_trainer.init_from(str(tmp_path / "official"), state_other, abstract_other)
