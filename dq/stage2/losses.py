"""Training losses of the stacked transformer: masked cross-entropies of the next position and
content, on packed sequences (`packed_losses`, what dq trains) or in the official StackGPT
assembly (`stackgpt_losses`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, keep: jax.Array) -> jax.Array:
  """Mean cross-entropy over the tokens where `keep` (0 if there are none).

  Args:
    logits: [..., N]; targets, keep: [...].
  """
  safe_targets = jnp.where(keep, targets, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe_targets)
  return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def _masked_cross_entropy(logits: jax.Array, targets: jax.Array, ignore_id: int) -> jax.Array:
  return masked_cross_entropy(logits, targets, targets != ignore_id)


def packed_losses(position_logits: jax.Array, content_logits: jax.Array,
                  packed: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """StackGPT losses on packed sequences (`forward_packed` outputs).

  Step t predicts token t + 1; targets beyond each sequence's end (valid False) are ignored.
  Coarse-position targets are the next tokens with segment 0, fine-position targets those with
  segment 1 (the fine SOS included, as in the official loss).

  Args:
    position_logits, content_logits: [B, L - 1, P] and [B, L - 1, V].
    packed: content, position, segment [B, L] int and valid [B, L] bool.

  Returns:
    content_loss, coarse_position_loss, fine_position_loss, position_loss (their mean).
  """
  keep = packed["valid"][:, 1:]  # [B, T]
  next_segment = packed["segment"][:, 1:]
  next_position = packed["position"][:, 1:]
  coarse_loss = masked_cross_entropy(position_logits, next_position, keep & (next_segment == 0))
  fine_loss = masked_cross_entropy(position_logits, next_position, keep & (next_segment == 1))
  return {
      "content_loss": masked_cross_entropy(content_logits, packed["content"][:, 1:], keep),
      "coarse_position_loss": coarse_loss,
      "fine_position_loss": fine_loss,
      "position_loss": (coarse_loss + fine_loss) / 2,
  }


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
