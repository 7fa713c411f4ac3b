"""Pure stage-1 step functions: `update_fn(state, batch, frozen)` and `reconstruct_fn`.

One jitted step updates the autoencoder and, when `loss.disc_weight > 0`, the PatchGAN
discriminator (its own optimizer), both on the same batch. `frozen` holds networks that are
inputs, not state (the LPIPS weights), so they are not baked into the compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import optax

from dq import sharding as sh
from dq.losses import gan
from dq.models.grains import grid_factors
from dq.losses.vae_loss import Stage1Loss, distill_loss
from dq.models.dqvae import DECODER_LAST_LAYER
from dq.train.router_control import RouterSchedule, benefit_target, router_steering
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


@dataclasses.dataclass(frozen=True)
class _StepSpec:
  """What `make_update_fn` fixes at build time; the step pieces below read it."""
  model: Any
  router_cfg: Any
  num_grains: int
  discriminator: Any
  perceptual: Callable | None
  activation_sharding: NamedSharding | None
  teacher_thresholds: tuple
  patch_size: int  # the coarsest factor (the entropy teacher's patch)
  use_gan: bool
  benefit_weight: float  # > 0: the router's cross-entropy against the measured benefit
  loss: Stage1Loss  # the generator loss (weights, the learned router's budget), checked
  adversarial: gan.AdversarialLoss  # the GAN term (weight, start step, kind), checked

  @property
  def disc_kind(self) -> str:
    return self.adversarial.kind

  @property
  def use_benefit(self) -> bool:
    return self.benefit_weight > 0

  def constrain(self, y: jax.Array) -> jax.Array:
    return sh.constrain_batch(y, self.activation_sharding)


def make_update_fn(model, tx: optax.GradientTransformation, schedule, *, loss_cfg: Any,
                   router_cfg: Any, num_grains: int, discriminator=None,
                   disc_tx: optax.GradientTransformation | None = None,
                   perceptual: Callable | None = None, microbatches: int = 1,
                   activation_sharding: NamedSharding | None = None,
                   teacher_thresholds: tuple = ()):
  """Builds update_fn(state, batch, frozen) -> (state, metrics); jit it with shardings and
  `donate_argnums=0`. `perceptual(frozen, x, y) -> [B]` is the LPIPS distance.

  The feature router's per-step controls (temperature schedule, entropy warm-up with
  `teacher_thresholds`) come from `dq.train.router_control.router_steering`.

  `activation_sharding` (the trainer passes `dq.sharding.batch_sharding(mesh)`; None: no
  constraint, e.g. unjitted) pins the batch axis of the images and reconstructions.

  `microbatches` > 1 accumulates gradients over that many equal (strided) batch slices in a
  `lax.scan`; each slice's loss is scaled by 1 / microbatches, so the summed gradient is the
  gradient of the mean loss. Relative to the one-slice step:
  - EMA codebook: every slice quantises with the step's starting codebook (the codebook is
    read-only in the slices) and the latents of all slices go through ONE EMA update (with its
    dead-code restarts, same rng) after the scan, so codes, codebook and the perplexity / usage
    / dead_fraction metrics equal the one-slice step's up to float rounding. Cost: the
    quantizer-input latents [B, hf, wf, D] of the whole batch are kept (small).
  - Terms that are means over the batch (L1, LPIPS, codebook loss) are exact. The budget loss
    (feature router) is a square of the batch's fine ratio and is taken per slice (each slice's
    ratio is pushed to the target), and Gumbel noise / dropout are drawn per slice: with the
    feature router the step matches the one-slice step in distribution, not value.
  - GAN: the adaptive weight is computed per slice (from that slice's last-layer gradients);
    the discriminator's gradients are accumulated over slices (one optimizer update), its
    BatchNorm statistics are taken per slice (train mode) and its running statistics are
    chained through the slices (2 * microbatches updates per step instead of 2).
  """
  if microbatches < 1:
    raise ValueError(f"config.train.microbatches must be >= 1; got {microbatches}")
  benefit_weight = (float(loss_cfg.get("router_benefit_weight", 0.0))
                    if router_cfg.kind == "feature" else 0.0)
  if benefit_weight > 0 and num_grains != 2:
    raise ValueError("config.loss.router_benefit_weight > 0 needs a dual-grain model (the "
                     f"benefit compares the two grains); got num_grains={num_grains}")
  adversarial = gan.AdversarialLoss.from_config(loss_cfg)  # fields checked here
  spec = _StepSpec(
      model=model, router_cfg=router_cfg, num_grains=num_grains,
      discriminator=discriminator, perceptual=perceptual,
      activation_sharding=activation_sharding, teacher_thresholds=teacher_thresholds,
      patch_size=grid_factors(model.ch_mult, 1)[0],
      use_gan=discriminator is not None and adversarial.weight > 0,
      benefit_weight=benefit_weight,
      loss=Stage1Loss.from_config(loss_cfg, router_cfg, num_grains),  # fields checked here
      adversarial=adversarial)
  if router_cfg.kind == "feature":
    RouterSchedule.from_router(router_cfg)  # its fields are checked here, before tracing

  def update_fn(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    gumbel_rng, codebook_rng, dropout_rng = jax.random.split(rng, 3)
    x = spec.constrain(batch["image"])  # [B, H, W, 3]
    losses = _StepLosses(spec, state, frozen)
    if microbatches == 1:
      rngs = {"gumbel": gumbel_rng, "codebook": codebook_rng, "dropout": dropout_rng}
      result = _one_slice_grads(spec, losses, state, x, rngs)
    else:
      result = _accumulated_grads(spec, losses, state, x, microbatches,
                                  gumbel_rng, codebook_rng, dropout_rng)
    return _apply_updates(spec, state, tx, disc_tx, schedule, result)

  return update_fn


class _StepLosses:
  """The generator and discriminator losses of one step (state and frozen nets bound)."""

  def __init__(self, spec: _StepSpec, state: TrainState, frozen: dict):
    self.spec, self.state = spec, state
    self.percept = None if spec.perceptual is None else (
        lambda a, b: spec.perceptual(frozen, a, b))
    self.disc_factor = gan.adopt_weight(state.step, spec.adversarial.start)

  def disc_logits(self, disc_params, batch_stats, images):
    logits, new = self.spec.discriminator.apply(
        {"params": disc_params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def generator(self, params, x, rngs, update_codebook: bool, scale: float):
    """Generator loss * scale on images x [b, H, W, 3]; aux: (unscaled loss, terms, outputs,
    new codebook or None, extra metrics, quantizer-input latents or None)."""
    spec, state = self.spec, self.state
    extra = {}
    mutable = ["codebook", "intermediates"] if update_codebook else ["intermediates"]
    capture_latents = False if update_codebook else (
        lambda module, method: module.name == "quant_conv" and method == "__call__")
    steer, teacher, teacher_weight = router_steering(
        spec.router_cfg, state.step, x, spec.teacher_thresholds, spec.patch_size,
        spec.num_grains)
    outputs, new_vars = spec.model.apply(
        {"params": params, "codebook": state.codebook}, x, train=True, mutable=mutable,
        rngs=rngs, capture_intermediates=capture_latents, **steer)
    outputs = {**outputs, "xrec": spec.constrain(outputs["xrec"])}  # [b, H, W, 3]
    loss, terms = spec.loss(x, outputs, perceptual=self.percept, teacher_gate=teacher,
                            teacher_weight=teacher_weight)
    if spec.use_benefit:
      loss, terms = self._add_benefit_loss(params, x, rngs, outputs, steer, loss, terms)
    if "temperature" in steer:
      extra["gumbel_temperature"] = steer["temperature"]
      extra.update(router_margin_metrics(outputs["gate_logits"]))
    if spec.use_gan:
      terms["generator"], d_weight = self._adaptive_generator_term(params, x, outputs, new_vars)
      loss = loss + d_weight * terms["generator"]
      extra["adaptive_weight"] = d_weight
    latents = None
    if not update_codebook:  # [b, hf, wf, D], the quantizer's input
      latents = jax.lax.stop_gradient(new_vars["intermediates"]["quant_conv"]["__call__"][0])
    return loss * scale, (loss, terms, outputs, new_vars.get("codebook"), extra, latents)

  def _adaptive_generator_term(self, params, x, outputs, new_vars):
    """(generator loss, its adaptive weight): gradient norms of nll and generator loss at the
    decoder's last layer, times disc_weight and the warm-up factor."""
    spec, state = self.spec, self.state
    xrec = outputs["xrec"]
    logits_fake, _ = self.disc_logits(state.disc_params, state.disc_batch_stats, xrec)
    generator_loss = gan.generator_loss(logits_fake, spec.disc_kind)
    h = jax.lax.stop_gradient(new_vars["intermediates"]["decoder"]["last_layer_input"][0])
    kernel = jax.lax.stop_gradient(_get(params, DECODER_LAST_LAYER[:-1])["kernel"])
    y = jax.lax.stop_gradient(xrec)
    dy_nll = jax.grad(lambda y: spec.loss.reconstruction(x, y, self.percept)[0])(y)
    dy_g = jax.grad(lambda y: gan.generator_loss(
        self.disc_logits(state.disc_params, state.disc_batch_stats, y)[0], spec.disc_kind))(y)
    d_weight = gan.adaptive_weight(last_layer_grad(h, kernel, dy_nll),
                                   last_layer_grad(h, kernel, dy_g),
                                   spec.adversarial.adaptive_weight_max)
    return generator_loss, d_weight * spec.adversarial.weight * self.disc_factor

  def _add_benefit_loss(self, params, x, rngs, outputs, steer, loss, terms):
    """The router's cross-entropy against the measured benefit of fine coding: one more
    forward pass (no gradient, no EMA update) with every region at the other grain."""
    spec = self.spec
    gate = jax.lax.stop_gradient(outputs["gate"])
    flipped = spec.model.apply(
        {"params": jax.lax.stop_gradient(params), "codebook": self.state.codebook}, x,
        train=True, rngs=rngs, route_gate=1.0 - gate, use_route_gate=True,
        temperature=steer.get("temperature"))["xrec"]
    target, _ = benefit_target(x, outputs["xrec"], jax.lax.stop_gradient(flipped),
                               outputs["grain"], spec.loss.budget.targets.fine, spec.patch_size)
    terms = {**terms, "router_benefit": distill_loss(outputs["gate_logits"], target)}
    return loss + spec.benefit_weight * terms["router_benefit"], terms

  def discriminator(self, disc_params, batch_stats, real, fake, scale: float):
    logits_real, stats = self.disc_logits(disc_params, batch_stats, real)
    logits_fake, stats = self.disc_logits(disc_params, stats, fake)
    d_loss = gan.discriminator_loss(logits_real, logits_fake, self.spec.disc_kind)
    return self.disc_factor * d_loss * scale, (d_loss, stats, jnp.mean(logits_real),
                                               jnp.mean(logits_fake))


def _one_slice_grads(spec: _StepSpec, losses: _StepLosses, state: TrainState, x: jax.Array,
                     rngs: dict) -> dict:
  """Gradients and metrics of the whole batch in one pass (the EMA update inside)."""
  grad_fn = jax.value_and_grad(losses.generator, has_aux=True)
  (_, (loss, terms, outputs, codebook, extra, _)), grads = grad_fn(
      state.params, x, rngs, True, 1.0)
  result = {"grads": grads, "loss": loss, "terms": terms, "extra": extra, "codebook": codebook,
            "code_metrics": {k: outputs[k] for k in ("fine_ratio", "perplexity", "usage",
                                                     "dead_fraction")}}
  if spec.use_gan:
    fake = jax.lax.stop_gradient(outputs["xrec"])
    d_grad_fn = jax.value_and_grad(losses.discriminator, has_aux=True)
    (_, (d_loss, disc_stats, logits_real, logits_fake)), d_grads = d_grad_fn(
        state.disc_params, state.disc_batch_stats, x, fake, 1.0)
    result.update(d_grads=d_grads, disc_stats=disc_stats,
                  disc=(d_loss, logits_real, logits_fake))
  return result


def _accumulated_grads(spec: _StepSpec, losses: _StepLosses, state: TrainState, x: jax.Array,
                       microbatches: int, gumbel_rng, codebook_rng, dropout_rng) -> dict:
  """Gradients summed over `microbatches` slices in a `lax.scan`, then one EMA update on all
  slices' latents (see `make_update_fn`)."""
  grad_fn = jax.value_and_grad(losses.generator, has_aux=True)
  d_grad_fn = jax.value_and_grad(losses.discriminator, has_aux=True)
  slices = sh.split_microbatches(x, microbatches, spec.activation_sharding)  # [M, B/M, H, W, 3]
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

  def accumulate(carry, inputs):
    index, piece = inputs
    grads_sum, d_grads_sum, disc_stats = carry
    piece_rngs = {"gumbel": jax.random.fold_in(gumbel_rng, index),
                  "dropout": jax.random.fold_in(dropout_rng, index)}
    (_, (loss, terms, outputs, _, extra, latents)), grads = grad_fn(
        state.params, piece, piece_rngs, False, 1.0 / microbatches)
    per_slice = {"loss": loss, "terms": terms, "extra": extra,
                 "fine_ratio": outputs["fine_ratio"]}
    if spec.use_gan:
      fake = jax.lax.stop_gradient(outputs["xrec"])
      (_, (d_loss, disc_stats, logits_real, logits_fake)), d_grads = d_grad_fn(
          state.disc_params, disc_stats, piece, fake, 1.0 / microbatches)
      d_grads_sum = jax.tree.map(jnp.add, d_grads_sum, d_grads)
      per_slice["disc"] = (d_loss, logits_real, logits_fake)
    carry = (jax.tree.map(jnp.add, grads_sum, grads), d_grads_sum, disc_stats)
    return carry, (per_slice, latents)

  carry = (zeros(state.params), zeros(state.disc_params), state.disc_batch_stats)
  (grads, d_grads, disc_stats), (per_slice, latents) = jax.lax.scan(
      accumulate, carry, (jnp.arange(microbatches), slices))
  mean = lambda tree: jax.tree.map(lambda v: jnp.mean(v, axis=0), tree)
  loss, terms, extra = mean((per_slice["loss"], per_slice["terms"], per_slice["extra"]))
  codebook, code_metrics = _ema_update(spec.model, state, sh.merge_microbatches(latents),
                                       codebook_rng)
  code_metrics["fine_ratio"] = jnp.mean(per_slice["fine_ratio"])
  result = {"grads": grads, "loss": loss, "terms": terms, "extra": extra, "codebook": codebook,
            "code_metrics": code_metrics}
  if spec.use_gan:
    result.update(d_grads=d_grads, disc_stats=disc_stats, disc=mean(per_slice["disc"]))
  return result


def _apply_updates(spec: _StepSpec, state: TrainState, tx, disc_tx, schedule,
                   result: dict) -> tuple[TrainState, dict]:
  """Optimizer updates of the autoencoder (and discriminator) and the step's metrics."""
  grads = result["grads"]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": result["loss"], **{f"loss_{k}": v for k, v in result["terms"].items()},
             **result["extra"], **result["code_metrics"]}
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["lr"] = schedule(state.step)
  if spec.loss.budget is not None:  # the budget's target, logged next to the coded ratio
    metrics["fine_ratio_target"] = jnp.float32(spec.loss.budget.targets.fine)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            codebook=result["codebook"])
  if spec.use_gan:
    d_grads = result["d_grads"]
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    new_state = new_state.replace(
        disc_params=optax.apply_updates(state.disc_params, d_updates),
        disc_opt_state=disc_opt_state, disc_batch_stats=result["disc_stats"])
    d_loss, logits_real, logits_fake = result["disc"]
    metrics.update({"disc_loss": d_loss, "disc_logits_real": jnp.mean(logits_real),
                    "disc_logits_fake": jnp.mean(logits_fake),
                    "disc_grad_norm": optax.global_norm(d_grads)})
  return new_state, metrics


def router_margin_metrics(logits: jax.Array) -> dict[str, jax.Array]:
  """Decisiveness of the router on a batch: the mean gap between the top two logits, and the
  fraction of regions whose gap is below 1 (where Gumbel noise at T = 1 often flips them)."""
  top2 = jax.lax.top_k(jax.lax.stop_gradient(logits.astype(jnp.float32)), 2)[0]
  gap = top2[..., 0] - top2[..., 1]
  return {"router_margin": jnp.mean(gap),
          "router_undecided": jnp.mean((gap < 1.0).astype(jnp.float32))}


def _ema_update(model, state: TrainState, latents: jax.Array,
                codebook_rng: jax.Array) -> tuple[Any, dict]:
  """One EMA codebook step (restarts included) on the whole batch's quantizer-input latents
  [B, hf, wf, D], through the model's own quantizer: the same codes, statistics and restart
  rng (`codebook_rng`, same module path) as the update inside a one-slice training pass.

  Returns (new codebook collection, {perplexity, usage, dead_fraction} of the batch).
  """
  weight_mask = jnp.ones(latents.shape[:-1], jnp.float32)  # loss weights: unused here
  (_, _, aux), new_vars = model.apply(
      {"params": state.params, "codebook": state.codebook}, latents, weight_mask,
      method=lambda module, z, mask: module.quantize(z, mask, train=True),
      mutable=["codebook"], rngs={"codebook": codebook_rng})
  return new_vars["codebook"], {k: aux[k] for k in ("perplexity", "usage", "dead_fraction")}


def make_reconstruct_fn(model):
  """Eval-mode forward: (variables, x) -> dict with xrec, codes, grain."""

  def reconstruct_fn(variables: dict, x: jnp.ndarray) -> dict:
    out = model.apply(variables, x, train=False)
    return {"xrec": out["xrec"], "codes": out["codes"], "grain": out["grain"]}

  return reconstruct_fn
