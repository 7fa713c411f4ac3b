"""PatchGAN discriminator, adversarial losses, adaptive weight and the GAN train step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dq.losses import gan
from dq.models.build import build_dqvae, default_model_config
from dq.models.discriminator import PatchDiscriminator
from dq.train.optim import make_optimizer
from dq.train.vae_step import last_layer_grad, make_update_fn
from dq.train.vae_trainer import make_init_fn


def test_discriminator_shapes_and_parameter_count():
  disc = PatchDiscriminator(ndf=64, num_layers=3)
  x = jnp.zeros((2, 64, 64, 3))
  variables = disc.init(jax.random.PRNGKey(0), x, train=False)
  assert disc.apply(variables, x, train=False).shape == (2, 6, 6, 1)
  # Official NLayerDiscriminator(3, ndf=64, n_layers=3): convs 4x4, BN after layers 1..3.
  widths = [3, 64, 128, 256, 512, 1]
  expected = sum(16 * a * b for a, b in zip(widths[:-1], widths[1:])) + 64 + 1  # + 2 conv biases
  expected += 2 * (128 + 256 + 512)                                              # BN scale/bias
  assert sum(p.size for p in jax.tree.leaves(variables["params"])) == expected
  assert set(variables["batch_stats"]) == {"norm_1", "norm_2", "norm_3"}


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(4, 3, 3, 1)), rng.normal(size=(4, 3, 3, 1))
  np.testing.assert_allclose(gan.hinge_d_loss(real, fake),
                             0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()),
                             rtol=1e-6)
  softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
  np.testing.assert_allclose(gan.discriminator_loss(real, fake, "non_saturating"),
                             0.5 * (softplus(-real).mean() + softplus(fake).mean()), rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(fake, "hinge"), -fake.mean(), rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(fake, "non_saturating"), softplus(-fake).mean(),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="disc_loss='lsgan'"):
    gan.discriminator_loss(real, fake, "lsgan")


def test_adaptive_weight_clips_and_stops_gradient():
  a, b = jnp.full((3,), 2.0), jnp.full((3,), 1.0)
  np.testing.assert_allclose(gan.adaptive_weight(a, b), 2 * 3**0.5 / (3**0.5 + 1e-4), rtol=1e-6)
  assert float(gan.adaptive_weight(a, b * 0, max_weight=0.75)) == 0.75
  assert float(jax.grad(lambda s: gan.adaptive_weight(a * s, b))(1.0)) == 0.0
  np.testing.assert_array_equal(gan.adopt_weight(jnp.array([0, 4, 5]), 5), [0.0, 0.0, 1.0])


def tiny_model():
  cfg = default_model_config()
  cfg.update(dict(resolution=32, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                  attn_resolutions=(), z_channels=16, embed_dim=16, codebook_size=32, dec_ch=16,
                  dec_ch_mult=(1, 2, 2), dec_num_res_blocks=0, dec_attn_resolutions=(),
                  norm_groups=8))
  cfg.router.norm_groups = 8
  return build_dqvae(cfg), cfg


def test_last_layer_grad_equals_backprop_through_the_model():
  model, _ = tiny_model()
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  # Jitted throughout: op-by-op dispatch of a whole DQ-VAE costs ~4x the compile time.
  variables = jax.jit(lambda key: model.init({"params": key}, x, train=False))(
      jax.random.PRNGKey(1))

  def loss_of_params(params):
    out = model.apply({**variables, "params": params}, x, train=False)
    return jnp.mean(jnp.abs(out["xrec"] - x))

  full = jax.jit(jax.grad(loss_of_params))(variables["params"])["decoder"]["conv_out"]["kernel"]
  out, inter = jax.jit(lambda v: model.apply(v, x, train=False, mutable=["intermediates"]))(
      variables)
  h = inter["intermediates"]["decoder"]["last_layer_input"][0]
  dy = jax.grad(lambda y: jnp.mean(jnp.abs(y - x)))(out["xrec"])
  kernel = variables["params"]["decoder"]["conv_out"]["kernel"]
  np.testing.assert_allclose(last_layer_grad(h, kernel, dy), full, rtol=1e-4, atol=1e-7)


def gan_step(disc_start):
  model, cfg = tiny_model()
  loss_cfg = ml_collections.ConfigDict(dict(
      l1_weight=1.0, codebook_weight=1.0, budget_weight=1.0, budget_gamma=10.0,
      budget_calculate_all=True, perceptual_weight=0.0, disc_weight=0.75,
      disc_start=disc_start, disc_loss="hinge", adaptive_weight_max=1e4))
  optim = ml_collections.ConfigDict(dict(name="adam", lr=1e-3, b1=0.5, b2=0.9, warmup_steps=0))
  tx, schedule = make_optimizer(optim, 10)
  disc, disc_tx = PatchDiscriminator(ndf=8, num_layers=2), optax.adam(1e-3, b1=0.5, b2=0.9)
  state = jax.jit(make_init_fn(model, tx, 32, disc, disc_tx))(jax.random.PRNGKey(0))
  update = jax.jit(make_update_fn(model, tx, schedule, loss_cfg=loss_cfg, router_cfg=cfg.router,
                                  num_grains=2, discriminator=disc, disc_tx=disc_tx))
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 32, 32, 3), minval=-1, maxval=1)
  new, metrics = update(state, {"image": x}, {})
  return state, new, metrics


def test_gan_step_updates_discriminator_and_weights_generator_term():
  state, new, metrics = gan_step(disc_start=0)
  for key in ("loss_generator", "adaptive_weight", "disc_loss", "disc_logits_real",
              "disc_logits_fake"):
    assert np.isfinite(metrics[key]), key
  assert float(metrics["adaptive_weight"]) > 0
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                       state.disc_params, new.disc_params))
  assert max(moved) > 0
  assert jax.tree.structure(new.disc_batch_stats) == jax.tree.structure(state.disc_batch_stats)


def test_gan_is_off_before_disc_start():
  state, new, metrics = gan_step(disc_start=5)
  assert float(metrics["adaptive_weight"]) == 0.0
  for a, b in zip(jax.tree.leaves(state.disc_params), jax.tree.leaves(new.disc_params)):
    np.testing.assert_array_equal(a, b)
