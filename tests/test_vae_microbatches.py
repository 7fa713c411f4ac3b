"""Stage-1 gradient accumulation: `microbatches` slices give the one-slice step.

The entropy router is deterministic (no Gumbel noise, no budget loss), so without the GAN the
accumulated step must equal the one-slice step up to float rounding, EMA codebook (with its
dead-code restarts) included. With the GAN on, the discriminator's BatchNorm normalises each
slice by that slice's statistics and the adaptive weight is per slice, so only a looser match
holds there.
"""
import functools

import jax
import numpy as np
import pytest

from dq import sharding as sh
from dq.configs import vae_base_config
from dq.models.build import build_dqvae
from dq.train.optim import make_optimizer
from dq.train.vae_step import make_update_fn
from dq.train.vae_trainer import make_discriminator, make_init_fn

IMAGE_SIZE = 16
LR = 1e-2
# Adam with eps 1e-3 keeps the first update ~linear in the gradient (as in test_scaling), so
# summation-order differences stay at float32 rounding level.
RTOL, ATOL = 2e-4, 2e-6
GAN_RTOL = 1e-2          # GAN metrics: per-slice discriminator BatchNorm and adaptive weight
GAN_PARAM_ATOL = LR / 2  # generator params: within half an Adam step of the one-slice step
# Tiny steps, compared with each other: skip LLVM's expensive passes to halve compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config(gan: bool):
  config = vae_base_config()
  config.model.update(dict(
      resolution=IMAGE_SIZE, ch=8, ch_mult=(1, 1, 2), num_res_blocks=0, attn_resolutions=(),
      z_channels=8, codebook_size=128, embed_dim=8, dec_ch=8, dec_ch_mult=(1, 2),
      dec_num_res_blocks=0, dec_attn_resolutions=(), norm_groups=4))
  config.model.router.update(dict(kind="entropy", norm_groups=4))
  for optim in (config.optim, config.optim_disc):
    optim.update(dict(lr=LR, eps=1e-3, schedule="constant", warmup_steps=0))
  if gan:
    config.loss.update(dict(disc_weight=0.75, disc_start=0, disc_ndf=8, disc_layers=2))
  return config


def _images():
  return np.random.default_rng(0).uniform(-1, 1, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
      np.float32)


@functools.lru_cache(maxsize=None)
def _setup(gan: bool):
  """(config, model, tx, schedule, discriminator, disc_tx, initial state), built once."""
  config = _config(gan)
  # A threshold inside the noise images' patch-entropy range: a mix of coarse and fine regions.
  model = build_dqvae(config.model, entropy_thresholds=(2.0,))
  tx, schedule = make_optimizer(config.optim, 10)
  discriminator, disc_tx = make_discriminator(config)
  init_fn = make_init_fn(model, tx, IMAGE_SIZE, discriminator, disc_tx)
  rng = jax.random.PRNGKey(0)
  state = jax.jit(init_fn).lower(rng).compile(FAST_COMPILE)(rng)
  return config, model, tx, schedule, discriminator, disc_tx, state


def _step(gan: bool, microbatches: int):
  """One jitted step from the same initial state; returns (initial, new state, metrics)."""
  config, model, tx, schedule, discriminator, disc_tx, state = _setup(gan)
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router, num_grains=2,
                             discriminator=discriminator, disc_tx=disc_tx,
                             microbatches=microbatches)
  batch = {"image": _images()}
  step = jax.jit(update_fn).lower(state, batch, {}).compile(FAST_COMPILE)
  new_state, metrics = step(state, batch, {})
  return jax.device_get((state, new_state, metrics))


def _assert_trees_close(got, expected, rtol, atol, name):
  leaves = jax.tree_util.tree_leaves_with_path(got)
  assert len(leaves) == len(jax.tree.leaves(expected)) > 0
  for (path, a), b in zip(leaves, jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                               err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def one_slice():
  return _step(gan=False, microbatches=1)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_accumulated_step_equals_one_slice_step(one_slice, microbatches):
  initial, reference, reference_metrics = one_slice
  _, state, metrics = _step(gan=False, microbatches=microbatches)
  assert set(metrics) == set(reference_metrics)
  # Restarts happen on this first step (unused codes' EMA counts fall below 1) and a mix of
  # grains is coded, so the checks below cover the restart rng and both grains.
  assert 0.1 < reference_metrics["dead_fraction"] < 0.9
  assert 0.1 < reference_metrics["fine_ratio"] < 0.9
  for name, value in reference_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
  _assert_trees_close(state.params, reference.params, RTOL, ATOL, "params")
  # One EMA update on the whole batch's latents, restarts included: the same codebook.
  _assert_trees_close(state.codebook, reference.codebook, RTOL, ATOL, "codebook")
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                       state.codebook, initial.codebook))
  assert max(moved) > 1e-3  # the codebook really changed this step


def test_accumulated_step_with_gan_is_close():
  _, reference, reference_metrics = _step(gan=True, microbatches=1)
  initial, state, metrics = _step(gan=True, microbatches=2)
  assert set(metrics) == set(reference_metrics)
  assert metrics["adaptive_weight"] > 0
  for name in ("loss", "loss_l1", "loss_codebook", "loss_generator", "adaptive_weight",
               "grad_norm", "disc_loss", "disc_logits_real", "disc_logits_fake",
               "disc_grad_norm"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=GAN_RTOL,
                               atol=1e-4, err_msg=name)
  # The EMA codebook only sees the latents (from the step's starting parameters): still exact.
  _assert_trees_close(state.codebook, reference.codebook, RTOL, ATOL, "codebook")
  _assert_trees_close(state.params, reference.params, 0.0, GAN_PARAM_ATOL, "params")
  # The discriminator took one Adam step (at most LR per weight) on the accumulated gradients.
  changed = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.disc_params,
                         initial.disc_params)
  changed = jax.tree.leaves(changed)
  assert max(changed) > LR / 2 and max(changed) <= LR * 1.001


def test_split_and_merge_microbatches_round_trip():
  batch = {"image": np.arange(8 * 3).reshape(8, 3), "label": np.arange(8)}
  slices = sh.split_microbatches(batch, 4)
  assert slices["image"].shape == (4, 2, 3)
  np.testing.assert_array_equal(slices["label"], [[0, 4], [1, 5], [2, 6], [3, 7]])  # strided
  merged = sh.merge_microbatches(slices)
  for key in batch:
    np.testing.assert_array_equal(merged[key], batch[key])
  with pytest.raises(ValueError, match="batch size 8 is not divisible by "
                     "config.train.microbatches=3"):
    sh.split_microbatches(batch, 3)


def test_bad_microbatches_is_an_error():
  config, model, tx, schedule = _setup(False)[:4]
  with pytest.raises(ValueError, match="config.train.microbatches must be >= 1; got 0"):
    make_update_fn(model, tx, schedule, loss_cfg=config.loss, router_cfg=config.model.router,
                   num_grains=2, microbatches=0)
