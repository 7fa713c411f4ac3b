"""Stacked position/content GPT (the official `StackGPT`), in flax.linen.

Inputs mirror the official Dualformer assembly: a coarse part (sos, coarse tokens, eos, pads)
of length Lc and a fine part (fine sos, fine tokens, eos, pads) of length Lf, for content,
position and segment ids. The joint sequence has T = Lc + Lf - 1 steps:

  position stream at step t:  content_emb(content[t]) + pos_table(position[t])
                              + pos_emb[t] + seg_emb(segment[t])
  content stream at step t:   position-stream hidden h[t] + pos_table(position[t + 1])

where `pos_table` is the coarse position table for coarse positions and the fine one for fine
positions. The position head reads h (predicts position[t + 1]); the content head reads the
content stack's output (predicts content[t + 1]). Attention is causal only: pads in the middle
of the joint sequence are attended to, exactly as in the official code.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LAYER_NORM_EPS = 1e-5


def causal_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     mask: Optional[jax.Array] = None) -> jax.Array:
  """Scaled dot-product attention with a causal mask.

  Args:
    query, key, value: [B, H, T, D].
    mask: optional boolean mask broadcastable to [B, H, T, T] (True = may attend), combined
      with the causal mask.

  Returns:
    [B, H, T, D].
  """
  steps = query.shape[-2]
  scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) / math.sqrt(query.shape[-1])  # [B, H, T, T]
  allowed = jnp.tril(jnp.ones((steps, steps), dtype=bool))  # [T, T]
  if mask is not None:
    allowed = allowed & mask
  scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, value)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with separate query/key/value Linears and `proj`."""
  n_head: int
  n_embd: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
    batch, steps, _ = x.shape
    head_dim = self.n_embd // self.n_head

    def heads(name: str) -> jax.Array:
      projected = nn.Dense(self.n_embd, name=name)(x)  # [B, T, C]
      return projected.reshape(batch, steps, self.n_head, head_dim).transpose(0, 2, 1, 3)

    attended = causal_attention(heads("query"), heads("key"), heads("value"))  # [B, H, T, D]
    attended = attended.transpose(0, 2, 1, 3).reshape(batch, steps, self.n_embd)  # [B, T, C]
    out = nn.Dense(self.n_embd, name="proj")(attended)
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LN GPT block: x + attn(ln1(x)), then x + mlp(ln2(x)) with exact GELU."""
  n_head: int
  n_embd: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    x = x + CausalSelfAttention(self.n_head, self.n_embd, self.dropout, name="attn")(
        nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="ln1")(x), deterministic)  # [B, T, C]
    hidden = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="ln2")(x)
    hidden = nn.gelu(nn.Dense(4 * self.n_embd, name="mlp_fc")(hidden), approximate=False)
    hidden = nn.Dense(self.n_embd, name="mlp_proj")(hidden)  # [B, T, C]
    return x + nn.Dropout(self.dropout)(hidden, deterministic=deterministic)


class Head(nn.Module):
  """LayerNorm then a bias-free Linear to `num_outputs` logits."""
  num_outputs: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="ln")(x)
    return nn.Dense(self.num_outputs, use_bias=False, name="linear")(x)


class StackedTransformer(nn.Module):
  """Position stack then content stack over one coarse-to-fine sequence (official StackGPT).

  Attributes:
    vocab_size: content ids (codes + pad/eos/sos [+ classes]).
    coarse_position_size: coarse position ids (cells + pad/eos/sos).
    fine_position_size: fine position ids; also the position head's output size.
    segment_size: number of segments (2: coarse, fine).
    block_size: maximum joint sequence length T.
    position_layers, content_layers: depth of each stack.
    n_head, n_embd: attention heads and width.
    dropout: embedding, attention-output and residual dropout rate.
  """
  vocab_size: int
  coarse_position_size: int
  fine_position_size: int
  segment_size: int
  block_size: int
  position_layers: int
  content_layers: int
  n_head: int
  n_embd: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, coarse_content: jax.Array, fine_content: jax.Array,
               coarse_position: jax.Array, fine_position: jax.Array,
               coarse_segment: jax.Array, fine_segment: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs both stacks.

    Args:
      coarse_content, coarse_position, coarse_segment: [B, Lc] (sos first).
      fine_content, fine_position, fine_segment: [B, Lf] (fine sos first).
      deterministic: disables dropout when True.

    Returns:
      position_logits [B, T, fine_position_size], content_logits [B, T, vocab_size], with
      T = Lc + Lf - 1.
    """
    shapes = {"coarse_content": coarse_content.shape, "coarse_position": coarse_position.shape,
              "coarse_segment": coarse_segment.shape}
    fine_shapes = {"fine_content": fine_content.shape, "fine_position": fine_position.shape,
                   "fine_segment": fine_segment.shape}
    for group in (shapes, fine_shapes):
      first = next(iter(group.values()))
      if len(first) != 2 or any(s != first for s in group.values()):
        raise ValueError(f"StackedTransformer inputs must share one [B, L] shape; got {group}")
    if coarse_content.shape[0] != fine_content.shape[0]:
      raise ValueError(f"coarse batch {coarse_content.shape[0]} != fine batch "
                       f"{fine_content.shape[0]}")
    steps = coarse_content.shape[1] + fine_content.shape[1] - 1
    if steps > self.block_size:
      raise ValueError(f"joint sequence length {steps} exceeds block_size={self.block_size}")

    content_emb = nn.Embed(self.vocab_size, self.n_embd, name="content_emb")
    coarse_pos_emb = nn.Embed(self.coarse_position_size, self.n_embd,
                              name="content_coarse_pos_emb")
    fine_pos_emb = nn.Embed(self.fine_position_size, self.n_embd, name="content_fine_pos_emb")
    seg_emb = nn.Embed(self.segment_size, self.n_embd, name="seg_emb")
    pos_emb = self.param("pos_emb", nn.initializers.zeros, (1, self.block_size, self.n_embd))

    content = jnp.concatenate([coarse_content, fine_content], axis=1)[:, :-1]  # [B, T]
    segment = jnp.concatenate([coarse_segment, fine_segment], axis=1)[:, :-1]  # [B, T]
    position_now = jnp.concatenate(
        [coarse_pos_emb(coarse_position), fine_pos_emb(fine_position[:, :-1])], axis=1)
    x = content_emb(content) + position_now + pos_emb[:, :steps] + seg_emb(segment)  # [B, T, C]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    for i in range(self.position_layers):
      x = Block(self.n_head, self.n_embd, self.dropout, name=f"position_block_{i}")(
          x, deterministic)
    position_logits = Head(self.fine_position_size, name="position_head")(x)  # [B, T, P]

    position_next = jnp.concatenate(
        [coarse_pos_emb(coarse_position[:, 1:]), fine_pos_emb(fine_position)], axis=1)
    x = x + position_next  # [B, T, C]
    for i in range(self.content_layers):
      x = Block(self.n_head, self.n_embd, self.dropout, name=f"content_block_{i}")(
          x, deterministic)
    content_logits = Head(self.vocab_size, name="content_head")(x)  # [B, T, V]
    return position_logits, content_logits


def _masked_cross_entropy(logits: jax.Array, targets: jax.Array, ignore_id: int) -> jax.Array:
  """Mean cross-entropy over the tokens whose target is not `ignore_id` (0 if there are none)."""
  keep = targets != ignore_id  # [B, L]
  safe_targets = jnp.where(keep, targets, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe_targets)  # [B, L]
  return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def stackgpt_losses(position_logits: jax.Array, content_logits: jax.Array,
                    content_target: jax.Array, coarse_position_target: jax.Array,
                    fine_position_target: jax.Array, content_pad: int,
                    coarse_position_pad: int, fine_position_pad: int) -> dict[str, jax.Array]:
  """Official StackGPT losses.

  Args:
    position_logits: [B, T, P]; the first Lc - 1 steps predict coarse positions.
    content_logits: [B, T, V].
    content_target: [B, T] next content ids (pads = `content_pad` ignored).
    coarse_position_target: [B, Lc - 1] (pads = `coarse_position_pad` ignored).
    fine_position_target: [B, Lf] starting with the fine sos (pads = `fine_position_pad`).
    content_pad, coarse_position_pad, fine_position_pad: the ignored ids.

  Returns:
    content_loss, coarse_position_loss, fine_position_loss and position_loss (their mean).
  """
  coarse_steps = coarse_position_target.shape[1]
  steps = position_logits.shape[1]
  if content_target.shape != content_logits.shape[:2]:
    raise ValueError(f"content_target shape {content_target.shape} != content_logits "
                     f"[B, T] {content_logits.shape[:2]}")
  if coarse_steps + fine_position_target.shape[1] != steps:
    raise ValueError(f"coarse_position_target ({coarse_steps}) + fine_position_target "
                     f"({fine_position_target.shape[1]}) steps must equal T={steps}")
  coarse_loss = _masked_cross_entropy(position_logits[:, :coarse_steps], coarse_position_target,
                                      coarse_position_pad)
  fine_loss = _masked_cross_entropy(position_logits[:, coarse_steps:], fine_position_target,
                                    fine_position_pad)
  return {
      "content_loss": _masked_cross_entropy(content_logits, content_target, content_pad),
      "coarse_position_loss": coarse_loss,
      "fine_position_loss": fine_loss,
      "position_loss": (coarse_loss + fine_loss) / 2,
  }
