"""Stage-1 (DQ-VAE) trainer: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Resume order: the latest complete checkpoint in the workdir, then `config.init_from`, then
scratch. The step is jitted once with explicit shardings and the state donated.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dq import sharding as sh
from dq.summaries import images as pictures
from dq.summaries import plots, stats
from dq.data import pipeline
from dq.evaluation import vae_eval
from dq.models.build import build_dqvae
from dq.models.entropy import resolve_entropy_thresholds
from dq.models.router import needs_entropy_thresholds
from dq import checkpoint as ckpt
from dq.train import throughput
from dq.train.optim import make_optimizer
from dq.train import run_setup
from dq.train.loop import TrainLoop, warn_codebook_collapse
from dq.train.state import TrainState, abstract_with_shardings
from dq.train.vae_step import make_reconstruct_fn, make_update_fn
from dq.train.workdir import TrainingRun
from dq.train.writers import create_writer


def build_model(config: Any, workdir: str):
  thresholds = resolve_entropy_thresholds(config, workdir)
  return build_dqvae(config.model, entropy_thresholds=thresholds)


def make_init_fn(model, tx, image_size: int, discriminator=None, disc_tx=None):
  def init_fn(rng):
    params_rng, gumbel_rng, codebook_rng, state_rng = jax.random.split(rng, 4)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": params_rng, "gumbel": gumbel_rng,
                            "codebook": codebook_rng}, dummy, train=False)
    params = variables["params"]
    disc = {}
    if discriminator is not None:
      disc_vars = discriminator.init(jax.random.fold_in(params_rng, 1), jnp.zeros(
          (2, image_size, image_size, 3), jnp.float32), train=False)
      disc = dict(disc_params=disc_vars["params"], disc_batch_stats=disc_vars["batch_stats"],
                  disc_opt_state=disc_tx.init(disc_vars["params"]))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      codebook=variables["codebook"], rng=state_rng, **disc)
  return init_fn


def make_discriminator(config: Any):
  """The PatchGAN and its optimizer when `loss.disc_weight > 0`, else (None, None)."""
  if config.loss.get("disc_weight", 0.0) <= 0:
    return None, None
  from dq.models.discriminator import PatchDiscriminator
  disc = PatchDiscriminator(ndf=config.loss.disc_ndf, num_layers=config.loss.disc_layers)
  disc_tx, _ = make_optimizer(config.optim_disc, config.train.num_steps)
  return disc, disc_tx


def make_perceptual(config: Any):
  """(LPIPS fn(frozen, x, y) -> [B], frozen dict) when `loss.perceptual_weight > 0`."""
  if config.loss.get("perceptual_weight", 0.0) <= 0:
    return None, {}
  from dq.losses import lpips
  params = lpips.load_lpips_params(config.loss.get("lpips_weights") or None)
  net = lpips.LPIPS()
  return (lambda frozen, x, y: net.apply({"params": frozen["lpips"]}, x, y)), {"lpips": params}


def init_from(path: str, state: TrainState, abstract: TrainState,
              keep_step: bool = False) -> TrainState:
  """Params + EMA codebook from a dq workdir/checkpoint, or from a folder written by
  `python -m dq.tools.convert_official_dqvae` (official PyTorch weights). With `keep_step`,
  the step is the checkpoint's (for evaluation); otherwise training starts at 0."""
  step = state.step
  if os.path.isfile(os.path.join(path, "params.npz")):
    from dq.official.dqvae import load_converted
    variables, _ = load_converted(path)
    loaded = {"params": variables["params"], "codebook": variables["codebook"]}
  else:
    restored = ckpt.restore_params_from(path)
    loaded = {"params": restored["params"], "codebook": restored["codebook"]}
    if keep_step:
      step = jnp.asarray(restored["step"], jnp.int32)
  expected = {"params": abstract.params, "codebook": abstract.codebook}
  if not ckpt.matches_abstract(loaded, expected):
    raise ValueError(f"config.init_from={path}: its parameters do not match config.model "
                     "(different widths, levels or codebook); set the model fields to the "
                     "checkpoint's (a converted folder has them in model_config.json)")
  loaded = jax.tree.map(lambda a, b: jax.device_put(np.asarray(a, b.dtype), b.sharding),
                        loaded, expected)
  logging.info("Initialised params and codebook from %s", path)
  return state.replace(params=loaded["params"], codebook=loaded["codebook"], step=step)


def setup(config: Any, workdir: str):
  """Mesh, model, optimizer, state (resumed or fresh) and the train iterator."""
  mesh, local_bs = run_setup.mesh_and_local_batch(config.get("mesh"), config.train.batch_size)
  model = build_model(config, workdir)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  discriminator, disc_tx = make_discriminator(config)
  init_fn = make_init_fn(model, tx, config.data.image_size, discriminator, disc_tx)
  rng = jax.random.PRNGKey(config.seed)
  state_shardings = run_setup.state_shardings(init_fn, rng, mesh, config.get("sharding"))

  train_ds = pipeline.make_dataset(
      config.data, split="train", batch_size=local_bs, seed=config.seed, train=True,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = iter(train_ds)
  run_state = run_setup.init_or_restore(
      init_fn, rng, state_shardings, workdir, keep=config.train.keep_checkpoints,
      async_save=config.train.get("async_checkpointing", True), data_iterator=train_iter,
      allow_data_restart=config.train.get("allow_data_restart", False),
      init_from=(functools.partial(init_from, config.init_from) if config.get("init_from")
                 else None))
  return mesh, model, tx, schedule, run_state.state, state_shardings, train_iter, run_state.manager


def train_and_evaluate(config: Any, workdir: str) -> TrainState | None:
  """Trains stage 1 for `config.train.num_steps`, with summaries, checkpoints and evaluation.
  Returns the final state, or None when a stop signal ended setup or the final evaluation."""
  with TrainingRun(config, workdir) as run:
    return _train(config, workdir, run)
  return None


def _make_train_step(config, workdir, mesh, model, tx, schedule, state_shardings, perceptual):
  discriminator, disc_tx = make_discriminator(config)
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router, num_grains=config.model.num_grains,
                             discriminator=discriminator, disc_tx=disc_tx, perceptual=perceptual,
                             microbatches=config.train.get("microbatches", 1),
                             activation_sharding=sh.batch_sharding(mesh),
                             teacher_thresholds=resolve_entropy_thresholds(config, workdir)
                             if needs_entropy_thresholds(config.model.router) else ())
  return run_setup.jit_train_step(update_fn, mesh, state_shardings,
                                  extra_in_shardings=(sh.replicated(mesh),))


def _train(config: Any, workdir: str, run: TrainingRun) -> TrainState:
  with run.phase("setup", skipped="nothing was trained or saved"):
    perceptual, frozen = make_perceptual(config)  # fails early when LPIPS weights are missing
    mesh, model, tx, schedule, state, state_shardings, train_iter, manager = setup(config,
                                                                                   workdir)
    start = int(jax.device_get(state.step))
    run.record_config(start)
    train_step = _make_train_step(config, workdir, mesh, model, tx, schedule, state_shardings,
                                  perceptual)
    frozen = jax.device_put(frozen, sh.replicated(mesh))
    writer = create_writer(workdir, tensorboard=config.train.get("tensorboard", True))
    summary_images = _summary_batch(config, mesh)
    reconstruct = jax.jit(make_reconstruct_fn(model))

  total = config.train.num_steps
  logging.info("Training from step %d to %d (batch %d on %d devices)", start, total,
               config.train.batch_size, jax.device_count())
  step_flops = None  # XLA's count of one step, measured once when the device peak is known
  collapse_warned = False
  with TrainLoop(config.train, manager, start, watch=run.watch) as loop:
    for step in loop.steps():
      batch = next(train_iter)
      device_batch = sh.shard_batch({"image": batch["image"]}, mesh)
      state, metrics = train_step(state, device_batch, frozen)
      loop.stepped(step, metrics, batch["skipped_records"])
      if loop.log_due(step):
        scalars = loop.log_scalars(step, metrics, config.train.batch_size)
        if step_flops is None and throughput.device_peak_flops(jax.devices()[0]):
          step_flops = throughput.compiled_flops(train_step, state, device_batch, frozen)
        utilisation = throughput.mfu(step_flops or 0.0, scalars["steps_per_sec"], jax.devices())
        if step_flops and utilisation is not None:
          scalars["mfu"] = utilisation
        if not collapse_warned:
          collapse_warned = warn_codebook_collapse(
              float(scalars["dead_fraction"]), config.train.get("dead_code_warning", 0.9), step)
        writer.write_scalars(step, scalars)
      if config.train.summary_every and (step % config.train.summary_every == 0
                                         or step == total) and not loop.preempted:
        _write_summary(writer, reconstruct, state, summary_images, config.model, step)
      if loop.save_due(step):
        loop.save(step, state, train_iter)
  loop.finish()
  writer.flush()
  if loop.preempted:
    return state

  if config.eval.at_end:
    step = int(jax.device_get(state.step))
    with run.phase("the final evaluation", skipped=f"the final evaluation was skipped (the "
                   f"checkpoint of step {step} is saved; rerunning the same command evaluates "
                   "it)"):
      run_evaluation(config, workdir, model, state, mesh, writer)
  writer.flush()
  return state


def run_evaluation(config, workdir, model, state, mesh, writer) -> dict:
  step = int(jax.device_get(state.step))
  lpips_params = None
  if config.eval.get("lpips", True):
    from dq.losses import lpips
    try:
      lpips_params = lpips.load_lpips_params(config.loss.get("lpips_weights") or None)
    except FileNotFoundError as e:
      logging.warning("Evaluating without LPIPS: %s", e)
  results = vae_eval.evaluate_vae(
      model, {"params": state.params, "codebook": state.codebook}, config.data, mesh=mesh,
      batch_size=config.eval.batch_size, num_grains=config.model.num_grains,
      codebook_size=config.model.codebook_size, max_images=config.eval.get("max_images"),
      lpips_params=lpips_params, per_image=True)
  fine = results.pop("fine_ratio_per_image")
  vae_eval.write_results(workdir, "reconstruction", step, results)
  writer.write_images(step, {"eval/fine_ratio_distribution": plots.fine_ratio_distribution(
      {"eval split": fine}, title=f"fine-grain ratio per eval image, step {step}")[None]})
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()
                              if isinstance(v, (int, float))})
  return results


def evaluate(config: Any, workdir: str) -> dict:
  """Evaluation mode: restores the latest checkpoint (or `init_from`) and evaluates."""
  mesh = sh.make_mesh(config.get("mesh"))
  model = build_model(config, workdir)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  init_fn = make_init_fn(model, tx, config.data.image_size, *make_discriminator(config))
  rng = jax.random.PRNGKey(config.seed)
  shardings = run_setup.state_shardings(init_fn, rng, mesh, config.get("sharding"))
  abstract = abstract_with_shardings(init_fn, rng, shardings)
  manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints)
  source = workdir if manager.latest_step() is not None else config.get("init_from")
  if not source:
    raise FileNotFoundError(f"evaluate: no checkpoint in {workdir}/checkpoints and no "
                            "config.init_from; train first or set --config.init_from=DIR")
  # Only params + codebook are needed: optimizer or discriminator fields may differ.
  state = init_from(source, jax.jit(init_fn, out_shardings=shardings)(rng), abstract,
                    keep_step=True)
  writer = create_writer(workdir, tensorboard=config.train.get("tensorboard", True))
  results = run_evaluation(config, workdir, model, state, mesh, writer)
  writer.flush()
  return results


def _summary_batch(config, mesh) -> np.ndarray | None:
  n = config.train.get("summary_images", 8)
  if not config.train.summary_every or not n:
    return None
  ds = pipeline.make_dataset(config.data, split="eval", batch_size=n, seed=0, train=False,
                             num_epochs=1, drop_remainder=False)
  return next(iter(ds))["image"]


def _write_summary(writer, reconstruct, state, images, model_cfg, step) -> None:
  """Reconstruction grid (input | reconstruction | error | grain map), code histogram and
  fine-ratio distribution of the summary images."""
  if images is None:
    return
  out = jax.device_get(reconstruct({"params": state.params, "codebook": state.codebook},
                                   jnp.asarray(images)))
  num_grains = model_cfg.num_grains
  grain, codes = np.asarray(out["grain"]), np.asarray(out["codes"])
  grid = pictures.reconstruction_grid(np.asarray(images), np.asarray(out["xrec"]), grain,
                                      num_grains)
  histogram = plots.code_histogram(codes, grain, model_cfg.codebook_size, num_grains)
  ratios = plots.fine_ratio_distribution(stats.fine_ratios(grain, num_grains),
                                       title=f"fine-grain ratio per image, step {step}")
  writer.write_images(step, {"reconstruction": grid[None], "code_histogram": histogram[None],
                             "fine_ratio_distribution": ratios[None]})
