"""DQVAE wiring: shapes (dual/triple, two resolutions), training mode, gradients, encode/decode,
the entropy router and the config builder."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq.models.build import build_dqvae, default_model_config
from dq.models.dqvae import DQVAE, code_weight_mask, decoder_last_layer
from dq.models.router import entropy_gate

KEY = jax.random.PRNGKey(0)


def tiny_config(num_grains=2, resolution=32, **overrides):
  cfg = default_model_config()
  cfg.update(dict(resolution=resolution, ch=16, num_res_blocks=1, z_channels=8, norm_groups=8,
                  codebook_size=32, embed_dim=8, dec_ch=16, dec_ch_mult=(1, 2),
                  dec_num_res_blocks=1))
  cfg.router.norm_groups = 8
  if num_grains == 2:
    cfg.update(dict(ch_mult=(1, 1, 2), attn_resolutions=(resolution // 4,),
                    dec_attn_resolutions=(resolution // 2,)))
  else:
    cfg.update(dict(num_grains=3, ch_mult=(1, 1, 2, 2), attn_resolutions=(resolution // 8,),
                    dec_attn_resolutions=()))
  cfg.update(overrides)
  return cfg


def random_variables(model, x, seed=0):
  """Deterministic variables without compiling `init` (fast on CPU): fan-in scaled kernels,
  GroupNorm scale ~1, small biases, a self-consistent codebook."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * rng.randn(*leaf.shape)
    else:
      value = 0.1 * rng.randn(*leaf.shape)
    return jnp.asarray(value, jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
  codebook = shapes["codebook"]["quantize"]
  embedding = jnp.asarray(rng.randn(*codebook["embedding"].shape), jnp.float32)
  return {"params": params, "codebook": {"quantize": {
      "embedding": embedding, "embed_sum": embedding,
      "cluster_size": jnp.ones(codebook["cluster_size"].shape, jnp.float32)}}}


def images(batch, resolution, seed=0):
  rng = np.random.RandomState(seed)
  return jnp.asarray(np.tanh(rng.randn(batch, resolution, resolution, 3)).astype(np.float32))


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("num_grains", [2, 3])
def test_output_shapes(num_grains, resolution):
  model = build_dqvae(tiny_config(num_grains, resolution))
  x = images(2, resolution)
  out, variables = jax.eval_shape(lambda: model.init_with_output(KEY, x))
  hc = resolution // 2 ** (len(model.ch_mult) - 1)
  hf = hc * 2 ** (num_grains - 1)
  assert out["xrec"].shape == x.shape
  assert out["codes"].shape == (2, hf, hf) and out["codes"].dtype == jnp.int32
  assert out["grain"].shape == (2, hc, hc) and out["grain"].dtype == jnp.int32
  assert out["gate"].shape == out["gate_logits"].shape == (2, hc, hc, num_grains)
  for name in ("codebook_loss", "fine_ratio", "perplexity", "usage", "dead_fraction"):
    assert out[name].shape == ()
  assert ("median_ratio" in out) == (num_grains == 3)
  assert set(variables) == {"params", "codebook"}
  assert set(variables["params"]) == {"encoder", "router", "quant_conv", "post_quant_conv",
                                      "decoder"}
  assert variables["codebook"]["quantize"]["embedding"].shape == (32, 8)
  assert decoder_last_layer(variables["params"]).shape == (3, 3, 16, 3)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = build_dqvae(tiny_config(2, 32, dtype="bfloat16"))
  assert model.dtype == jnp.bfloat16
  out, variables = jax.eval_shape(lambda: model.init_with_output(KEY, images(1, 32)))
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert out["xrec"].dtype == jnp.float32 and out["codebook_loss"].dtype == jnp.float32


def test_code_weight_mask():
  grain = jnp.asarray([[[0, 1], [2, 1]]])
  mask = np.asarray(code_weight_mask(grain, 3, 8))
  assert mask.shape == (1, 8, 8)
  np.testing.assert_array_equal(mask[0, ::4, ::4], [[1 / 16, 1 / 4], [1.0, 1 / 4]])
  np.testing.assert_array_equal(mask[0, :4, :4], np.full((4, 4), 1 / 16))
  dual = np.asarray(code_weight_mask(jnp.asarray([[[0, 1]]]), 2, 2))
  np.testing.assert_array_equal(dual, [[[0.25, 0.25, 1.0, 1.0]] * 2])


@pytest.fixture(scope="module")
def dual_model():
  model = build_dqvae(tiny_config(2, 16, ch_mult=(1, 2), attn_resolutions=(8,), dec_ch_mult=(1,),
                                  dec_attn_resolutions=(16,)))
  x = images(4, 16, seed=1)
  return model, random_variables(model, x), x


def test_train_step_gate_codebook_and_router_gradient(dual_model):
  model, variables, x = dual_model
  rngs = {"gumbel": jax.random.PRNGKey(1), "codebook": jax.random.PRNGKey(2)}

  def loss_fn(params, rngs):
    out, state = model.apply({"params": params, "codebook": variables["codebook"]}, x,
                             train=True, mutable=["codebook"], rngs=rngs)
    return jnp.mean(jnp.abs(out["xrec"] - x)) + out["codebook_loss"], (out, state)

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, (out, state) = grad_fn(variables["params"], rngs)
  gate = np.asarray(out["gate"])
  assert set(np.unique(gate)) <= {0.0, 1.0}
  np.testing.assert_array_equal(gate.sum(-1), 1.0)
  np.testing.assert_array_equal(gate.argmax(-1), out["grain"])
  for layer in ("gate_0", "gate_2"):
    assert np.abs(np.asarray(grads["router"][layer]["kernel"])).max() > 0, layer
  assert np.abs(np.asarray(decoder_last_layer(grads))).max() > 0
  old, new = variables["codebook"]["quantize"], state["codebook"]["quantize"]
  assert np.abs(np.asarray(new["cluster_size"] - old["cluster_size"])).max() > 0
  assert np.isfinite(float(out["codebook_loss"]))
  # Gumbel noise differs between rng keys: the hard gates of two draws are not all equal.
  rngs["gumbel"] = jax.random.PRNGKey(5)
  _, (out2, _) = grad_fn(variables["params"], rngs)
  assert np.any(np.asarray(out2["grain"]) != np.asarray(out["grain"]))


def test_train_needs_gumbel_rng(dual_model):
  model, variables, x = dual_model
  with pytest.raises(ValueError, match="'gumbel' rng"):
    jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=["codebook"],
                                       rngs={"codebook": KEY}))


def test_eval_encode_decode_round_trip(dual_model):
  model, variables, x = dual_model
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  codes, grain = jax.jit(functools.partial(model.apply, method="encode"))(variables, x)
  np.testing.assert_array_equal(codes, out["codes"])
  np.testing.assert_array_equal(grain, out["grain"])
  np.testing.assert_array_equal(out["gate"], jax.nn.one_hot(out["grain"], 2))
  xrec = jax.jit(functools.partial(model.apply, method="decode"))(variables, codes, grain)
  np.testing.assert_allclose(xrec, out["xrec"], atol=1e-5)
  # Coarse regions carry one code repeated over their 2x2 cells.
  batch, hc = grain.shape[:2]
  assert codes.shape == (batch, 2 * hc, 2 * hc)
  blocks = np.asarray(codes).reshape(batch, hc, 2, hc, 2).transpose(0, 1, 3, 2, 4)
  coarse_blocks = blocks.reshape(batch, hc, hc, 4)[np.asarray(grain) == 0]
  assert len(coarse_blocks) and np.all(coarse_blocks == coarse_blocks[:, :1])


def test_triple_train_mode_runs():
  model = build_dqvae(tiny_config(3, 16, restart_unused_codes=False))
  x = images(2, 16, seed=3)
  variables = random_variables(model, x, seed=1)
  out, state = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["codebook"],
                                             rngs={"gumbel": KEY}))(variables)
  gate = np.asarray(out["gate"])
  assert gate.shape == (2, 2, 2, 3)
  assert out["codes"].shape == (2, 8, 8)
  np.testing.assert_array_equal(gate.sum(-1), 1.0)
  np.testing.assert_allclose(out["median_ratio"], gate[..., 1].mean())
  np.testing.assert_allclose(out["fine_ratio"], gate[..., 2].mean())
  assert np.isfinite(np.asarray(out["xrec"])).all()


def test_entropy_router_follows_patch_entropy():
  from dq.models.entropy import patch_entropy

  cfg = tiny_config(2, 16)
  cfg.router.kind = "entropy"
  x = images(2, 16, seed=4).at[0, :8, :8].set(0.2)  # flat 4x4-pixel regions, entropy 0
  entropy = np.asarray(patch_entropy(x, 4))  # coarse grain: F = 4
  threshold = float(np.median(entropy))
  model = build_dqvae(cfg, entropy_thresholds=(threshold,))
  variables = random_variables(model, x)
  assert "router" not in variables["params"]
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(out["entropy"], entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["grain"], (entropy > threshold).astype(np.int32))
  np.testing.assert_array_equal(out["gate"], entropy_gate(entropy, (threshold,)))
  np.testing.assert_array_equal(np.asarray(out["gate_logits"]).argmax(-1), out["grain"])
  assert np.all(np.asarray(out["grain"])[0, :2, :2] == 0)


def test_default_config_builds_official_model():
  model = build_dqvae(default_model_config())
  assert isinstance(model, DQVAE)
  assert (model.resolution, model.ch_mult, model.z_channels, model.codebook_size) == (
      256, (1, 1, 2, 2, 4), 256, 1024)
  assert model.router_kind == "feature" and model.entropy_thresholds == ()


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 40, "resolution"),
    ("ch_mult", (1,), "ch_mult"),
    ("num_grains", 4, "num_grains"),
    ("dec_ch_mult", (1, 2), "dec_ch_mult"),
    ("router.kind", "random", "router.kind"),
    ("router.kind", "entropy", "entropy_thresholds"),
    ("position_type", "sinusoid", "position_type"),
    ("dtype", "float64", "dtype"),
    ("ch", 20, "norm_groups"),
])
def test_build_rejects_bad_config(field, value, message):
  cfg = default_model_config()
  target = cfg
  *parents, leaf = field.split(".")
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    build_dqvae(cfg)


def test_build_entropy_threshold_count():
  cfg = default_model_config()
  cfg.router.kind = "entropy"
  with pytest.raises(ValueError, match="need 1 thresholds"):
    build_dqvae(cfg, entropy_thresholds=(1.0, 2.0))
  assert build_dqvae(cfg, entropy_thresholds=(1.5,)).entropy_thresholds == (1.5,)
  assert isinstance(default_model_config(), ml_collections.ConfigDict)
