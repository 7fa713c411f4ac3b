"""Building blocks shared by the DQ-VAE encoder and decoder (NHWC, VQGAN style).

Submodule names follow the official PyTorch layers (`norm1`, `conv1`, `nin_shortcut`, `q`,
`proj_out`, ...) so checkpoints map onto them mechanically.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORM_EPS = 1e-6


def swish(x: jax.Array) -> jax.Array:
  """x * sigmoid(x) (the official `nonlinearity`)."""
  return x * jax.nn.sigmoid(x)


def group_norm(num_groups: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with the official eps 1e-6 and a two-pass (exact) variance."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, dtype=dtype,
                      use_fast_variance=False, name=name)


def conv3x3(features: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
  """3x3 convolution, stride 1, zero padding 1."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def conv1x1(features: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
  """1x1 convolution (a per-position linear map)."""
  return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of [B, H, W, ...] by an integer factor on H and W."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class ResnetBlock(nn.Module):
  """norm1-swish-conv1-norm2-swish-dropout-conv2 plus a (1x1 when widths differ) shortcut."""
  out_channels: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = swish(group_norm(self.norm_groups, self.dtype, "norm1")(x))
    h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
    h = swish(group_norm(self.norm_groups, self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv1x1(self.out_channels, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1 q/k/v/proj_out and a residual."""
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = group_norm(self.norm_groups, self.dtype, "norm")(x)
    q = conv1x1(channels, self.dtype, "q")(h).reshape(batch, height * width, channels)
    k = conv1x1(channels, self.dtype, "k")(h).reshape(batch, height * width, channels)
    v = conv1x1(channels, self.dtype, "v")(h).reshape(batch, height * width, channels)
    logits = jnp.einsum("bic,bjc->bij", q, k) * (channels ** -0.5)  # [B, HW, HW]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(batch, height, width, channels)
    return x + conv1x1(channels, self.dtype, "proj_out")(h)


class Downsample(nn.Module):
  """Pad right/bottom by one, then a 3x3 stride-2 VALID convolution (halves H and W)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                   name="conv")(x)


class Upsample(nn.Module):
  """Nearest x2 upsampling, then a 3x3 convolution."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv3x3(x.shape[-1], self.dtype, "conv")(upsample_nearest(x, 2))


class MidBlock(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at constant width (`block_1`, `attn_1`, `block_2`)."""
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.dropout, self.norm_groups, self.dtype, name="block_1")(x, train)
    x = AttnBlock(self.norm_groups, self.dtype, name="attn_1")(x)
    return ResnetBlock(channels, self.dropout, self.norm_groups, self.dtype,
                       name="block_2")(x, train)
