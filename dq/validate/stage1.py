"""Stage-1 (DQ-VAE) rules: encoder/decoder factors and grains, losses, GAN and eval fields,
`init_from` shapes; `VAE_RULES` lists them with the shared ones, in the order they run."""
from __future__ import annotations

import os

from dq.losses.budget import BudgetLoss
from dq.losses.gan import AdversarialLoss
from dq.losses.vae_loss import Stage1Loss
from dq.fields import FieldError
from dq.models.grains import GrainTargets, grid_factors
from dq.validate.checker import (Checker, is_int, is_remote, one_line, plain, read_json,
                                 run_config_path, show)
from dq.validate.common import (check_data, check_mesh_and_batches, check_optim, check_sharding,
                                check_train_loop)

# DQ-VAE fields that change parameter shapes: an init_from checkpoint must agree on them.
VAE_SHAPE_FIELDS = ("resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                    "z_channels", "num_grains", "codebook_size", "embed_dim", "dec_ch",
                    "dec_ch_mult", "dec_num_res_blocks", "dec_attn_resolutions",
                    "position_type")


def _section_check(c: Checker, build):
  """Runs a section's own check (building the dataclass of the code that reads the fields)
  and returns what it built; its FieldError becomes a failure line (then None)."""
  try:
    return build()
  except FieldError as e:
    c.fail(e.field, e.value, e.expectation)
    return None


def _check_vae_model(c: Checker) -> None:
  """Rules 2 and 3 for `config.model`, then `build_dqvae` for the remaining field checks."""
  from dq.models.build import build_dqvae
  from dq.models.dqvae import ROUTER_KINDS
  before = len(c.failures)
  num_grains = c.choice("model.num_grains", (2, 3))
  kind = c.choice("model.router.kind", ROUTER_KINDS)
  router = c.get("model.router")
  targets = (_section_check(c, lambda: GrainTargets.from_router(router, num_grains or 2))
             or GrainTargets(0.0, num_grains=num_grains or 2))  # (budget fields checked anyway)
  if kind == "fixed":
    _section_check(c, lambda: targets.fixed_grain)
  c.existing("model.router.thresholds_path", "file", "an entropy threshold table of "
             "python -m dq.tools.entropy_thresholds")
  from dq.train.router_control import RouterSchedule
  schedule = _section_check(c, lambda: RouterSchedule.from_router(router))
  entropy_teacher = (kind == "feature" and schedule is not None and schedule.teacher == "entropy"
                     and (schedule.warmup_steps or schedule.distill_steps))
  if (kind == "entropy" or entropy_teacher) and not c.get("model.router.thresholds_path"):
    c.integer("model.router.threshold_images", 1)
  _section_check(c, lambda: BudgetLoss.from_config(c.get("loss"), targets))
  benefit = c.number("loss.router_benefit_weight", low=0.0)
  if benefit and num_grains == 3:
    c.fail("loss.router_benefit_weight", benefit, "expected 0 for a triple-grain model (the "
           "benefit target compares the two grains of a dual-grain model)")
  c.number("optim.router_lr_mult", low=0.0)
  ch_mult, dec_ch_mult = c.get("model.ch_mult"), c.get("model.dec_ch_mult")
  for field, mults in (("model.ch_mult", ch_mult), ("model.dec_ch_mult", dec_ch_mult)):
    if not isinstance(mults, (list, tuple)) or not mults or not all(
        is_int(m) and m >= 1 for m in mults):
      c.fail(field, mults, "expected a non-empty tuple of ints >= 1 (width per level)")
      return
  resolution = c.integer("model.resolution", 1)
  image_size = c.get("data.image_size")
  levels = len(ch_mult)
  grains = num_grains or 2
  if levels < grains:
    c.fail("model.ch_mult", ch_mult, f"expected at least {grains} levels for {grains} grains")
    return
  factors = grid_factors(ch_mult, grains)
  coarse_factor, fine_factor = factors[0], factors[-1]
  explain = (f"the coarsest downsampling factor {coarse_factor} = 2**(len(model.ch_mult) - 1) "
             f"(ch_mult {tuple(ch_mult)}, {grains} grains: F={coarse_factor}"
             + "".join(f"/{coarse_factor >> g}" for g in range(1, grains)) + ")")
  for field, size in (("model.resolution", resolution), ("data.image_size", image_size)):
    if is_int(size) and size > 0 and size % coarse_factor:
      c.fail(field, size, f"expected a multiple of {explain}")
  if resolution and is_int(image_size) and image_size > 0 and image_size != resolution:
    c.fail("data.image_size", image_size, f"expected model.resolution={resolution} (the DQ-VAE "
           "codes images of exactly its resolution)")
  decoder_factor = 2 ** (len(dec_ch_mult) - 1)
  if decoder_factor != fine_factor:
    c.fail("model.dec_ch_mult", dec_ch_mult, f"expected {levels - grains + 1} levels: the "
           f"decoder upsamples by 2**(len - 1) = {decoder_factor} but the finest grain's factor "
           f"is {fine_factor} = 2**(len(model.ch_mult) - num_grains)")
  if resolution:
    for field, count in (("model.attn_resolutions", levels),
                         ("model.dec_attn_resolutions", len(dec_ch_mult))):
      passed = [resolution // 2**level for level in range(count)]
      listed = c.get(field)
      if not isinstance(listed, (list, tuple)) or any(r not in passed for r in listed):
        c.fail(field, listed, f"expected resolutions from {tuple(passed)} (the feature map "
               f"sizes it passes through at resolution {resolution}; others are ignored)")
  if len(c.failures) == before:
    try:
      thresholds = (0.5,) * (grains - 1) if kind == "entropy" else ()
      build_dqvae(c.get("model"), entropy_thresholds=thresholds)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
      c.failures.append(f"config.model: {one_line(str(e))}")


def _check_vae_misc(c: Checker) -> None:
  """Loss weights, GAN settings, eval fields (rule 7) and the LPIPS weights path (rule 6)."""
  loss = c.get("loss")
  _section_check(c, lambda: Stage1Loss(**Stage1Loss.weights_from(loss)))  # the weights
  adversarial = _section_check(c, lambda: AdversarialLoss.from_config(loss))
  if adversarial is not None and adversarial.weight > 0:
    c.integer("loss.disc_ndf", 1)
    c.integer("loss.disc_layers", 1)
  c.existing("loss.lpips_weights", "file", "LPIPS weights (.npz of dq.tools.convert_lpips)")
  c.integer("eval.max_images", 0)
  c.boolean("eval.at_end")


def _check_vae_init_from(c: Checker) -> None:
  """Rule 6 for `init_from`, and a checkpoint's shape fields against `config.model`."""
  path = c.existing("init_from", "any", "a stage-1 workdir, checkpoint folder or converted "
                    "DQ-VAE folder")
  if not path or is_remote(path):
    return
  from dq.official import dqvae as convert
  if os.path.isfile(os.path.join(path, convert.PARAMS_FILE)):
    config_path = os.path.join(path, convert.CONFIG_FILE)
    model = read_json(config_path) if os.path.isfile(config_path) else None
  else:
    config_path = run_config_path(path)
    run = read_json(config_path) if config_path else {}
    if config_path and run.get("stage", "vae") != "vae":
      c.fail("init_from", path, f"expected a stage-1 DQ-VAE run; {config_path} is a "
             f"{run.get('stage')!r} run")
      return
    model = run.get("model")
  if not isinstance(model, dict):
    return
  theirs = dict(model, **{"router.kind": (model.get("router") or {}).get("kind")})
  for field in VAE_SHAPE_FIELDS + ("router.kind",):
    ours = c.get(f"model.{field}")
    if theirs.get(field) is not None and plain(theirs[field]) != plain(ours):
      c.fail(f"model.{field}", ours, f"expected {show(theirs[field])}, the value of the "
             f"init_from checkpoint ({config_path}); its parameters have other shapes")


def _check_vae_optimizers(c: Checker) -> None:
  check_optim(c, "optim")
  check_optim(c, "optim_disc")


def _check_vae_data(c: Checker) -> None:
  check_data(c, require_files=True, min_image_size=1)


VAE_RULES = [check_mesh_and_batches, check_sharding, check_train_loop, _check_vae_optimizers,
             _check_vae_data, _check_vae_model, _check_vae_misc, _check_vae_init_from]
