"""DQ-VAE: multi-grain encoder -> router -> merge -> quantizer -> positional decoder.

Variables: 'params' (trained by the optimizer) and 'codebook' (EMA state of the quantizer).
Training call:
  out, state = model.apply(variables, x, train=True, mutable=['codebook'],
                           rngs={'gumbel': k1, 'codebook': k2, 'dropout': k3})
The feature router's training gate can be steered per call (all optional, traceable):
`gumbel_noise` (given noise instead of drawing it), `temperature` (a schedule's value),
`route_gate` + `use_route_gate` (route by another gate, e.g. the entropy router's during a
router warm-up; the router's logits are still computed and returned).
Parameter paths mirror the official PyTorch keys (`encoder/down_0/block_0/conv1`,
`router/gate_0`, `quant_conv`, `quantize`, `post_quant_conv`, `decoder/conv_out`, ...).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq.losses.budget import fine_ratio, grain_ratio
from dq.models.decoder import Decoder
from dq.models.encoder import MultiGrainEncoder
from dq.models.layers import Dtype, conv1x1, upsample_nearest
from dq.models.quantizer import EMAVectorQuantizer
from dq.models.router import (FeatureRouter, entropy_gate, entropy_gate_logits, fixed_gate,
                              gumbel_straight_through, hard_gate, merge_grains)

# 'fixed': every region at `fixed_grain` (a fixed-length grid; no router parameters).
ROUTER_KINDS = ("feature", "entropy", "fixed")
# The feature router's training gate: 'gumbel' (hard Gumbel-softmax sample, the paper) or
# 'argmax' (the argmax of the logits with the softmax's straight-through gradient: no noise).
TRAIN_GATES = ("gumbel", "argmax")
DECODER_LAST_LAYER = ("decoder", "conv_out", "kernel")


def decoder_last_layer(params: Any) -> jax.Array:
  """The decoder's last conv kernel (for the adaptive GAN weight) from DQVAE params."""
  node = params
  for key in DECODER_LAST_LAYER:
    node = node[key]
  return node


def code_weight_mask(grain: jax.Array, num_grains: int, fine_size: int) -> jax.Array:
  """Loss weight per fine-grid code [B, hf, wf]: 1 at finest-grain cells, 4^-k for a code
  repeated over 4^k cells (1/4 at F=16, 1/16 at F=32)."""
  grain_fine = upsample_nearest(grain, fine_size // grain.shape[1])  # [B, hf, wf]
  return jnp.power(4.0, (grain_fine - (num_grains - 1)).astype(jnp.float32))


class DQVAE(nn.Module):
  """Dynamic-quantization autoencoder (dual or triple grain, feature, entropy or fixed router).

  With `router_kind='fixed'` every region is coded at `fixed_grain` (0 coarsest .. G-1 finest):
  the same encoder, quantizer and decoder as a fixed-length VQ grid of that grain's factor.
  """
  resolution: int = 256
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  z_channels: int = 256
  dropout: float = 0.0
  num_grains: int = 2
  norm_groups: int = 32
  router_kind: str = "feature"
  router_norm_groups: int = 32
  router_norm: str = "group"
  gate_gradient: str = "both"
  train_gate: str = "gumbel"
  router_detach: bool = False
  entropy_thresholds: tuple = ()
  fixed_grain: int = 0
  gumbel_temperature: float = 1.0
  codebook_size: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  ema_decay: float = 0.99
  restart_unused_codes: bool = True
  dec_ch: int = 128
  dec_ch_mult: Sequence[int] = (1, 1, 2, 2)
  dec_num_res_blocks: int = 2
  dec_attn_resolutions: Sequence[int] = (32,)
  position_type: str = "fourier+learned"
  out_channels: int = 3
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.router_kind not in ROUTER_KINDS:
      raise ValueError(f"router_kind must be one of {ROUTER_KINDS}; got {self.router_kind!r}")
    if self.router_kind == "entropy" and len(self.entropy_thresholds) != self.num_grains - 1:
      raise ValueError(f"entropy router with {self.num_grains} grains needs "
                       f"{self.num_grains - 1} entropy_thresholds; got {self.entropy_thresholds}")
    if self.router_kind == "fixed" and not 0 <= self.fixed_grain < self.num_grains:
      raise ValueError(f"fixed router: fixed_grain must lie in [0, {self.num_grains - 1}] (0 "
                       f"coarsest); got {self.fixed_grain}")
    self.encoder = MultiGrainEncoder(
        self.ch, tuple(self.ch_mult), self.num_res_blocks, tuple(self.attn_resolutions),
        self.z_channels, self.resolution, self.num_grains, self.dropout, self.norm_groups,
        self.dtype)
    if self.train_gate not in TRAIN_GATES:
      raise ValueError(f"train_gate must be one of {TRAIN_GATES}; got {self.train_gate!r}")
    if self.router_kind == "feature":
      self.router = FeatureRouter(self.num_grains, self.z_channels, self.router_norm_groups,
                                  self.router_norm, self.dtype)
    self.quant_conv = conv1x1(self.embed_dim, self.dtype)
    self.quantize = EMAVectorQuantizer(
        self.codebook_size, self.embed_dim, self.beta, self.ema_decay,
        restart_unused_codes=self.restart_unused_codes)
    self.post_quant_conv = conv1x1(self.z_channels, self.dtype)
    self.decoder = Decoder(
        self.dec_ch, self.out_channels, tuple(self.dec_ch_mult), self.dec_num_res_blocks,
        tuple(self.dec_attn_resolutions), self.z_channels, self.resolution, self.position_type,
        self.dropout, self.norm_groups, self.dtype)

  def _check_images(self, x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[1:] != (self.resolution, self.resolution, 3):
      raise ValueError(f"DQVAE expects images [B, {self.resolution}, {self.resolution}, 3] in "
                       f"[-1, 1]; got shape {x.shape}")

  def _route(self, x: jax.Array, taps: list[jax.Array], train: bool,
             steer: dict | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Returns (gate [B, hc, wc, G], gate_logits [B, hc, wc, G], extra outputs).

    `steer` (feature router, training only): optional `gumbel_noise`, `temperature`,
    `route_gate` and `use_route_gate` (see the module docstring).
    """
    if self.router_kind == "fixed":
      coarse = taps[0].shape[:3]  # [B, hc, wc]
      gate = fixed_gate(coarse, self.fixed_grain, self.num_grains)
      return gate, gate, {}
    if self.router_kind == "entropy":
      from dq.models.entropy import patch_entropy  # Deferred: optional router dependency.

      entropy = patch_entropy(x, x.shape[1] // taps[0].shape[1])  # [B, hc, wc]
      return (entropy_gate(entropy, self.entropy_thresholds),
              entropy_gate_logits(entropy, self.entropy_thresholds), {"entropy": entropy})
    # router_detach: the router reads the taps but sends no gradient into the encoder.
    logits = self.router([jax.lax.stop_gradient(t) for t in taps] if self.router_detach
                         else taps)  # [B, hc, wc, G]
    if not train:
      return hard_gate(logits), logits, {}
    steer = steer or {}
    temperature = steer.get("temperature")
    if temperature is None:
      temperature = self.gumbel_temperature
    noise = steer.get("gumbel_noise")
    if noise is None and self.train_gate == "argmax":
      noise = jnp.zeros(logits.shape, jnp.float32)
    if noise is None and not self.has_rng("gumbel"):
      raise ValueError("DQVAE with the feature router needs a 'gumbel' rng in training: "
                       "apply(..., train=True, rngs={'gumbel': key, ...})")
    rng = self.make_rng("gumbel") if noise is None else None
    gate, _ = gumbel_straight_through(logits, rng, temperature, noise)
    route_gate = steer.get("route_gate")
    if route_gate is not None:
      if route_gate.shape != gate.shape:
        raise ValueError(f"route_gate shape {route_gate.shape} must equal the gate's {gate.shape}")
      use = jnp.asarray(steer.get("use_route_gate", True))
      gate = jnp.where(use, jax.lax.stop_gradient(route_gate).astype(gate.dtype), gate)
    return gate, logits, {}

  def __call__(self, x: jax.Array, train: bool = False, *,
               gumbel_noise: jax.Array | None = None, temperature: jax.Array | None = None,
               route_gate: jax.Array | None = None,
               use_route_gate: jax.Array | None = None) -> dict[str, jax.Array]:
    """Full pass on images x [B, H, W, 3] in [-1, 1]; see the module docstring for rngs and
    the router-steering arguments (feature router in training; ignored otherwise)."""
    self._check_images(x)
    taps = self.encoder(x, train)  # coarsest first, [B, h_g, w_g, z]
    steer = {"gumbel_noise": gumbel_noise, "temperature": temperature,
             "route_gate": route_gate, "use_route_gate": use_route_gate}
    gate, gate_logits, extra = self._route(x, taps, train, steer)
    grain = jnp.argmax(gate, axis=-1).astype(jnp.int32)  # [B, hc, wc]
    z = self.quant_conv(merge_grains(taps, gate, self.gate_gradient))  # [B, hf, wf, D]
    mask = code_weight_mask(grain, self.num_grains, z.shape[1])
    quant, codes, aux = self.quantize(z, mask, train)
    xrec = self.decoder(self.post_quant_conv(quant), train)
    outputs = {
        "xrec": xrec.astype(jnp.float32),
        "codes": codes,
        "grain": grain,
        "gate": gate,
        "gate_logits": gate_logits,
        "fine_ratio": fine_ratio(gate),
        **aux,
        **extra,
    }
    if self.num_grains == 3:
      outputs["median_ratio"] = grain_ratio(gate, 1)
    return outputs

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] -> (codes int32 [B, hf, wf], grain int32 [B, hc, wc])."""
    self._check_images(x)
    taps = self.encoder(x, False)
    gate, _, _ = self._route(x, taps, False)
    grain = jnp.argmax(gate, axis=-1).astype(jnp.int32)
    z = self.quant_conv(merge_grains(taps, gate))
    _, codes, _ = self.quantize(z, code_weight_mask(grain, self.num_grains, z.shape[1]), False)
    return codes, grain

  def decode(self, codes: jax.Array, grain: jax.Array | None = None) -> jax.Array:
    """Codes [B, hf, wf] -> images [B, H, W, 3]. The decoder does not use `grain`: coarse
    codes are already repeated over their region in `codes`."""
    if codes.ndim != 3:
      raise ValueError(f"decode expects codes [B, hf, wf]; got shape {codes.shape}")
    if grain is not None and (grain.ndim != 3 or grain.shape[0] != codes.shape[0]):
      raise ValueError(f"decode expects grain [B, hc, wc] matching codes {codes.shape}; got "
                       f"{grain.shape}")
    quant = self.quantize.lookup(codes)  # [B, hf, wf, D]
    return self.decoder(self.post_quant_conv(quant), False).astype(jnp.float32)

  def reconstruct(self, x: jax.Array) -> jax.Array:
    """Eval-mode reconstruction of images [B, H, W, 3]."""
    return self(x, train=False)["xrec"]
