"""One train step on every mesh shape equals the single-device step; FSDP really shards;
checkpoints move between meshes."""
import jax
import numpy as np
import pytest

from dq import sharding as sh
from dq.models.build import build_dqvae
from dq.train import checkpoint as ckpt
from dq.train.optim import make_optimizer
from dq.train.state import abstract_with_shardings
from dq.train.vae_step import make_update_fn
from dq.train.vae_trainer import make_discriminator, make_init_fn
from test_train_vae import tiny_config

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
SHARDING = {"fsdp_min_size": 2048}  # small enough that the tiny model's big kernels shard
# Adam with eps 1e-3 keeps the first update ~linear in the gradient, so float reduction-order
# differences between meshes stay at float32 rounding level instead of flipping update signs.
RTOL, ATOL = 2e-4, 2e-6


def _config():
  config = tiny_config(1)
  config.optim.update(dict(lr=1e-2, eps=1e-3))
  config.loss.update(dict(disc_weight=0.75, disc_start=0, disc_ndf=8, disc_layers=2))
  return config


def _images():
  return np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)


def _setup(config, mesh):
  model = build_dqvae(config.model)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  discriminator, disc_tx = make_discriminator(config)
  init_fn = make_init_fn(model, tx, 32, discriminator, disc_tx)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh, SHARDING)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router, num_grains=2,
                             discriminator=discriminator, disc_tx=disc_tx)
  repl = sh.replicated(mesh)
  step = jax.jit(update_fn, in_shardings=(shardings, sh.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl))
  return init_fn, rng, shardings, state, step


def _one_step(mesh):
  _, _, shardings, state, step = _setup(_config(), mesh)
  state, metrics = step(state, sh.shard_batch({"image": _images()}, mesh), {})
  return state, jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single_device():
  state, metrics, _ = _one_step(sh.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  return jax.device_get(state), metrics


@pytest.mark.parametrize("data,fsdp", MESHES)
def test_stage1_step_is_mesh_invariant(single_device, data, fsdp):
  reference_state, reference_metrics = single_device
  state, metrics, shardings = _one_step(sh.make_mesh({"data": data, "fsdp": fsdp}))
  for name in ("loss", "loss_l1", "loss_codebook", "loss_budget", "loss_generator",
               "disc_loss"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=RTOL, err_msg=name)
  kernel = state.params["decoder"]["conv_out"]["kernel"]
  if fsdp > 1:  # the biggest kernels are split over fsdp, small arrays replicated
    big = state.params["encoder"]["down_3"]["block_0"]["conv2"]["kernel"]
    assert "fsdp" in big.sharding.spec
    assert {s.data.size for s in big.addressable_shards} == {big.size // fsdp}
  assert kernel.sharding.is_fully_replicated
  got, expected = jax.device_get((state.params, state.codebook, state.disc_params)), (
      reference_state.params, reference_state.codebook, reference_state.disc_params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


def test_checkpoint_moves_between_meshes(tmp_path):
  config = _config()
  _, _, _, state, _ = _setup(config, sh.make_mesh({"data": 2, "fsdp": 4}))
  manager = ckpt.make_manager(str(tmp_path), async_save=False)
  ckpt.save(manager, 1, state, None)
  other = sh.make_mesh({"data": 8, "fsdp": 1})
  init_fn, rng, shardings, _, _ = _setup(config, other)
  restored, step = ckpt.restore(manager, abstract_with_shardings(init_fn, rng, shardings), None)
  assert step == 1
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding.mesh.shape == other.shape
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def _stage2_step(mesh, microbatches=1):
  from dq.stage2.build import build_transformer
  from dq.train import transformer_step as ts
  from test_train_transformer import LAYOUT, random_batch, tiny_model_config
  from dq.configs import transformer_base_config
  optim = transformer_base_config().optim
  optim.update(dict(lr=1e-2, eps=1e-3, schedule="constant", warmup_steps=0))
  model = build_transformer(tiny_model_config(), LAYOUT)
  tx, schedule = ts.make_transformer_optimizer(optim, 10)
  init_fn = ts.make_init_fn(model, tx, LAYOUT)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh,
                                             {"fsdp_min_size": 512})
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  update_fn = ts.make_update_fn(model, tx, schedule, layout=LAYOUT, label_dropout=0.25,
                                class_conditional=True, microbatches=microbatches)
  step = jax.jit(update_fn, in_shardings=(shardings, sh.batch_sharding(mesh)),
                 out_shardings=(shardings, sh.replicated(mesh)))
  batch = {k: v for k, v in random_batch(LAYOUT, 16, seed=3).items()}
  return step(state, sh.shard_batch(batch, mesh))


@pytest.fixture(scope="module")
def stage2_single_device():
  state, metrics = _stage2_step(sh.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("data,fsdp,microbatches", [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1),
                                                    (1, 1, 4), (2, 4, 2)])
def test_stage2_step_is_mesh_and_microbatch_invariant(stage2_single_device, data, fsdp,
                                                      microbatches):
  reference_state, reference_metrics = stage2_single_device
  devices = jax.devices()[:data * fsdp]
  state, metrics = _stage2_step(sh.make_mesh({"data": data, "fsdp": fsdp}, devices),
                                microbatches)
  metrics = jax.device_get(metrics)
  for name in ("loss", "content_loss", "coarse_position_loss", "fine_position_loss",
               "content_accuracy", "position_accuracy", "grad_norm", "null_label_fraction"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=RTOL, err_msg=name)
  if fsdp > 1:
    mlp = state.params["content_block_0"]["mlp_fc"]["kernel"]  # [32, 128]
    assert "fsdp" in mlp.sharding.spec
    assert {s.data.size for s in mlp.addressable_shards} == {mlp.size // fsdp}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                          jax.tree.leaves(reference_state.params)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
