"""Pure stage-1 step functions: `update_fn(state, batch)` and `reconstruct_fn(variables, x)`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dq.losses.vae_loss import vae_loss
from dq.train.state import TrainState


def make_update_fn(model, tx: optax.GradientTransformation, schedule, *, loss_cfg: Any,
                   router_cfg: Any, num_grains: int):
  """One optimisation step; jit it with shardings and `donate_argnums=0`."""

  def update_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    gumbel_rng, codebook_rng, dropout_rng = jax.random.split(rng, 3)
    x = batch["image"]  # [B, H, W, 3]

    def loss_fn(params):
      outputs, new_vars = model.apply(
          {"params": params, "codebook": state.codebook}, x, train=True,
          mutable=["codebook"],
          rngs={"gumbel": gumbel_rng, "codebook": codebook_rng, "dropout": dropout_rng})
      loss, terms = vae_loss(x, outputs, loss_cfg=loss_cfg, router_cfg=router_cfg,
                             num_grains=num_grains)
      return loss, (terms, outputs, new_vars["codebook"])

    (loss, (terms, outputs, codebook)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}
    metrics.update({k: outputs[k] for k in ("fine_ratio", "perplexity", "usage",
                                            "dead_fraction")})
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              codebook=codebook)
    return new_state, metrics

  return update_fn


def make_reconstruct_fn(model):
  """Eval-mode forward: (variables, x) -> dict with xrec, codes, grain."""

  def reconstruct_fn(variables: dict, x: jnp.ndarray) -> dict:
    out = model.apply(variables, x, train=False)
    return {"xrec": out["xrec"], "codes": out["codes"], "grain": out["grain"]}

  return reconstruct_fn
