"""Layers, encoder and decoder: values against numpy references, shapes, parameter layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.models.decoder import Decoder
from dq.models.encoder import MultiGrainEncoder
from dq.models.layers import (AttnBlock, Downsample, ResnetBlock, Upsample, group_norm,
                              upsample_nearest)


KEY = jax.random.PRNGKey(0)


def np_conv(x, kernel, bias, stride=1, pad=((0, 0), (0, 0))):
  """Reference NHWC cross-correlation; kernel [kh, kw, in, out]."""
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
  return out + bias


def np_group_norm(x, groups, scale, bias, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def randomize(variables, seed):
  """Replace every leaf by N(0, 0.5) noise so norms/biases are not trivially 1/0."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(0.5 * rng.randn(*leaf.shape), leaf.dtype), variables)


def test_group_norm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 4, 4, 16).astype(np.float32) * 3 + 1
  norm = group_norm(8, jnp.float32)
  v = randomize(jax.eval_shape(norm.init, KEY, x), 1)
  p = v["params"]
  ref = np_group_norm(x.astype(np.float64), 8, np.asarray(p["scale"]), np.asarray(p["bias"]))
  np.testing.assert_allclose(norm.apply(v, x), ref, atol=2e-5)


def test_downsample_pads_right_bottom_and_strides():
  x = np.random.RandomState(1).randn(2, 6, 6, 4).astype(np.float32)
  layer = Downsample()
  v = randomize(jax.eval_shape(layer.init, KEY, x), 2)
  p = v["params"]["conv"]
  out = jax.jit(layer.apply)(v, x)
  assert out.shape == (2, 3, 3, 4)
  ref = np_conv(x, np.asarray(p["kernel"]), np.asarray(p["bias"]), stride=2, pad=((0, 1), (0, 1)))
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_upsample_is_nearest_then_conv():
  x = np.random.RandomState(2).randn(1, 3, 3, 4).astype(np.float32)
  layer = Upsample()
  identity = np.zeros((3, 3, 4, 4), np.float32)
  identity[1, 1] = np.eye(4)
  v = {"params": {"conv": {"kernel": jnp.asarray(identity), "bias": jnp.zeros(4)}}}
  out = np.asarray(layer.apply(v, x))
  np.testing.assert_array_equal(out, x.repeat(2, axis=1).repeat(2, axis=2))
  np.testing.assert_array_equal(upsample_nearest(x, 2), out)


def test_attention_matches_numpy():
  x = np.random.RandomState(3).randn(2, 3, 3, 8).astype(np.float32)
  layer = AttnBlock(norm_groups=4)
  v = randomize(jax.eval_shape(layer.init, KEY, x), 3)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  h = np_group_norm(x.astype(np.float64), 4, p["norm"]["scale"], p["norm"]["bias"])
  q, k, val = (np_conv(h, p[n]["kernel"], p[n]["bias"]).reshape(2, 9, 8) for n in "qkv")
  w = np.einsum("bic,bjc->bij", q, k) / np.sqrt(8)
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = np.einsum("bij,bjc->bic", w, val).reshape(2, 3, 3, 8)
  ref = x + np_conv(h, p["proj_out"]["kernel"], p["proj_out"]["bias"])
  np.testing.assert_allclose(jax.jit(layer.apply)(v, x), ref, atol=1e-4)


def test_resnet_block_shortcut_and_values():
  x = np.random.RandomState(4).randn(1, 4, 4, 8).astype(np.float32)
  same = ResnetBlock(8, norm_groups=4)
  wider = ResnetBlock(16, norm_groups=4)
  assert "nin_shortcut" not in jax.eval_shape(same.init, KEY, x)["params"]
  v = randomize(jax.eval_shape(wider.init, KEY, x), 4)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  assert p["nin_shortcut"]["kernel"].shape == (1, 1, 8, 16)
  swish = lambda a: a / (1 + np.exp(-a))
  pad = ((1, 1), (1, 1))
  h = swish(np_group_norm(x.astype(np.float64), 4, p["norm1"]["scale"], p["norm1"]["bias"]))
  h = np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], pad=pad)
  h = swish(np_group_norm(h, 4, p["norm2"]["scale"], p["norm2"]["bias"]))
  h = np_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"], pad=pad)
  ref = np_conv(x, p["nin_shortcut"]["kernel"], p["nin_shortcut"]["bias"]) + h
  np.testing.assert_allclose(jax.jit(wider.apply)(v, x), ref, atol=1e-4)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("num_grains,ch_mult", [(2, (1, 2, 2)), (3, (1, 1, 2, 2))])
def test_encoder_tap_shapes(resolution, num_grains, ch_mult):
  encoder = MultiGrainEncoder(ch=16, ch_mult=ch_mult, num_res_blocks=1,
                              attn_resolutions=(resolution // 4,), z_channels=8,
                              resolution=resolution, num_grains=num_grains, norm_groups=8)
  x = jnp.zeros((2, resolution, resolution, 3))
  taps, variables = jax.eval_shape(
      lambda: encoder.init_with_output(jax.random.PRNGKey(0), x))
  levels = len(ch_mult)
  expected = [resolution // 2 ** (levels - 1 - g) for g in range(num_grains)]
  assert [t.shape for t in taps] == [(2, s, s, 8) for s in expected]
  params = variables["params"]
  names = ["coarse", "median", "fine"] if num_grains == 3 else ["coarse", "fine"]
  for name in names:
    assert {f"mid_{name}", f"norm_out_{name}", f"conv_out_{name}"} <= set(params)
  assert "downsample" not in params[f"down_{levels - 1}"]
  assert "downsample" in params[f"down_{levels - 2}"]
  attended = 2  # the level at resolution // 4
  assert "attn_0" in params[f"down_{attended}"]


@pytest.mark.parametrize("position_type,expected", [
    ("none", set()), ("learned", {"row_embed", "col_embed"}),
    ("fourier", {"fourier_conv"}), ("fourier+learned", {"fourier_conv", "row_embed", "col_embed"})])
def test_decoder_shapes_and_position_params(position_type, expected):
  decoder = Decoder(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                    in_channels=8, resolution=32, position_type=position_type, norm_groups=8)
  z = jnp.zeros((2, 8, 8, 8))
  out, variables = jax.eval_shape(lambda: decoder.init_with_output(jax.random.PRNGKey(0), z))
  assert out.shape == (2, 32, 32, 3)
  params = variables["params"]
  assert {"fourier_conv", "row_embed", "col_embed"} & set(params) == expected
  assert set(params["up_2"]) == {"block_0", "block_1", "attn_0", "attn_1", "upsample"}
  assert set(params["up_0"]) == {"block_0", "block_1"}


def test_decoder_position_terms_move_the_output():
  decoder = Decoder(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=8,
                    resolution=16, position_type="learned", norm_groups=8)
  z = jnp.ones((1, 8, 8, 8))
  v = randomize(jax.eval_shape(decoder.init, KEY, z), 5)
  apply = jax.jit(decoder.apply)
  out = apply(v, z)
  zero_pos = {"params": dict(v["params"])}
  zero_pos["params"]["row_embed"] = jnp.zeros_like(v["params"]["row_embed"])
  zero_pos["params"]["col_embed"] = jnp.zeros_like(v["params"]["col_embed"])
  shifted = dict(zero_pos["params"])
  # Adding a constant c to row_embed equals adding c to the input everywhere.
  shifted["row_embed"] = jnp.full_like(v["params"]["row_embed"], 0.5)
  np.testing.assert_allclose(apply({"params": shifted}, z), apply(zero_pos, z + 0.5), atol=1e-5)
  assert np.abs(np.asarray(out - apply(zero_pos, z))).max() > 1e-3


def test_decoder_rejects_wrong_latent_shape():
  decoder = Decoder(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=8,
                    resolution=16, norm_groups=8)
  with pytest.raises(ValueError, match="decoder input shape"):
    decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))
