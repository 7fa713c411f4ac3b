"""Pure stage-2 step functions: train state, init, optimizer and `update_fn(state, batch)`.

A batch is a packed token dict (`dq.stage2.tokens.pack_tokens` layout): content, position,
segment int32 and valid bool, each [B, L]. The step applies label dropout (class-conditional
models), runs `forward_packed` with dropout and minimises content_loss + position_loss.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import optax

from dq import sharding as sh
from dq.stage2.layout import TokenLayout
from dq.stage2.losses import packed_losses
from dq.stage2.transformer import StackedTransformer
from dq.train.optim import make_optimizer

PACKED_KEYS = ("content", "position", "segment", "valid")


@flax.struct.dataclass
class TransformerState:
  step: jnp.ndarray      # [] int32
  params: Any
  opt_state: Any
  rng: jnp.ndarray       # [2] uint32 base key; per-step keys are fold_in(rng, step)


def transformer_weight_decay_mask(params: Any) -> Any:
  """True exactly for Dense kernels: embeddings, pos_emb, biases and LayerNorms are not decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_transformer_optimizer(optim_cfg: Any, total_steps: int
                               ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optim` (AdamW by default) with weight decay on Dense kernels only."""
  return make_optimizer(optim_cfg, total_steps, decay_mask=transformer_weight_decay_mask)


def make_init_fn(model: StackedTransformer, tx: optax.GradientTransformation,
                 layout: TokenLayout) -> Callable[[jax.Array], TransformerState]:
  """init_fn(rng) -> TransformerState (params from a dummy [1, max_len] batch)."""

  def init_fn(rng: jax.Array) -> TransformerState:
    params_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, layout.max_len), jnp.int32)
    params = model.init(params_rng, dummy, dummy, dummy, method="forward_packed")["params"]
    return TransformerState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=state_rng)

  return init_fn


def apply_label_dropout(content: jax.Array, rng: jax.Array, rate: float,
                        null_class_sos: int) -> tuple[jax.Array, jax.Array]:
  """Replaces the SOS content (content[:, 0]) by the null class with probability `rate`.

  Args:
    content: [B, L] int32 packed contents whose first column is the class SOS.
    rng: PRNG key.
    rate: drop probability in [0, 1].
    null_class_sos: the layout's null-class SOS id.

  Returns:
    (content [B, L], dropped [B] bool).
  """
  dropped = jax.random.bernoulli(rng, rate, content.shape[:1])  # [B]
  sos = jnp.where(dropped, null_class_sos, content[:, 0])
  return content.at[:, 0].set(sos.astype(content.dtype)), dropped


def _term_masks(packed: dict) -> dict[str, jax.Array]:
  """Targets of each loss term: content (every next token), coarse and fine positions."""
  keep = packed["valid"][:, 1:]  # [B, L - 1]
  next_segment = packed["segment"][:, 1:]
  return {"content": keep, "coarse": keep & (next_segment == 0),
          "fine": keep & (next_segment == 1)}


def _check_step_args(layout: TokenLayout, label_dropout: float, class_conditional: bool,
                     microbatches: int) -> None:
  if class_conditional != (layout.num_classes > 0):
    raise ValueError(f"class_conditional={class_conditional} but the token layout has "
                     f"num_classes={layout.num_classes}")
  if not 0.0 <= label_dropout <= 1.0:
    raise ValueError(f"config.label_dropout must lie in [0, 1]; got {label_dropout}")
  if microbatches < 1:
    raise ValueError(f"config.train.microbatches must be >= 1; got {microbatches}")


def make_update_fn(model: StackedTransformer, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, *, layout: TokenLayout, label_dropout: float,
                   class_conditional: bool, microbatches: int = 1,
                   activation_sharding: NamedSharding | None = None):
  """Builds update_fn(state, batch) -> (state, metrics); jit it with shardings and
  `donate_argnums=0`. Extra batch keys (e.g. 'label') are ignored.

  `microbatches` > 1 accumulates gradients over that many equal slices of the batch (a
  `lax.scan` over strided slices, see `dq.sharding.split_microbatches`); each loss term is
  normalised by the whole batch's token count, so the step equals the one-slice step up to float
  rounding (dropout masks differ per slice).

  `activation_sharding` (the trainer passes `dq.sharding.batch_sharding(mesh)`; None: no
  constraint, e.g. unjitted) pins the batch axis of the [B, T, V] and [B, T, P] logits to the
  data x fsdp split, leaving their other axes to XLA.
  """
  _check_step_args(layout, label_dropout, class_conditional, microbatches)
  drop_labels = class_conditional and label_dropout > 0

  def slice_loss(params, packed, counts, rng):
    """Loss of one slice with every term divided by the full batch's count, and statistics."""
    position_logits, content_logits = model.apply(
        {"params": params}, packed["content"], packed["position"], packed["segment"],
        deterministic=False, rngs={"dropout": rng}, method="forward_packed")
    position_logits = sh.constrain_batch(position_logits, activation_sharding)  # [b, T, P]
    content_logits = sh.constrain_batch(content_logits, activation_sharding)  # [b, T, V]
    masks = _term_masks(packed)
    means = packed_losses(position_logits, content_logits, packed)
    sums = {term: means[f"{name}_loss"] * jnp.sum(masks[term]) for term, name in (
        ("content", "content"), ("coarse", "coarse_position"), ("fine", "fine_position"))}
    scaled = {term: sums[term] / jnp.maximum(counts[term], 1) for term in sums}
    loss = scaled["content"] + (scaled["coarse"] + scaled["fine"]) / 2
    keep = masks["content"]
    hits = {
        "content": jnp.sum((jnp.argmax(content_logits, -1) == packed["content"][:, 1:]) & keep),
        "position": jnp.sum((jnp.argmax(position_logits, -1) == packed["position"][:, 1:]) & keep),
    }
    return loss, (scaled, hits)

  grad_fn = jax.value_and_grad(slice_loss, has_aux=True)

  def update_fn(state: TransformerState, batch: dict) -> tuple[TransformerState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, label_rng = jax.random.split(rng)
    packed = {k: batch[k] for k in PACKED_KEYS}
    metrics = {}
    if drop_labels:
      packed["content"], dropped = apply_label_dropout(packed["content"], label_rng,
                                                       label_dropout, layout.null_class_sos)
      metrics["null_label_fraction"] = jnp.mean(dropped.astype(jnp.float32))
    counts = {term: jnp.sum(mask) for term, mask in _term_masks(packed).items()}
    if microbatches == 1:
      (loss, (scaled, hits)), grads = grad_fn(state.params, packed, counts, dropout_rng)
    else:
      slices = sh.split_microbatches(packed, microbatches, activation_sharding)  # [M, B / M, L]

      def accumulate(carry, inputs):
        index, piece = inputs
        out, grads = grad_fn(state.params, piece, counts, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, carry, (out, grads)), None

      zero_out = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, state.params, jax.tree.map(lambda x: x[0], slices), counts, dropout_rng))
      (loss, (scaled, hits)), grads = jax.lax.scan(
          accumulate, zero_out, (jnp.arange(microbatches), slices))[0]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    coarse, fine = scaled["coarse"], scaled["fine"]
    metrics.update(loss=loss, content_loss=scaled["content"], coarse_position_loss=coarse,
                   fine_position_loss=fine, position_loss=(coarse + fine) / 2)
    metrics["content_accuracy"] = hits["content"] / jnp.maximum(counts["content"], 1)
    metrics["position_accuracy"] = hits["position"] / jnp.maximum(counts["content"], 1)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state.step)
    metrics["tokens"] = jnp.sum(packed["valid"]).astype(jnp.float32)  # valid tokens in the batch
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return update_fn
