"""Parity with the official PyTorch DQ-VAE (fixture `official_dqvae_dual_64px.npz`).

The converted official weights run through our DQVAE in eval mode; every intermediate the
fixture records must match (floats to 1e-4, integers exactly).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.models.build import build_dqvae, default_model_config
from dq.models.dqvae import DQVAE, code_weight_mask
from dq.models.router import merge_grains
from dq.official.dqvae import convert_state_dict

ATOL = 1e-4


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def fixture_config(f):
  """Our model config from the fixture's recorded constructor arguments."""
  official = json.loads(str(f["config_json"]))
  enc, dec, quant = official["encoder"], official["decoder"], official["quantize"]
  cfg = default_model_config()
  cfg.update(dict(
      resolution=enc["resolution"], ch=enc["ch"], ch_mult=tuple(enc["ch_mult"]),
      num_res_blocks=enc["num_res_blocks"], attn_resolutions=tuple(enc["attn_resolutions"]),
      z_channels=enc["z_channels"], codebook_size=quant["codebook_size"],
      embed_dim=quant["codebook_dim"], beta=quant["commitment_beta"], ema_decay=quant["decay"],
      dec_ch=dec["ch"], dec_ch_mult=tuple(dec["ch_mult"]), dec_num_res_blocks=dec["num_res_blocks"],
      dec_attn_resolutions=tuple(dec["attn_resolutions"]), position_type=dec["position_type"]))
  assert dec["in_ch"] == enc["z_channels"] and dec["latent_size"] == 8
  return cfg


def intermediates(model: DQVAE, x):
  """Eval pass that also returns the encoder taps, merged map and quantizer input."""
  taps = model.encoder(x, False)
  gate, _, _ = model._route(x, taps, False)
  grain = jnp.argmax(gate, axis=-1)
  h_dual = merge_grains(taps, gate)
  z = model.quant_conv(h_dual)
  quant, _, _ = model.quantize(z, code_weight_mask(grain, 2, z.shape[1]), False)
  return {"h_coarse": taps[0], "h_fine": taps[1], "h_dual": h_dual, "z": z, "quant": quant,
          "quant_post": model.post_quant_conv(quant)}


@pytest.fixture(scope="module")
def official():
  from conftest import fixture_path

  return dict(np.load(fixture_path("official_dqvae_dual_64px.npz")))


@pytest.fixture(scope="module")
def converted(official):
  sd = {k[len("sd/"):]: v for k, v in official.items() if k.startswith("sd/")}
  params, codebook = convert_state_dict(sd)
  return {"params": params, "codebook": codebook}


def test_converted_tree_matches_model(official, converted):
  model = build_dqvae(fixture_config(official))
  x = nhwc(official["x"])
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
  expected = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)
  got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), converted)
  assert got == expected
  np.testing.assert_array_equal(converted["codebook"]["quantize"]["embedding"],
                                official["sd/quantize.codebook.weight"][:-1])


def test_eval_parity(official, converted):
  model = build_dqvae(fixture_config(official))
  x = nhwc(official["x"])
  with jax.default_matmul_precision("highest"):
    out = jax.jit(functools.partial(model.apply, train=False))(converted, x)
    mid = jax.jit(lambda v, x: model.apply(v, x, method=intermediates))(converted, x)
    codes, grain = jax.jit(functools.partial(model.apply, method="encode"))(converted, x)
    xrec = jax.jit(functools.partial(model.apply, method="decode"))(converted, codes, grain)

  np.testing.assert_allclose(out["gate_logits"], official["gate_logits"], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(out["grain"], official["grain"])
  for name in ("h_coarse", "h_fine", "h_dual", "z", "quant", "quant_post"):
    np.testing.assert_allclose(mid[name], nhwc(official[name]), atol=ATOL, rtol=0, err_msg=name)
  mask = code_weight_mask(out["grain"], 2, 8)
  np.testing.assert_array_equal(mask, official["codebook_mask"][:, 0])
  np.testing.assert_array_equal(out["codes"], official["codes"])
  np.testing.assert_array_equal(codes, official["codes"])
  np.testing.assert_array_equal(grain, official["grain"])
  looked_up = converted["codebook"]["quantize"]["embedding"][out["codes"]]
  np.testing.assert_allclose(looked_up, nhwc(official["quant"]), atol=1e-6, rtol=0)
  np.testing.assert_allclose(out["codebook_loss"], official["vq_loss"], atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(out["xrec"], nhwc(official["xrec"]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(xrec, nhwc(official["xrec"]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["fine_ratio"], (official["grain"] == 1).mean())


def test_entropy_router_parity(official, converted):
  """The entropy router on the fixture images reproduces the official `Entropy` map."""
  cfg = fixture_config(official)
  cfg.router.kind = "entropy"
  entropy = official["entropy"]
  threshold = float(np.median(entropy))
  model = build_dqvae(cfg, entropy_thresholds=(threshold,))
  params = {k: v for k, v in converted["params"].items() if k != "router"}
  variables = {"params": params, "codebook": converted["codebook"]}
  x = nhwc(official["x"])
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(out["entropy"], entropy, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(out["grain"], (entropy > threshold).astype(np.int32))
  assert 0 < int(np.asarray(out["grain"]).sum()) < out["grain"].size


def test_convert_rejects_unknown_tensor_names(official):
  sd = {k[len("sd/"):]: v for k, v in official.items() if k.startswith("sd/")}
  sd["decoder.conv_out.running_mean"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="running_mean"):
    convert_state_dict(sd)
  del sd["decoder.conv_out.running_mean"]
  del sd["quantize.codebook.weight"]
  with pytest.raises(ValueError, match="quantize.codebook.weight"):
    convert_state_dict(sd)


TORCH_MODULES = {("decoder", "fourier_conv"): "decoder.position_bias_fourier.lff.ffm.conv"}
TORCH_TABLES = {("decoder", "row_embed"): "decoder.position_bias_learned.row_embed.weight",
                ("decoder", "col_embed"): "decoder.position_bias_learned.col_embed.weight"}


def torch_entry(names, shape):
  """Official key and tensor shape for a Flax parameter path (the inverse of the converter)."""
  if tuple(names) in TORCH_TABLES:
    return TORCH_TABLES[tuple(names)], shape
  *modules, leaf = names
  prefix = TORCH_MODULES.get(tuple(modules))
  if prefix is None:
    if modules[0] == "router":
      modules = ["encoder"] + modules
    parts = []
    for m in modules:
      base, _, index = m.rpartition("_")
      in_mid = any(p.startswith("mid") for p in parts)  # mid blocks keep `block_1`, `attn_1`
      parts += [base, index] if index.isdigit() and not in_mid else [m]
    prefix = ".".join(parts)
  if leaf == "kernel":
    shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
  return prefix + (".bias" if leaf == "bias" else ".weight"), shape


def test_convert_triple_layout_and_skips_loss_keys():
  """A synthetic triple-grain state dict maps onto the triple DQVAE's parameter tree."""
  cfg = default_model_config()
  cfg.update(dict(resolution=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(4,), z_channels=32, num_grains=3, codebook_size=8,
                  embed_dim=32, dec_ch=32, dec_ch_mult=(1, 2), dec_num_res_blocks=1,
                  dec_attn_resolutions=()))
  model = build_dqvae(cfg)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))
  expected = {tuple(p.key for p in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])}
  sd = {"loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4), np.float32),
        "quantize.codebook.weight": np.zeros((9, 32), np.float32),
        "quantize.codebook.cluster_size_ema": np.zeros((8,), np.float32),
        "quantize.codebook.embed_ema": np.zeros((8, 32), np.float32)}
  for names, shape in expected.items():
    key, torch_shape = torch_entry(names, shape)
    sd[key] = np.zeros(torch_shape, np.float32)
  for key in ("encoder.mid_median.block_1.conv1.weight", "encoder.norm_out_median.weight",
              "encoder.conv_out_median.weight", "encoder.router.feature_norm_median.weight",
              "encoder.down.1.downsample.conv.weight", "encoder.down.3.attn.0.q.weight",
              "encoder.router.gate.0.weight", "decoder.up.1.upsample.conv.weight"):
    assert key in sd, key
  assert sd["encoder.router.gate.0.weight"].shape == (96, 96)
  params, codebook = convert_state_dict(sd)
  got = {tuple(p.key for p in path): leaf.shape
         for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert got == expected
  assert codebook["quantize"]["embedding"].shape == (8, 32)
