"""Dynamic Grained Coding router: which granularity encodes each coarsest region.

Gates are one-hot over the last axis, index 0 = coarsest grain .. G-1 = finest, on the
coarsest grid [B, hc, wc, G]. Kinds: the learned feature router, the entropy router
(thresholds on patch entropy) and the fixed router (every region at one grain: a fixed-length
grid, the baseline the paper compares against).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq.models.encoder import grain_names
from dq.models.layers import Dtype, group_norm, upsample_nearest


ROUTER_NORMS = ("group", "layer", "none")
GATE_GRADIENTS = ("official", "both")


def needs_teacher(router_cfg: Any) -> bool:
  """True when the feature router has a teacher (a warm-up or an imitation loss)."""
  return router_cfg.kind == "feature" and (int(router_cfg.get("warmup_steps", 0)) > 0
                                           or int(router_cfg.get("distill_steps", 0)) != 0)


def needs_entropy_thresholds(router_cfg: Any) -> bool:
  """True when the feature router's teacher is the entropy router (a threshold table)."""
  return needs_teacher(router_cfg) and router_cfg.get("teacher", "entropy") == "entropy"


class FeatureRouter(nn.Module):
  """Gate logits from the encoder taps (coarsest first): norm, pool, concat, 2-layer MLP.

  Channels are concatenated as [coarse, (median,) pooled fine]; `gate_0` maps G*C -> G*C,
  SiLU, `gate_2` maps to G logits per coarse region.

  `norm` is how each tap is normalised before pooling: 'group' (the paper: GroupNorm with
  `norm_groups` groups, statistics over each image's positions, so the router sees every image
  relative to itself), 'layer' (LayerNorm over the channels of each position: no statistics
  across positions or images) or 'none'. The parameter names are the same for 'group' and
  'layer' (`feature_norm_<grain>/{scale,bias}`); 'none' has no norm parameters.
  """
  num_grains: int = 2
  num_channels: int = 256
  norm_groups: int = 32
  norm: str = "group"
  dtype: Dtype = jnp.float32

  def _normalize(self, name: str, tap: jax.Array) -> jax.Array:
    if self.norm == "group":
      return group_norm(self.norm_groups, self.dtype, f"feature_norm_{name}")(tap)
    if self.norm == "layer":
      return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, use_fast_variance=False,
                          name=f"feature_norm_{name}")(tap)
    if self.norm == "none":
      return tap
    raise ValueError(f"FeatureRouter norm must be one of {ROUTER_NORMS}; got {self.norm!r}")

  @nn.compact
  def __call__(self, taps: Sequence[jax.Array]) -> jax.Array:
    names = grain_names(self.num_grains)
    if len(taps) != self.num_grains:
      raise ValueError(f"FeatureRouter expects {self.num_grains} taps; got {len(taps)}")
    coarse_size = taps[0].shape[1]
    pooled = []
    for name, tap in zip(names, taps):
      if tap.shape[-1] != self.num_channels:
        raise ValueError(f"router tap '{name}' has {tap.shape[-1]} channels; expected "
                         f"num_channels={self.num_channels}")
      h = self._normalize(name, tap)
      factor = tap.shape[1] // coarse_size
      if factor > 1:
        h = nn.avg_pool(h, (factor, factor), strides=(factor, factor))
      pooled.append(h)  # [B, hc, wc, C]
    h = jnp.concatenate(pooled, axis=-1)  # [B, hc, wc, G*C]
    width = self.num_grains * self.num_channels
    h = nn.silu(nn.Dense(width, dtype=self.dtype, name="gate_0")(h))
    return nn.Dense(self.num_grains, dtype=self.dtype, name="gate_2")(h).astype(jnp.float32)


def hard_gate(logits: jax.Array) -> jax.Array:
  """One-hot of the argmax over the last axis (ties -> lowest index)."""
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


def gumbel_straight_through(logits: jax.Array, rng: jax.Array | None,
                            temperature: float | jax.Array = 1.0,
                            noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Hard Gumbel-softmax sample with straight-through gradients (torch's `gumbel_softmax(...,
  hard=True)`: `y_hard - sg(y_soft) + y_soft`).

  Args:
    logits: [..., G] gate logits.
    rng: PRNG key for the Gumbel noise (unused when `noise` is given).
    temperature: softmax temperature (> 0); a Python float or a traced scalar (schedules).
    noise: optional pre-drawn Gumbel noise with the logits' shape (e.g. an official run's
      recorded noise); None draws it from `rng`. Zero noise gives the argmax forward with the
      softmax's straight-through gradient.

  Returns:
    (hard, soft): `hard` is exactly one-hot in the forward pass and carries the gradient of
    `soft`, the Gumbel-softmax probabilities [..., G].
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"gumbel temperature must be > 0; got {temperature}")
  if noise is None:
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  elif noise.shape != logits.shape:
    raise ValueError(f"gumbel noise shape {noise.shape} must equal the logits' {logits.shape}")
  soft = jax.nn.softmax((logits.astype(jnp.float32) + noise) / temperature, axis=-1)
  hard = hard_gate(soft)
  # (soft - sg(soft)) is exactly zero in the forward pass, so `hard` stays exactly one-hot.
  return hard + (soft - jax.lax.stop_gradient(soft)), soft


def entropy_gate(entropy: jax.Array, thresholds: Sequence[float]) -> jax.Array:
  """One-hot gate [B, h, w, G] from region entropies [B, h, w].

  Dual (one threshold t): fine iff entropy > t. Triple (t_median, t_fine): fine iff
  entropy > t_fine, else median iff entropy > t_median, else coarse.
  """
  thresholds = tuple(float(t) for t in thresholds)
  if len(thresholds) == 1:
    grain = (entropy > thresholds[0]).astype(jnp.int32)
  elif len(thresholds) == 2:
    t_median, t_fine = thresholds
    if t_median > t_fine:
      raise ValueError(f"entropy thresholds must be (t_median, t_fine) with t_median <= t_fine; "
                       f"got {thresholds}")
    grain = jnp.where(entropy > t_fine, 2, jnp.where(entropy > t_median, 1, 0))
  else:
    raise ValueError(f"entropy thresholds must hold 1 (dual) or 2 (triple) values; got "
                     f"{thresholds}")
  return jax.nn.one_hot(grain, len(thresholds) + 1, dtype=jnp.float32)


def entropy_gate_logits(entropy: jax.Array, thresholds: Sequence[float]) -> jax.Array:
  """Signed margins [B, h, w, G] whose argmax (ties -> coarser) equals `entropy_gate`.

  Dual: [t - e, e - t]. Triple: [t_median - e, min(e - t_median, t_fine - e), e - t_fine].
  """
  if len(thresholds) == 1:
    margin = entropy - thresholds[0]
    return jnp.stack([-margin, margin], axis=-1)
  t_median, t_fine = thresholds
  return jnp.stack([t_median - entropy, jnp.minimum(entropy - t_median, t_fine - entropy),
                    entropy - t_fine], axis=-1)


def fixed_gate(shape: Sequence[int], grain: int, num_grains: int) -> jax.Array:
  """One-hot gate [B, h, w, G] that codes every region of a [B, h, w] grid at `grain`
  (0 coarsest .. G-1 finest): a fixed-length grid of the model's coarse or fine factor."""
  if not 0 <= grain < num_grains:
    raise ValueError(f"fixed gate grain must lie in [0, {num_grains - 1}]; got {grain}")
  if len(shape) != 3:
    raise ValueError(f"fixed gate shape must be [B, h, w]; got {tuple(shape)}")
  return jax.nn.one_hot(jnp.full(tuple(shape), grain, jnp.int32), num_grains, dtype=jnp.float32)


def merge_grains(taps: Sequence[jax.Array], gate: jax.Array,
                 gate_gradient: str = "both") -> jax.Array:
  """Per-region choice of a granularity's features, on the finest grid.

  Args:
    taps: G maps [B, h_g, w_g, C], coarsest first, each grid twice the previous one.
    gate: [B, hc, wc, G] one-hot gate (straight-through in training).
    gate_gradient: how the gate enters, which decides the gradient it receives (the forward
      value is `where(grain == g, tap_g)` either way for an exactly one-hot gate):
      'both': `sum_g gate_g * tap_g`: every grain's channel gets the gradient of switching to
        it (a first-order estimate of the loss change);
      'official': `where(grain == g, tap_g) * max_g(gate_g)` (the official
        `h * gate.max(dim=1)`): only the chosen grain's channel gets a gradient.

  Returns:
    [B, hf, wf, C], every map (and the gate) nearest-upsampled to the finest grid.
  """
  if len(taps) != gate.shape[-1]:
    raise ValueError(f"merge_grains got {len(taps)} taps for a gate with {gate.shape[-1]} grains")
  if gate_gradient not in GATE_GRADIENTS:
    raise ValueError(f"gate_gradient must be one of {GATE_GRADIENTS}; got {gate_gradient!r}")
  finest = taps[-1].shape[1]
  coarse = gate.shape[1]
  gate_fine = upsample_nearest(gate, finest // coarse).astype(taps[-1].dtype)  # [B, hf, wf, G]
  upsampled = [upsample_nearest(tap, finest // tap.shape[1]) for tap in taps]
  if gate_gradient == "official":
    grain = jnp.argmax(gate_fine, axis=-1)[..., None]  # [B, hf, wf, 1], no gradient
    merged = upsampled[0]
    for g, tap in enumerate(upsampled[1:], start=1):
      merged = jnp.where(grain == g, tap, merged)
    return merged * jnp.max(gate_fine, axis=-1, keepdims=True)
  merged = None
  for g, tap in enumerate(upsampled):
    term = gate_fine[..., g:g + 1] * tap
    merged = term if merged is None else merged + term
  return merged
