"""Router pieces: feature router vs numpy, Gumbel straight-through, entropy gates, merging,
the fixed router (fixed-length grids)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq.losses.vae_loss import vae_loss
from dq.models.build import build_dqvae, default_model_config
from dq.models.router import (FeatureRouter, entropy_gate, entropy_gate_logits, fixed_gate,
                              gumbel_straight_through, hard_gate, merge_grains)


def np_group_norm(x, groups, scale, bias, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  xg = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      xg.var(axis=(1, 2, 4), keepdims=True) + eps)
  return xg.reshape(x.shape) * scale + bias


def np_avg_pool(x, factor):
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


@pytest.mark.parametrize("num_grains", [2, 3])
def test_feature_router_matches_numpy(num_grains):
  channels, coarse = 8, 2
  rng = np.random.RandomState(num_grains)
  taps = [rng.randn(2, coarse * 2 ** g, coarse * 2 ** g, channels).astype(np.float32)
          for g in range(num_grains)]
  router = FeatureRouter(num_grains, channels, norm_groups=4)
  shapes = jax.eval_shape(router.init, jax.random.PRNGKey(0), taps)
  params = jax.tree_util.tree_map(lambda s: rng.randn(*s.shape).astype(np.float32) * 0.5,
                                  shapes)["params"]
  logits = jax.jit(router.apply)({"params": params}, taps)
  assert logits.shape == (2, coarse, coarse, num_grains)
  names = ["coarse", "median", "fine"] if num_grains == 3 else ["coarse", "fine"]
  pieces = []
  for g, (name, tap) in enumerate(zip(names, taps)):
    norm = params[f"feature_norm_{name}"]
    pieces.append(np_avg_pool(np_group_norm(tap.astype(np.float64), 4, norm["scale"],
                                            norm["bias"]), 2 ** g))
  h = np.concatenate(pieces, axis=-1)  # [coarse, (median,) fine] channel order
  h = h @ params["gate_0"]["kernel"] + params["gate_0"]["bias"]
  h = h / (1 + np.exp(-h))
  ref = h @ params["gate_2"]["kernel"] + params["gate_2"]["bias"]
  assert params["gate_0"]["kernel"].shape == (num_grains * channels, num_grains * channels)
  np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_hard_gate_ties_go_to_lowest_index():
  logits = jnp.asarray([[0.3, 0.3], [0.1, 0.2], [1.0, 1.0]])
  np.testing.assert_array_equal(hard_gate(logits), [[1, 0], [0, 1], [1, 0]])


def test_gumbel_straight_through_forward_and_gradient():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 3, 3, 3).astype(np.float32))
  rng = jax.random.PRNGKey(1)
  hard, soft = gumbel_straight_through(logits, rng, temperature=0.7)
  hard = np.asarray(hard)
  assert set(np.unique(hard)) <= {0.0, 1.0}
  np.testing.assert_array_equal(hard.sum(-1), 1.0)
  np.testing.assert_array_equal(hard.argmax(-1), np.asarray(soft).argmax(-1))
  noise = jax.random.gumbel(rng, logits.shape)
  np.testing.assert_allclose(soft, jax.nn.softmax((logits + noise) / 0.7), rtol=1e-6)
  weights = jnp.asarray(np.random.RandomState(2).randn(*logits.shape).astype(np.float32))
  grad_hard = jax.grad(lambda l: jnp.sum(gumbel_straight_through(l, rng, 0.7)[0] * weights))(
      logits)
  grad_soft = jax.grad(lambda l: jnp.sum(gumbel_straight_through(l, rng, 0.7)[1] * weights))(
      logits)
  np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-6)
  assert np.abs(np.asarray(grad_hard)).max() > 1e-3


def test_gumbel_rejects_non_positive_temperature():
  with pytest.raises(ValueError, match="temperature"):
    gumbel_straight_through(jnp.zeros((1, 2)), jax.random.PRNGKey(0), 0.0)


def test_entropy_gate_dual_and_triple():
  entropy = jnp.asarray([[[0.5, 1.0], [1.5, 2.5]]])
  dual = entropy_gate(entropy, (1.0,))
  np.testing.assert_array_equal(np.asarray(dual).argmax(-1), [[[0, 0], [1, 1]]])
  triple = entropy_gate(entropy, (1.0, 1.5))
  np.testing.assert_array_equal(np.asarray(triple).argmax(-1), [[[0, 0], [1, 2]]])
  np.testing.assert_array_equal(np.asarray(triple).sum(-1), 1.0)
  for thresholds, gate in [((1.0,), dual), ((1.0, 1.5), triple)]:
    logits = entropy_gate_logits(entropy, thresholds)
    np.testing.assert_array_equal(hard_gate(logits), gate)


def test_entropy_gate_logits_agree_on_random_values():
  entropy = jnp.asarray(np.random.RandomState(3).uniform(0, 3, (4, 5, 5)).astype(np.float32))
  entropy = entropy.at[0, 0, :2].set(jnp.asarray([1.0, 2.0]))  # exact ties with thresholds
  for thresholds in [(1.0,), (1.0, 2.0), (1.5, 1.5)]:
    np.testing.assert_array_equal(hard_gate(entropy_gate_logits(entropy, thresholds)),
                                  entropy_gate(entropy, thresholds))


def test_entropy_gate_rejects_bad_thresholds():
  with pytest.raises(ValueError, match="t_median <= t_fine"):
    entropy_gate(jnp.zeros((1, 2, 2)), (2.0, 1.0))
  with pytest.raises(ValueError, match="1 \\(dual\\) or 2"):
    entropy_gate(jnp.zeros((1, 2, 2)), ())


@pytest.mark.parametrize("num_grains", [2, 3])
def test_merge_grains_equals_where_and_passes_gate_gradients(num_grains):
  rng = np.random.RandomState(num_grains)
  taps = [jnp.asarray(rng.randn(2, 2 * 2 ** g, 2 * 2 ** g, 4).astype(np.float32))
          for g in range(num_grains)]
  grain = rng.randint(0, num_grains, (2, 2, 2))
  gate = jnp.asarray(np.eye(num_grains, dtype=np.float32)[grain])
  merged = np.asarray(merge_grains(taps, gate))
  fine = 2 * 2 ** (num_grains - 1)
  assert merged.shape == (2, fine, fine, 4)
  grain_fine = np.repeat(np.repeat(grain, fine // 2, 1), fine // 2, 2)
  expected = np.zeros_like(merged)
  for g, tap in enumerate(taps):
    factor = fine // tap.shape[1]
    up = np.repeat(np.repeat(np.asarray(tap), factor, 1), factor, 2)
    expected = np.where((grain_fine == g)[..., None], up, expected)
  np.testing.assert_array_equal(merged, expected)  # exact, not just close
  grad = jax.grad(lambda g: jnp.sum(merge_grains(taps, g) ** 2))(gate)
  assert np.all(np.abs(np.asarray(grad)) > 0)  # every grain's gate entry gets a gradient


def test_fixed_gate_is_one_hot_at_the_grain():
  for num_grains in (2, 3):
    for grain in range(num_grains):
      gate = np.asarray(fixed_gate((2, 3, 4), grain, num_grains))
      assert gate.shape == (2, 3, 4, num_grains)
      np.testing.assert_array_equal(gate.argmax(-1), np.full((2, 3, 4), grain))
      np.testing.assert_array_equal(gate.sum(-1), 1.0)
  with pytest.raises(ValueError, match="grain must lie in \\[0, 1\\]"):
    fixed_gate((1, 2, 2), 2, 2)
  with pytest.raises(ValueError, match="\\[B, h, w\\]"):
    fixed_gate((2, 2), 0, 2)


def _tiny_model_cfg(kind: str, fine_ratio: float, num_grains: int = 2, median_ratio: float = 0.0):
  cfg = default_model_config()
  cfg.update(dict(resolution=32, ch=8, ch_mult=(1, 2, 2) if num_grains == 2 else (1, 2, 2, 2),
                  num_res_blocks=1, attn_resolutions=(), z_channels=8, norm_groups=4,
                  codebook_size=16, embed_dim=8, dec_ch=8, dec_ch_mult=(1, 2),
                  dec_num_res_blocks=0, dec_attn_resolutions=(), num_grains=num_grains))
  cfg.router.update(dict(kind=kind, norm_groups=4, fine_ratio=fine_ratio,
                         median_ratio=median_ratio))
  return cfg


@pytest.mark.parametrize("fine_ratio,grain", [(0.0, 0), (1.0, 1)])
def test_fixed_router_dqvae_codes_a_fixed_grid(fine_ratio, grain):
  """All-coarse: each code repeats over its 2x2 fine cells; all-fine: one code per cell. Same
  layers as the feature-router model minus the router; no budget loss term."""
  model = build_dqvae(_tiny_model_cfg("fixed", fine_ratio))
  assert model.router_kind == "fixed" and model.fixed_grain == grain
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  variables = model.init({"params": jax.random.PRNGKey(0), "codebook": jax.random.PRNGKey(1)},
                         x, train=False)
  feature = build_dqvae(_tiny_model_cfg("feature", 0.5))
  feature_vars = jax.eval_shape(lambda: feature.init(
      {"params": jax.random.PRNGKey(0), "codebook": jax.random.PRNGKey(1)}, x, train=False))
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  expected = {k: v for k, v in shapes(feature_vars["params"]).items() if k != "router"}
  assert shapes(variables["params"]) == expected
  out, _ = model.apply(variables, x, train=True, mutable=["codebook"],
                       rngs={"codebook": jax.random.PRNGKey(2)})  # no gumbel rng needed
  np.testing.assert_array_equal(out["grain"], np.full((2, 8, 8), grain))  # factor 4 at 32 px
  np.testing.assert_allclose(float(out["fine_ratio"]), fine_ratio)
  codes, grain_map = model.apply(variables, x, method="encode")
  codes = np.asarray(codes)  # [2, 16, 16]
  np.testing.assert_array_equal(grain_map, np.full((2, 8, 8), grain))
  blocks = codes.reshape(2, 8, 2, 8, 2).transpose(0, 1, 3, 2, 4).reshape(2, 8, 8, 4)
  repeated = np.all(blocks == blocks[..., :1], axis=-1)  # [2, 8, 8]
  if grain == 0:
    assert repeated.all()
  else:
    assert not repeated.all()  # random inputs give distinct codes inside some region
  loss_cfg = ml_collections.ConfigDict(dict(l1_weight=1.0, codebook_weight=1.0,
                                            budget_weight=1.0, budget_gamma=10.0,
                                            budget_calculate_all=True))
  _, terms = vae_loss(x, out, loss_cfg=loss_cfg, router_cfg=_tiny_model_cfg(
      "fixed", fine_ratio).router, num_grains=2)
  assert "budget" not in terms


def test_fixed_router_triple_grain_and_bad_targets():
  assert build_dqvae(_tiny_model_cfg("fixed", 0.0, 3, median_ratio=1.0)).fixed_grain == 1
  assert build_dqvae(_tiny_model_cfg("fixed", 1.0, 3)).fixed_grain == 2
  assert build_dqvae(_tiny_model_cfg("fixed", 0.0, 3)).fixed_grain == 0
  with pytest.raises(ValueError, match="router.fine_ratio.*0.0 \\(every region coarse\\)"):
    build_dqvae(_tiny_model_cfg("fixed", 0.5))
  with pytest.raises(ValueError, match="router.fine_ratio.*\\(0, 1\\) fine"):
    build_dqvae(_tiny_model_cfg("fixed", 0.5, 3, median_ratio=0.5))
