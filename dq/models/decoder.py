"""VQGAN-style decoder with 2-D position terms on its input (the official DecoderPositional).

Position terms are added to the latent map before `conv_in`: Fourier features
`sin(fourier_conv([x, y]))` of a [-1, 1] coordinate grid (channel 0 = x, varying along width)
and/or learned tables `row_embed[i] + col_embed[j]`. They tell the decoder where inside a
coarse region each repeated code sits.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq.models.layers import (AttnBlock, Dtype, MidBlock, ResnetBlock, Upsample, conv1x1,
                              conv3x3, group_norm, swish)

POSITION_TYPES = ("none", "learned", "fourier", "fourier+learned")


class UpLevel(nn.Module):
  """One decoder level: `block_i` ResnetBlocks (+ `attn_i`), then an optional `upsample`."""
  out_channels: int
  num_blocks: int
  use_attention: bool
  upsample: bool
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, self.norm_groups, self.dtype,
                      name=f"block_{i}")(x, train)
      if self.use_attention:
        x = AttnBlock(self.norm_groups, self.dtype, name=f"attn_{i}")(x)
    if self.upsample:
      x = Upsample(self.dtype, name="upsample")(x)
    return x


class Decoder(nn.Module):
  """Maps latents [B, L, L, in_channels] (L = resolution / 2^(len(ch_mult)-1)) to images."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (32,)
  in_channels: int = 256
  resolution: int = 256
  position_type: str = "fourier+learned"
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @property
  def latent_size(self) -> int:
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  def position_terms(self, dtype: Dtype) -> list[jax.Array]:
    """The configured position terms, each [L, L, in_channels] (Fourier first)."""
    if self.position_type not in POSITION_TYPES:
      raise ValueError(f"position_type must be one of {POSITION_TYPES}; got "
                       f"{self.position_type!r}")
    size = self.latent_size
    terms = []
    if "fourier" in self.position_type:
      axis = jnp.linspace(-1.0, 1.0, size, dtype=jnp.float32)
      rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
      coords = jnp.stack([cols, rows], axis=-1)[None]  # [1, L, L, 2], channel 0 = x
      terms.append(jnp.sin(conv1x1(self.in_channels, dtype, "fourier_conv")(coords))[0])
    if "learned" in self.position_type:
      init = nn.initializers.normal(1.0)
      row_embed = self.param("row_embed", init, (size, self.in_channels), jnp.float32)
      col_embed = self.param("col_embed", init, (size, self.in_channels), jnp.float32)
      terms.append((row_embed[:, None, :] + col_embed[None, :, :]).astype(dtype))  # [L, L, C]
    return terms

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    size = self.latent_size
    if z.shape[1:] != (size, size, self.in_channels):
      raise ValueError(f"decoder input shape {z.shape} must be [B, {size}, {size}, "
                       f"{self.in_channels}] (resolution {self.resolution}, ch_mult "
                       f"{tuple(self.ch_mult)}, in_channels {self.in_channels})")
    for term in self.position_terms(self.dtype):
      z = z + term
    num_levels = len(self.ch_mult)
    h = conv3x3(self.ch * self.ch_mult[-1], self.dtype, "conv_in")(z)
    h = MidBlock(self.dropout, self.norm_groups, self.dtype, name="mid")(h, train)
    current_res = size
    for level in reversed(range(num_levels)):
      h = UpLevel(self.ch * self.ch_mult[level], self.num_res_blocks + 1,
                  current_res in self.attn_resolutions, level != 0, self.dropout,
                  self.norm_groups, self.dtype, name=f"up_{level}")(h, train)
      if level != 0:
        current_res *= 2
    h = swish(group_norm(self.norm_groups, self.dtype, "norm_out")(h))
    # The last layer's input, for the adaptive GAN weight (collected only when
    # 'intermediates' is mutable).
    self.sow("intermediates", "last_layer_input", h)
    return conv3x3(self.out_ch, self.dtype, "conv_out")(h)  # [B, H, W, out_ch]
