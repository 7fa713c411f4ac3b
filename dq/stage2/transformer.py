"""Stacked position/content GPT (the official `StackGPT`), in flax.linen, with KV-cached decoding.

Three ways to run the same parameters:

- `__call__`: the official Dualformer assembly (parity with PyTorch). A coarse part (sos, coarse
  tokens, eos, pads) of length Lc and a fine part (fine sos, fine tokens, eos, pads) of length
  Lf; the joint sequence has T = Lc + Lf - 1 steps and the coarse pads sit in its middle.
- `forward_packed`: one left-packed sequence from `pack_tokens` ([B, L]; no pads in the middle),
  T = L - 1 steps. This is what dq trains.
- `position_step` / `content_step`: one token per stack with a KV cache (`init_cache`), for the
  sampler.

In every mode, at step t:

  position stream:  content_emb(content[t]) + pos_table[segment[t]](position[t])
                    + pos_emb[t] + seg_emb(segment[t])          -> position stack -> h[t]
  content stream:   h[t] + pos_table[segment[t + 1]](position[t + 1]) -> content stack

The position head reads h[t] (predicts position[t + 1]); the content head reads the content
stack's output (predicts content[t + 1]). `pos_table` is the coarse position table for coarse
tokens and the fine one for fine tokens. Attention is causal only.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-5
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
KVCache = list[dict[str, jax.Array]]  # per layer: key, value [B * H, L, D]


def attention(query: jax.Array, key: jax.Array, value: jax.Array,
              allowed: jax.Array) -> jax.Array:
  """Scaled dot-product attention with a float32 softmax over batch-leading arrays.

  Args:
    query: [..., Q, D]; key, value: [..., K, D] (same leading dims, e.g. [B, H] or [B * H]).
    allowed: boolean, broadcastable to [..., Q, K] (True = may attend).

  Returns:
    [..., Q, D].
  """
  scores = jnp.einsum("...qd,...kd->...qk", query, key).astype(jnp.float32)
  scores = jnp.where(allowed, scores / math.sqrt(query.shape[-1]), jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)  # [..., Q, K]
  return jnp.einsum("...qk,...kd->...qd", weights, value)


def causal_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     implementation: Optional[str] = None) -> jax.Array:
  """Causal self-attention over [B, T, H, D] arrays.

  `implementation=None` is the plain XLA einsum/softmax; 'xla' or 'cudnn' route through
  `jax.nn.dot_product_attention` (cudnn = the fused flash kernel on NVIDIA GPUs).
  """
  if implementation is None:
    steps = query.shape[1]
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, H, T, D]
    out = attention(heads_major(query), heads_major(key), heads_major(value),
                    jnp.tril(jnp.ones((steps, steps), dtype=bool)))
    return heads_major(out)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be None or one of "
                     f"{ATTENTION_IMPLEMENTATIONS}; got {implementation!r}")
  return jax.nn.dot_product_attention(query, key, value, is_causal=True,
                                      implementation=implementation)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with separate query/key/value Linears and `proj`."""
  n_head: int
  n_embd: int
  dropout: float = 0.0
  implementation: Optional[str] = None
  dtype: Any = jnp.float32

  def setup(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
    dense = lambda name: nn.Dense(self.n_embd, dtype=self.dtype, name=name)
    self.query, self.key, self.value, self.proj = (dense(n) for n in ("query", "key", "value",
                                                                       "proj"))
    self.drop = nn.Dropout(self.dropout)

  def _heads(self, layer: nn.Module, x: jax.Array) -> jax.Array:
    batch, steps, _ = x.shape
    return layer(x).reshape(batch, steps, self.n_head, self.n_embd // self.n_head)

  def _project(self, attended: jax.Array, deterministic: bool) -> jax.Array:
    batch, steps = attended.shape[:2]
    out = self.proj(attended.reshape(batch, steps, self.n_embd))  # [B, T, C]
    return self.drop(out, deterministic=deterministic)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Full causal pass over x [B, T, C]."""
    attended = causal_attention(self._heads(self.query, x), self._heads(self.key, x),
                                self._heads(self.value, x), self.implementation)  # [B, T, H, D]
    return self._project(attended, deterministic)

  def decode(self, x: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One token x [B, 1, C] at sequence index `index` (scalar) against the KV cache.

    The cache is [B * H, L, D]: with batch and heads merged, XLA updates it in place and the
    per-token attention is a plain batched matmul (a 4-D cache costs ~3x more per token on CPU).
    """
    batch = x.shape[0]
    merged = lambda layer: self._heads(layer, x).transpose(0, 2, 1, 3).reshape(
        batch * self.n_head, 1, -1)  # [B * H, 1, D]
    update = lambda name: jax.lax.dynamic_update_slice(
        cache[name], merged(getattr(self, name)).astype(cache[name].dtype), (0, index, 0))
    key, value = update("key"), update("value")  # [B * H, L, D]
    allowed = (jnp.arange(key.shape[1]) <= index)[None, None, :]  # [1, 1, L]
    attended = attention(merged(self.query), key, value, allowed)  # [B * H, 1, D]
    attended = attended.reshape(batch, self.n_head, 1, -1).transpose(0, 2, 1, 3)  # [B, 1, H, D]
    return self._project(attended, True), {"key": key, "value": value}


class Block(nn.Module):
  """Pre-LN GPT block: x + attn(ln1(x)), then x + mlp(ln2(x)) with exact GELU."""
  n_head: int
  n_embd: int
  dropout: float = 0.0
  implementation: Optional[str] = None
  dtype: Any = jnp.float32

  def setup(self):
    self.ln1 = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="ln1")
    self.attn = CausalSelfAttention(self.n_head, self.n_embd, self.dropout, self.implementation,
                                    self.dtype, name="attn")
    self.ln2 = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="ln2")
    self.mlp_fc = nn.Dense(4 * self.n_embd, dtype=self.dtype, name="mlp_fc")
    self.mlp_proj = nn.Dense(self.n_embd, dtype=self.dtype, name="mlp_proj")
    self.drop = nn.Dropout(self.dropout)

  def _mlp(self, x: jax.Array, deterministic: bool) -> jax.Array:
    hidden = nn.gelu(self.mlp_fc(self.ln2(x)), approximate=False)
    return x + self.drop(self.mlp_proj(hidden), deterministic=deterministic)

  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    x = x + self.attn(self.ln1(x), deterministic)  # [B, T, C]
    return self._mlp(x, deterministic)

  def decode(self, x: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One token x [B, 1, C]; returns the block output and the updated cache."""
    attended, cache = self.attn.decode(self.ln1(x), cache, index)
    return self._mlp(x + attended, True), cache


class Head(nn.Module):
  """LayerNorm then a bias-free Linear to `num_outputs` logits (float32)."""
  num_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="ln")(x)
    logits = nn.Dense(self.num_outputs, use_bias=False, dtype=self.dtype, name="linear")(x)
    return logits.astype(jnp.float32)


class StackedTransformer(nn.Module):
  """Position stack then content stack over one coarse-to-fine sequence (official StackGPT).

  Attributes:
    vocab_size: content ids (codes + pad/eos/sos [+ classes]).
    coarse_position_size: coarse position ids (cells + pad/eos/sos).
    fine_position_size: fine position ids; also the position head's output size.
    segment_size: number of segments (2: coarse, fine).
    block_size: maximum sequence length T.
    position_layers, content_layers: depth of each stack.
    n_head, n_embd: attention heads and width.
    dropout: embedding, attention-output and residual dropout rate.
    attention_impl: None (plain XLA), 'xla' or 'cudnn' (see `causal_attention`).
    dtype: compute dtype (params stay float32; logits are float32).
    remat: recompute each block's activations in the backward pass instead of keeping them
      (`nn.remat`: less memory, ~1/3 more compute; same values and parameter names).
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
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    embed = lambda size, name: nn.Embed(size, self.n_embd, dtype=self.dtype, name=name)
    self.content_emb = embed(self.vocab_size, "content_emb")
    self.coarse_pos_emb = embed(self.coarse_position_size, "content_coarse_pos_emb")
    self.fine_pos_emb = embed(self.fine_position_size, "content_fine_pos_emb")
    self.seg_emb = embed(self.segment_size, "seg_emb")
    self.pos_emb = self.param("pos_emb", nn.initializers.zeros, (1, self.block_size, self.n_embd))
    # `deterministic` (argument 2 counting the module) is a Python bool: static under remat.
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    block = lambda name: block_cls(self.n_head, self.n_embd, self.dropout, self.attention_impl,
                                   self.dtype, name=name)
    self.position_blocks = [block(f"position_block_{i}") for i in range(self.position_layers)]
    self.content_blocks = [block(f"content_block_{i}") for i in range(self.content_layers)]
    self.position_head = Head(self.fine_position_size, self.dtype, name="position_head")
    self.content_head = Head(self.vocab_size, self.dtype, name="content_head")
    self.drop = nn.Dropout(self.dropout)

  def _position_embedding(self, position: jax.Array, segment: jax.Array) -> jax.Array:
    """Coarse table where segment == 0, fine table elsewhere: [..., C]."""
    coarse = self.coarse_pos_emb(jnp.clip(position, 0, self.coarse_position_size - 1))
    fine = self.fine_pos_emb(jnp.clip(position, 0, self.fine_position_size - 1))
    return jnp.where((segment == 0)[..., None], coarse, fine)

  def _stacks(self, x: jax.Array, position_next: jax.Array,
              deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """Position-stream input x [B, T, C] -> (position logits, content logits)."""
    x = self.drop(x, deterministic=deterministic)
    for block in self.position_blocks:
      x = block(x, deterministic)
    position_logits = self.position_head(x)  # [B, T, P]
    x = x + position_next  # [B, T, C]
    for block in self.content_blocks:
      x = block(x, deterministic)
    return position_logits, self.content_head(x)  # [B, T, V]

  def _check_steps(self, steps: int) -> None:
    if steps > self.block_size:
      raise ValueError(f"joint sequence length {steps} exceeds block_size={self.block_size}")

  def __call__(self, coarse_content: jax.Array, fine_content: jax.Array,
               coarse_position: jax.Array, fine_position: jax.Array,
               coarse_segment: jax.Array, fine_segment: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs both stacks on the official split inputs.

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
    self._check_steps(steps)
    content = jnp.concatenate([coarse_content, fine_content], axis=1)[:, :-1]  # [B, T]
    segment = jnp.concatenate([coarse_segment, fine_segment], axis=1)[:, :-1]  # [B, T]
    position_now = jnp.concatenate(
        [self.coarse_pos_emb(coarse_position), self.fine_pos_emb(fine_position[:, :-1])], axis=1)
    x = (self.content_emb(content) + position_now + self.pos_emb[:, :steps].astype(self.dtype)
         + self.seg_emb(segment))  # [B, T, C]
    position_next = jnp.concatenate(
        [self.coarse_pos_emb(coarse_position[:, 1:]), self.fine_pos_emb(fine_position)], axis=1)
    return self._stacks(x, position_next, deterministic)

  def forward_packed(self, content: jax.Array, position: jax.Array, segment: jax.Array,
                     deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs both stacks on packed sequences [B, L] (see `pack_tokens`).

    Returns position_logits [B, L - 1, P] and content_logits [B, L - 1, V]; step t predicts
    token t + 1.
    """
    if not content.shape == position.shape == segment.shape or content.ndim != 2:
      raise ValueError(f"forward_packed inputs must share one [B, L] shape; got content "
                       f"{content.shape}, position {position.shape}, segment {segment.shape}")
    steps = content.shape[1] - 1
    self._check_steps(steps)
    x = (self.content_emb(content[:, :-1])
         + self._position_embedding(position[:, :-1], segment[:, :-1])
         + self.pos_emb[:, :steps].astype(self.dtype) + self.seg_emb(segment[:, :-1]))
    position_next = self._position_embedding(position[:, 1:], segment[:, 1:])  # [B, T, C]
    return self._stacks(x, position_next, deterministic)

  def position_step(self, content: jax.Array, position: jax.Array, segment: jax.Array,
                    index: jax.Array, cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache]:
    """Feeds token `index` (content/position/segment [B]) through the position stack.

    Returns its hidden state [B, C], the next-position logits [B, P] and the updated cache.
    """
    pos_emb = jax.lax.dynamic_slice_in_dim(self.pos_emb[0], index, 1, axis=0)  # [1, C]
    x = (self.content_emb(content) + self._position_embedding(position, segment)
         + pos_emb.astype(self.dtype) + self.seg_emb(segment))[:, None, :]  # [B, 1, C]
    new_cache = []
    for block, layer_cache in zip(self.position_blocks, cache):
      x, layer_cache = block.decode(x, layer_cache, index)
      new_cache.append(layer_cache)
    return x[:, 0], self.position_head(x)[:, 0], new_cache

  def content_step(self, hidden: jax.Array, next_position: jax.Array, next_segment: jax.Array,
                   index: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feeds step `index` through the content stack, given the chosen next position [B].

    Returns the next-content logits [B, V] and the updated cache.
    """
    x = (hidden + self._position_embedding(next_position, next_segment))[:, None, :]
    new_cache = []
    for block, layer_cache in zip(self.content_blocks, cache):
      x, layer_cache = block.decode(x, layer_cache, index)
      new_cache.append(layer_cache)
    return self.content_head(x)[:, 0], new_cache



def init_cache(model: StackedTransformer, batch: int, length: int,
               dtype: Any = None) -> dict[str, KVCache]:
  """Zero KV caches {'position': [...], 'content': [...]} of `model` for `length` steps."""
  if length > model.block_size:
    raise ValueError(f"cache length {length} exceeds block_size={model.block_size}")
  shape = (batch * model.n_head, length, model.n_embd // model.n_head)
  layer = lambda: {"key": jnp.zeros(shape, dtype or model.dtype),
                   "value": jnp.zeros(shape, dtype or model.dtype)}
  return {"position": [layer() for _ in range(model.position_layers)],
          "content": [layer() for _ in range(model.content_layers)]}
