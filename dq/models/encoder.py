"""Multi-grain VQGAN-style encoder: one conv trunk, one feature map per granularity.

Dual grain (`num_grains=2`) taps the last level (coarse, F=2^(L-1)) and the level before it
(fine, F=2^(L-2)); triple grain taps the last three levels. A tap is the output of its level's
ResBlocks (and attention) before that level's downsample. Each tap has its own middle
(`mid_<grain>`: Res, Attn, Res), `norm_out_<grain>`, SiLU and 3x3 `conv_out_<grain>`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq.models.layers import (AttnBlock, Downsample, Dtype, MidBlock, ResnetBlock, conv3x3,
                              group_norm, swish)


def grain_names(num_grains: int) -> tuple[str, ...]:
  """Names of the granularities, coarsest first ('coarse', ['median',] 'fine')."""
  if num_grains == 2:
    return ("coarse", "fine")
  if num_grains == 3:
    return ("coarse", "median", "fine")
  raise ValueError(f"num_grains must be 2 or 3; got {num_grains}")


class DownLevel(nn.Module):
  """One encoder level: `block_i` ResnetBlocks (each followed by `attn_i` if attended).

  Returns the level's features and, when `downsample`, their halved version (else the same).
  """
  out_channels: int
  num_res_blocks: int
  use_attention: bool
  downsample: bool
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    for i in range(self.num_res_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, self.norm_groups, self.dtype,
                      name=f"block_{i}")(x, train)
      if self.use_attention:
        x = AttnBlock(self.norm_groups, self.dtype, name=f"attn_{i}")(x)
    if not self.downsample:
      return x, x
    return x, Downsample(self.dtype, name="downsample")(x)


class MultiGrainEncoder(nn.Module):
  """Encodes [B, H, W, 3] images into `num_grains` maps [B, H/F_g, W/F_g, z], coarsest first."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  z_channels: int = 256
  resolution: int = 256
  num_grains: int = 2
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    names = grain_names(self.num_grains)
    num_levels = len(self.ch_mult)
    if num_levels < self.num_grains:
      raise ValueError(f"ch_mult {tuple(self.ch_mult)} has {num_levels} levels; "
                       f"{self.num_grains} grains need at least {self.num_grains}")
    tap_levels = [num_levels - 1 - g for g in range(self.num_grains)]  # coarsest first
    h = conv3x3(self.ch, self.dtype, "conv_in")(x)  # [B, H, W, ch]
    features = {}
    for level, mult in enumerate(self.ch_mult):
      current_res = self.resolution // 2 ** level
      features[level], h = DownLevel(
          self.ch * mult, self.num_res_blocks, current_res in self.attn_resolutions,
          level != num_levels - 1, self.dropout, self.norm_groups, self.dtype,
          name=f"down_{level}")(h, train)
    taps = []
    for name, level in zip(names, tap_levels):
      t = MidBlock(self.dropout, self.norm_groups, self.dtype, name=f"mid_{name}")(
          features[level], train)
      t = swish(group_norm(self.norm_groups, self.dtype, f"norm_out_{name}")(t))
      taps.append(conv3x3(self.z_channels, self.dtype, f"conv_out_{name}")(t))  # [B, h_g, w_g, z]
    return taps
