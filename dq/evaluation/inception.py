"""InceptionV3, the FID variant (TF `inception-2015-12-05`), in flax.linen, NHWC.

This is the network behind pytorch-fid, TTUR and ADM's evaluator: torchvision's InceptionV3
layout with the TF graph's quirks,
  - every conv is bias-free and followed by batch norm *without scale* (eps 1e-3, inference
    statistics) and ReLU;
  - the 3x3 average pools inside the Mixed blocks exclude the padding from the count;
  - the last block (`Mixed_7c`) pools its pool branch with a 3x3 *max* pool;
  - pool_3 is an 8x8 average pool of the 8x8x2048 map (so inputs must be 299..330 px); the
    optional `logits` layer maps the 2048 features to the graph's 1008 classes.
Every convolution and matmul runs at `Precision.HIGHEST`, whatever the global setting: TF32
convs move FID by ~0.15 and bf16 convs by ~3 points.

Input: `preprocess_for_inception(uint8 [B, H, W, 3])` -> [B, 299, 299, 3] in [-1, 1]
(x / 127.5 - 1, then bilinear resize without antialiasing, half-pixel centres), the
pytorch-fid convention. Parameters: `{name}/kernel` [kh, kw, in, out], `{name}/beta`,
`{name}/mean`, `{name}/var` [out] for each conv, `logits/kernel` [2048, 1008] and
`logits/bias` [1008]; names follow torchvision (`Conv2d_1a_3x3`, `Mixed_5b/branch1x1`, ...).
Weights: `dq.evaluation.inception_weights.load_inception_params`.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
BN_EPS = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
FINAL_MAP = 8  # pool_3 averages an 8x8 map; 299..330 px inputs give it
POOL_WINDOW = "window"  # TF graph: 8x8 average pool, needs the 8x8 final map
POOL_MEAN = "mean"  # spatial mean at any input size (pytorch-fid / jax-fid at native size)

Params = Mapping[str, Any]


class BasicConv(nn.Module):
  """Bias-free conv, batch norm without scale (inference statistics), ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)  # symmetric (rows, columns)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.he_normal(),
                        (*self.kernel_size, in_features, self.features), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
    pad_h, pad_w = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=((pad_h, pad_h), (pad_w, pad_w)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    scale = 1.0 / jnp.sqrt(var + BN_EPS)
    return nn.relu(y * scale + (beta - mean * scale))


def _avg_pool_3x3_exclude_pad(x: jnp.ndarray) -> jnp.ndarray:
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (35x35)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch1x1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (35 -> 17)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch3x3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (17x17)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c7 = self.channels_7x7
    row, col = (1, 7), (7, 1)  # kernel sizes; paddings (0, 3) and (3, 0)
    branch1x1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = BasicConv(c7, row, padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = BasicConv(192, col, padding=(3, 0), name="branch7x7_3")(branch7x7)
    dbl = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    dbl = BasicConv(c7, col, padding=(3, 0), name="branch7x7dbl_2")(dbl)
    dbl = BasicConv(c7, row, padding=(0, 3), name="branch7x7dbl_3")(dbl)
    dbl = BasicConv(c7, col, padding=(3, 0), name="branch7x7dbl_4")(dbl)
    dbl = BasicConv(192, row, padding=(0, 3), name="branch7x7dbl_5")(dbl)
    branch_pool = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (17 -> 8)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch3x3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 (8x8).

  `max_pool`: the pool branch uses a 3x3 max pool (Mixed_7c in the FID graph) instead of the
  padding-excluding 3x3 average pool (Mixed_7b).
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch1x1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3_a = BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3)
    branch3x3_b = BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)
    dbl = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    dbl = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
    dbl_a = BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl)
    dbl_b = BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_exclude_pad(x)
    branch_pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate(
        [branch1x1, branch3x3_a, branch3x3_b, dbl_a, dbl_b, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3: [B, H, W, 3] in [-1, 1] -> pool_3 features [B, 2048] (and logits).

  Attributes:
    include_logits: also return the 1008-way logits (needs weights that have them).
    pool: `"window"` (the TF graph: 8x8 average pool of the final map, which must be 8x8,
      i.e. 299..330 px inputs) or `"mean"` (spatial mean of the final map at any size >= 75 px;
      the convention of pytorch-fid/jax-fid tests run at native resolution).
  """
  include_logits: bool = False
  pool: str = POOL_WINDOW

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects [B, H, W, 3] images, got shape {x.shape}")
    if self.pool not in (POOL_WINDOW, POOL_MEAN):
      raise ValueError(f"pool must be {POOL_WINDOW!r} or {POOL_MEAN!r}, got {self.pool!r}")
    x = x.astype(jnp.float32)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
    x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)  # [B, 73, 73, 80]
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
    x = InceptionA(32, name="Mixed_5b")(x)  # [B, 35, 35, 256]
    x = InceptionA(64, name="Mixed_5c")(x)  # [B, 35, 35, 288]
    x = InceptionA(64, name="Mixed_5d")(x)  # [B, 35, 35, 288]
    x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)  # [B, 17, 17, 768]
    x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = InceptionE(name="Mixed_7b")(x)  # [B, 8, 8, 2048]
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    if self.pool == POOL_WINDOW and x.shape[1:3] != (FINAL_MAP, FINAL_MAP):
      raise ValueError(
          f"pool_3 averages an {FINAL_MAP}x{FINAL_MAP} map, but this input gives "
          f"{x.shape[1]}x{x.shape[2]}: resize images to {INPUT_SIZE}x{INPUT_SIZE} with "
          "preprocess_for_inception (or use pool='mean' for other sizes)")
    features = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    if not self.include_logits:
      return features
    logits = nn.Dense(NUM_LOGITS, precision=HIGHEST, name="logits")(features)  # [B, 1008]
    return features, logits


def preprocess_for_inception(images: jnp.ndarray, size: int | None = INPUT_SIZE) -> jnp.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, size, size, 3]: x / 127.5 - 1, then bilinear resize.

  The resize has no antialiasing and uses half-pixel centres, like PyTorch's
  `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`. `size=None` keeps
  the input size.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images (0..255), got dtype {images.dtype}; convert "
                     "floats in [-1, 1] with images_to_uint8 first")
  x = images.astype(jnp.float32) / 127.5 - 1.0
  batch = images.shape[0]
  if size is None or images.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (batch, size, size, 3), "bilinear", antialias=False,
                          precision=HIGHEST)


def images_to_uint8(images: jnp.ndarray) -> jnp.ndarray:
  """Float images in [-1, 1] -> uint8 0..255 (clipped, rounded to nearest)."""
  return jnp.round(jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("pool",))
def extract_features(params: Params, images: jnp.ndarray, pool: str = POOL_WINDOW
                     ) -> dict[str, jnp.ndarray]:
  """uint8 [B, H, W, 3] -> {"pool_3": [B, 2048]} plus "logits" [B, 1008] if `params` has them.

  With `pool="window"` images are resized to 299x299; with `pool="mean"` they keep their size.
  """
  include_logits = "logits" in params
  model = InceptionV3(include_logits=include_logits, pool=pool)
  x = preprocess_for_inception(images, INPUT_SIZE if pool == POOL_WINDOW else None)
  out = model.apply({"params": params}, x)
  if include_logits:
    return {"pool_3": out[0], "logits": out[1]}
  return {"pool_3": out}


def inception_param_shapes(include_logits: bool = False) -> dict[str, tuple[int, ...]]:
  """{`a/b/leaf`: shape} of the network's parameters (no computation)."""
  return dict(_param_shapes(include_logits))


@functools.lru_cache(maxsize=2)
def _param_shapes(include_logits: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
  model = InceptionV3(include_logits=include_logits)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return tuple((key, tuple(value.shape))
               for key, value in flatten_params(shapes["params"]).items())


def count_params(params: Params) -> int:
  """Total number of parameter values."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def flatten_params(params: Params) -> dict[str, Any]:
  """Nested parameter tree -> {`a/b/leaf`: array}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(entry.key) for entry in path)] = leaf
  return flat


def unflatten_params(flat: Mapping[str, Any], source: str = "Inception parameters") -> dict:
  """Checks `a/b/leaf` keys and shapes against the network and nests them as float32.

  The `logits/*` entries are optional (both or neither).
  """
  with_logits = any(key.startswith("logits/") for key in flat)
  expected = inception_param_shapes(include_logits=with_logits)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{source}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} "
                     "(expected the FID InceptionV3 layout of dq.evaluation.inception)")
  tree: dict = {}
  for key, shape in expected.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise ValueError(f"{source}: {key!r} has shape {value.shape}, expected {shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{source}: {key!r} has non-finite values")
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return tree


def random_inception_params(seed: int = 0, include_logits: bool = False) -> dict:
  """Random weights with sane activations (He-normal kernels, BN statistics near identity).

  Drawn with numpy: jax's generator would spend seconds compiling the 22M-value draw on CPU.
  """
  generator = np.random.default_rng(seed)
  flat = {}
  for key, shape in inception_param_shapes(include_logits).items():
    leaf = key.rsplit("/", 1)[-1]
    if key.startswith("logits/"):
      scale = 1.0 / np.sqrt(FEATURE_DIM) if leaf == "kernel" else 0.1
      flat[key] = scale * generator.standard_normal(shape)
    elif leaf == "kernel":
      flat[key] = generator.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3]))
    elif leaf == "var":
      flat[key] = generator.uniform(0.5, 1.5, shape)
    else:  # beta, mean
      flat[key] = 0.1 * generator.standard_normal(shape)
  return unflatten_params(flat)
