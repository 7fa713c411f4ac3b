"""Pure stage-1 step functions: `update_fn(state, batch, frozen)` and `reconstruct_fn`.

One jitted step updates the autoencoder and, when `loss.disc_weight > 0`, the PatchGAN
discriminator (its own optimizer), both on the same batch. `frozen` holds networks that are
inputs, not state (the LPIPS weights), so they are not baked into the compiled step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dq.losses import gan
from dq.losses.vae_loss import reconstruction_loss, vae_loss
from dq.models.dqvae import DECODER_LAST_LAYER
from dq.train.state import TrainState


def last_layer_grad(h: jax.Array, kernel: jax.Array, dy: jax.Array) -> jax.Array:
  """d loss / d kernel of the decoder's 3x3 `conv_out`, from its input h [B, H, W, C] and the
  loss gradient at its output dy [B, H, W, 3] (no pass through the rest of the network)."""
  def conv(k):
    return jax.lax.conv_general_dilated(h, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, kernel)[1](dy)[0]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def make_update_fn(model, tx: optax.GradientTransformation, schedule, *, loss_cfg: Any,
                   router_cfg: Any, num_grains: int, discriminator=None,
                   disc_tx: optax.GradientTransformation | None = None,
                   perceptual: Callable | None = None):
  """Builds update_fn(state, batch, frozen) -> (state, metrics); jit it with shardings and
  `donate_argnums=0`. `perceptual(frozen, x, y) -> [B]` is the LPIPS distance."""
  use_gan = discriminator is not None and loss_cfg.get("disc_weight", 0.0) > 0
  disc_kind = loss_cfg.get("disc_loss", "hinge")

  def update_fn(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    gumbel_rng, codebook_rng, dropout_rng = jax.random.split(rng, 3)
    x = batch["image"]  # [B, H, W, 3]
    percept = None if perceptual is None else (lambda a, b: perceptual(frozen, a, b))
    disc_factor = gan.adopt_weight(state.step, loss_cfg.get("disc_start", 0))

    def disc_logits(disc_params, batch_stats, images):
      logits, new = discriminator.apply({"params": disc_params, "batch_stats": batch_stats},
                                        images, train=True, mutable=["batch_stats"])
      return logits, new["batch_stats"]

    def loss_fn(params):
      outputs, new_vars = model.apply(
          {"params": params, "codebook": state.codebook}, x, train=True,
          mutable=["codebook", "intermediates"],
          rngs={"gumbel": gumbel_rng, "codebook": codebook_rng, "dropout": dropout_rng})
      loss, terms = vae_loss(x, outputs, loss_cfg=loss_cfg, router_cfg=router_cfg,
                             num_grains=num_grains, perceptual=percept)
      extra = {}
      if use_gan:
        xrec = outputs["xrec"]
        logits_fake, _ = disc_logits(state.disc_params, state.disc_batch_stats, xrec)
        terms["generator"] = gan.generator_loss(logits_fake, disc_kind)
        # Adaptive weight: gradient norms of nll and generator loss at the last layer.
        h = jax.lax.stop_gradient(
            new_vars["intermediates"]["decoder"]["last_layer_input"][0])
        kernel = jax.lax.stop_gradient(_get(params, DECODER_LAST_LAYER[:-1])["kernel"])
        y = jax.lax.stop_gradient(xrec)
        dy_nll = jax.grad(lambda y: reconstruction_loss(x, y, loss_cfg, percept)[0])(y)
        dy_g = jax.grad(lambda y: gan.generator_loss(
            disc_logits(state.disc_params, state.disc_batch_stats, y)[0], disc_kind))(y)
        d_weight = gan.adaptive_weight(last_layer_grad(h, kernel, dy_nll),
                                       last_layer_grad(h, kernel, dy_g),
                                       loss_cfg.get("adaptive_weight_max", 1e4))
        d_weight = d_weight * loss_cfg.disc_weight * disc_factor
        loss = loss + d_weight * terms["generator"]
        extra["adaptive_weight"] = d_weight
      return loss, (terms, outputs, new_vars["codebook"], extra)

    (loss, (terms, outputs, codebook, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}, **extra}
    metrics.update({k: outputs[k] for k in ("fine_ratio", "perplexity", "usage",
                                            "dead_fraction")})
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              codebook=codebook)

    if use_gan:
      fake = jax.lax.stop_gradient(outputs["xrec"])

      def d_loss_fn(disc_params):
        logits_real, stats = disc_logits(disc_params, state.disc_batch_stats, x)
        logits_fake, stats = disc_logits(disc_params, stats, fake)
        d_loss = gan.discriminator_loss(logits_real, logits_fake, disc_kind)
        return disc_factor * d_loss, (d_loss, stats, logits_real, logits_fake)

      (_, (d_loss, stats, logits_real, logits_fake)), d_grads = jax.value_and_grad(
          d_loss_fn, has_aux=True)(state.disc_params)
      d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state,
                                                 state.disc_params)
      new_state = new_state.replace(
          disc_params=optax.apply_updates(state.disc_params, d_updates),
          disc_opt_state=disc_opt_state, disc_batch_stats=stats)
      metrics.update({"disc_loss": d_loss, "disc_logits_real": jnp.mean(logits_real),
                      "disc_logits_fake": jnp.mean(logits_fake),
                      "disc_grad_norm": optax.global_norm(d_grads)})
    return new_state, metrics

  return update_fn


def make_reconstruct_fn(model):
  """Eval-mode forward: (variables, x) -> dict with xrec, codes, grain."""

  def reconstruct_fn(variables: dict, x: jnp.ndarray) -> dict:
    out = model.apply(variables, x, train=False)
    return {"xrec": out["xrec"], "codes": out["codes"], "grain": out["grain"]}

  return reconstruct_fn
