"""Vector quantizer with an EMA-updated codebook and restarts of unused codes.

The codebook lives in the mutable collection 'codebook' (never in 'params'):
  embedding    [K, D]  the code vectors used for lookups,
  cluster_size [K]     EMA of per-code assignment counts,
  embed_sum    [K, D]  EMA of per-code sums of assigned vectors.
Initial state: embedding ~ U(-1/K, 1/K), embed_sum = embedding, cluster_size = 1, which is
self-consistent (normalising embed_sum by cluster_size gives embedding back). Codes unused in
the first training batches fall below 1 and get restarted from batch vectors.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def nearest_codes(z: jax.Array, embedding: jax.Array) -> jax.Array:
  """Index of the nearest code (first minimum) for each vector: z [N, D], embedding [K, D]."""
  distances = (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(embedding * embedding, axis=1)
               - 2.0 * jnp.matmul(z, embedding.T, precision=HIGHEST))  # [N, K]
  return jnp.argmin(distances, axis=1).astype(jnp.int32)


def tile_with_noise(vectors: jax.Array, target: int, rng: jax.Array) -> jax.Array:
  """Repeats [N, D] vectors to at least `target` rows, adding U[0, 0.01/sqrt(D)) noise."""
  count, dim = vectors.shape
  repeats = -(-target // count)
  tiled = jnp.tile(vectors, (repeats, 1))
  return tiled + jax.random.uniform(rng, tiled.shape, tiled.dtype) * (0.01 / math.sqrt(dim))


def ema_codebook_update(z: jax.Array, codes: jax.Array, cluster_size: jax.Array,
                        embed_sum: jax.Array, *, decay: float, eps: float,
                        restart_rng: jax.Array | None
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One EMA step over all vectors (z [N, D], codes [N]).

  Returns (embedding, cluster_size, embed_sum, dead_fraction), where dead_fraction is the
  fraction of codes whose EMA count fell below 1 in this step (those that are restarted).

  With `restart_rng`, codes whose EMA count is below 1 are re-seeded with a random batch
  vector (batch tiled with small noise when N < K) and their count set to 1.
  """
  num_codes = cluster_size.shape[0]
  counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, num_codes)  # [K]
  sums = jax.ops.segment_sum(z, codes, num_codes)  # [K, D]
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  dead_fraction = jnp.mean((cluster_size < 1.0).astype(jnp.float32))
  if restart_rng is not None:
    noise_rng, perm_rng = jax.random.split(restart_rng)
    pool = tile_with_noise(z, num_codes, noise_rng) if z.shape[0] < num_codes else z
    candidates = pool[jax.random.permutation(perm_rng, pool.shape[0])[:num_codes]]  # [K, D]
    used = cluster_size >= 1.0
    embed_sum = jnp.where(used[:, None], embed_sum, candidates)
    cluster_size = jnp.where(used, cluster_size, 1.0)
  total = jnp.sum(cluster_size)
  normalized = total * (cluster_size + eps) / (total + num_codes * eps)  # [K]
  return embed_sum / normalized[:, None], cluster_size, embed_sum, dead_fraction


def code_statistics(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
  """Perplexity and used-code fraction of a batch of codes (any shape)."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  probs = counts / codes.size
  return {
      "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
      "usage": jnp.mean((counts > 0).astype(jnp.float32)),
  }


class EMAVectorQuantizer(nn.Module):
  """Nearest-code quantizer; the codebook is trained by EMA, inputs by the commitment loss."""
  codebook_size: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  decay: float = 0.99
  eps: float = 1e-5
  restart_unused_codes: bool = True

  def setup(self):
    bound = 1.0 / self.codebook_size
    shape = (self.codebook_size, self.embed_dim)
    self.embedding = self.variable(
        "codebook", "embedding",
        lambda: jax.random.uniform(self.make_rng("params"), shape, jnp.float32, -bound, bound))
    self.cluster_size = self.variable(
        "codebook", "cluster_size", lambda: jnp.ones((self.codebook_size,), jnp.float32))
    self.embed_sum = self.variable("codebook", "embed_sum", lambda: self.embedding.value)

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Code vectors [..., D] for integer codes [...]."""
    return jnp.take(self.embedding.value, codes, axis=0)

  def __call__(self, z: jax.Array, weight_mask: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Quantizes z [B, H, W, D]; weight_mask [B, H, W] weighs the loss per position.

    Returns (quant [B, H, W, D] with straight-through gradients to z, codes int32 [B, H, W],
    aux dict: codebook_loss, perplexity, usage, dead_fraction). In training, when the
    'codebook' collection is mutable, the EMA state is updated after the lookup (the outputs
    use the codebook from before the update); restarts draw from the 'codebook' rng stream.
    """
    if z.shape[-1] != self.embed_dim:
      raise ValueError(f"quantizer input has {z.shape[-1]} channels; expected embed_dim="
                       f"{self.embed_dim}")
    if weight_mask.shape != z.shape[:-1]:
      raise ValueError(f"weight_mask shape {weight_mask.shape} must equal z's spatial shape "
                       f"{z.shape[:-1]}")
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embed_dim)  # [N, D]
    embedding = self.embedding.value
    codes = nearest_codes(flat, embedding)  # [N]
    quant = jnp.take(embedding, codes, axis=0).reshape(z.shape)
    codes = codes.reshape(z.shape[:-1])

    mask = weight_mask.astype(jnp.float32)[..., None]
    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(quant) - z) * mask)
    codebook_term = jnp.mean(jnp.square(quant - jax.lax.stop_gradient(z)) * mask)
    aux = {"codebook_loss": self.beta * commitment + codebook_term,
           **code_statistics(codes, self.codebook_size)}

    aux["dead_fraction"] = jnp.mean((self.cluster_size.value < 1.0).astype(jnp.float32))
    if train and self.is_mutable_collection("codebook") and not self.is_initializing():
      restart_rng = None
      if self.restart_unused_codes:
        if not self.has_rng("codebook"):
          raise ValueError("EMAVectorQuantizer with restart_unused_codes=True needs a 'codebook' "
                           "rng in training: apply(..., rngs={'codebook': key}, "
                           "mutable=['codebook'])")
        restart_rng = self.make_rng("codebook")
      new_embedding, new_cluster_size, new_embed_sum, aux["dead_fraction"] = ema_codebook_update(
          jax.lax.stop_gradient(flat), codes.reshape(-1), self.cluster_size.value,
          self.embed_sum.value, decay=self.decay, eps=self.eps, restart_rng=restart_rng)
      self.embedding.value = new_embedding
      self.cluster_size.value = new_cluster_size
      self.embed_sum.value = new_embed_sum
    # quant + (z - sg(z)): forward value exactly the code vector, gradient identity to z.
    return quant + (z - jax.lax.stop_gradient(z)), codes, aux
