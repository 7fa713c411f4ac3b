"""The paper's claims at small scale, on the embedded data, with identical budgets (issue 9).

Claims: at a similar number of codes, variable-length coding (DQ-VAE) reconstructs better than
fixed-length coding, and the shorter coarse-to-fine sequence samples faster.

Stage 1 trains, with the same steps, batch, seed, data order, widths and codebook (the demo
DQ-VAE of `configs/demo_vae.py`: coarse factor 8, fine factor 4):
- `fixed_coarse` / `fixed_fine`: fixed-length VQ grids at the coarse / fine factor. They are the
  DQ-VAE with `model.router.kind = 'fixed'` (every region at one grain, chosen by
  `router.fine_ratio` 0.0 or 1.0; see `dq.models.grains.GrainTargets.fixed_grain`): the same
  encoder, quantizer, positional decoder and loss, minus the router, and with no budget loss
  (the loss only has a budget term for the learned feature router). Forcing the entropy router with
  extreme thresholds was not used: dataset percentiles cannot guarantee all-coarse or all-fine
  grids on held-out images.
- `feature_<r>` / `entropy_<r>`: DQ-VAE with the learned feature router (budget loss, target
  fine ratio r) and with the entropy router (threshold = the (1 - r) percentile of patch
  entropies over `threshold_images` training images, one table shared by the three ratios),
  r in 0.25 / 0.5 / 0.75.
Each model is trained by `dq.train.vae_trainer.train_and_evaluate` and evaluated on the
held-out split by `vae_trainer.run_evaluation` (PSNR, SSIM, LPIPS, codes per image, fine-ratio
statistics, overlap of fine regions with the procedural detail masks) or, when rFID is on, by
the FID job `dq.evaluation.fid_jobs.stage1` (the same numbers plus rFID against reference
statistics of the held-out split). Codes per image count 1 per coarse region and 4 per fine
region (`vae_eval.grain_costs`): 64 / 256 for the fixed grids at 64 px, 160 at fine ratio 0.5.

Stage 2 trains the same small StackedTransformer (`dq.train.transformer_trainer`) twice, with
the same steps and batch: on the tokens of `feature_0.5` (the DQ-Transformer) and on the tokens
of `fixed_fine`. The fixed-grid model is the plain-GPT baseline: every region is fine, so its
sequences are SOS, coarse EOS, fine SOS, the hf*wf codes in raster order, EOS, and it is sampled
with `fixed_fine_positions` (positions forced in raster order, only contents sampled; its
position head is set to take the coarse EOS at once, as in `benchmarks/sampling.py`). Per token
it does the work of a single GPT with position + content layers, so the sampling-time ratio
measures the sequence-length effect the paper claims. Both use the KV-cached jitted sampler
with the same batch and the same worst-case `max_len` (cache size); seconds per image are the
median of `sample_repeats` calls after compilation, divided by the batch.

Modes: `--smoke` (32 px, tiny widths, 2 steps per model: tests; ~5-10 minutes on 2 CPU cores,
almost all XLA compilation), `--quick` (64 px demo widths, 200 steps per stage-1 model, 60 per
transformer: 25 minutes measured on 2 CPU cores shared with other jobs (load 4-6), about 15 alone;
a third of it is compilation, mostly each model's train-state init; rFID off, because Inception
at 299 px costs ~0.4 s per image there, 9 passes over the eval split; `--rfid_images N` turns it
on) and the default full mode for a GPU (128 px, wider, 20k steps, rFID over the eval split).
At the quick budget the stage-1 models are far from converged (PSNR 14-16 dB) and the ordering of
the fixed grids is not yet the one of their code counts: read its table as a check that the
pipeline runs, not as evidence for or against the claims. `--models a,b` and `--no_stage2` run a
subset (investigations, e.g. `--vae_steps 1500 --models fixed_coarse,fixed_fine,feature_0.5`).

  python benchmarks/claims.py --quick --workdir /tmp/claims_quick
Writes WORKDIR/claims.json and WORKDIR/claims.md and prints the JSON document as one line.
A workdir keeps its checkpoints: rerunning the same command resumes (and re-evaluates) instead
of training again; a workdir made with other settings is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from dq.configs import ROUTER_RECIPES, set_fields
from dq.validate import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("smoke", "quick", "full")
RATIOS = (0.25, 0.5, 0.75)
DQ_MODEL = "feature_0.5"  # the DQ-VAE the transformer is trained on
# Training recipes of the learned (feature) router (dq.configs.ROUTER_RECIPES), as dotted config
# overrides over configs/demo_vae.py. 'feature' is the paper's recipe exactly (hard
# Gumbel-softmax at T = 1, budget on the sampled gate, the official `h * gate.max()` gate,
# GroupNorm router); 'guided' is this project's default (a detail teacher, see dq.configs).
RECIPES = {"feature": ROUTER_RECIPES["paper"], "guided": ROUTER_RECIPES["guided"]}
# Settings fields that only pick which runs to make: a workdir can be extended with them.
SELECTION_FIELDS = ("models", "seeds")
CLEAR_MARGIN_DB = 1.0  # "beats fixed-coarse by a clear margin": at least this PSNR gain
CLOSE_DB = 1.0  # "comes close to fixed-fine": at most this PSNR gap
ROUTER_FINE_SLACK_DB = 0.1  # issue 15: a learned router at 0.5 within this of fixed fine
ROUTER_DETAIL_PRECISION = 0.40  # issue 15: its fine regions on detail at least this often
NUM_SPECIAL_TOKENS = 4  # SOS, coarse EOS, fine SOS, fine EOS


@dataclasses.dataclass(frozen=True)
class Settings:
  """One mode's budget, identical for every model of a stage."""
  mode: str
  image_size: int
  model: dict  # config.model fields over configs/demo_vae.py's
  router_norm_groups: int
  vae_steps: int
  vae_batch: int
  vae_lr: float
  eval_images: int  # held-out images (the eval split's size)
  eval_batch: int
  lpips: bool
  rfid_images: int  # 0: no rFID
  threshold_images: int
  feature_ratios: tuple[float, ...]
  entropy_ratios: tuple[float, ...]
  transformer: dict  # config.model fields of the StackedTransformer
  transformer_steps: int
  transformer_batch: int
  sample_batch: int
  sample_repeats: int
  models: tuple[str, ...] = ()  # a subset of the stage-1 models (investigations); () = all
  seeds: tuple[int, ...] = (0,)  # every stage-1 model is trained once per seed
  recipes: tuple[str, ...] = ("feature",)  # learned-router recipes (RECIPES), at feature_ratios
  dq_model: str = DQ_MODEL  # the stage-1 model whose tokens the DQ-Transformer is trained on

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def settings_for(mode: str, vae_steps: int = 0, transformer_steps: int = 0,
                 rfid_images: int = -1, models: tuple[str, ...] = (),
                 seeds: tuple[int, ...] = (0,), recipes: tuple[str, ...] = ("feature",),
                 dq_model: str = DQ_MODEL) -> Settings:
  """The settings of `mode` ('smoke' | 'quick' | 'full'); positive overrides replace them, a
  non-empty `models` keeps only those stage-1 models, `seeds` trains each model once per seed
  and `recipes` names the learned-router recipes (keys of RECIPES) trained at every ratio."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  demo_model = dict(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(),
                    z_channels=32, codebook_size=256, embed_dim=32, dec_ch=16,
                    dec_ch_mult=(1, 2, 2), dec_num_res_blocks=0, dec_attn_resolutions=(),
                    norm_groups=8)
  demo_transformer = dict(n_embd=128, n_head=4, position_layers=2, content_layers=4,
                          dropout=0.0)
  if mode == "smoke":
    settings = Settings(
        mode=mode, image_size=32,
        model=dict(demo_model, ch=8, z_channels=16, embed_dim=16, codebook_size=32, dec_ch=8),
        router_norm_groups=8, vae_steps=2, vae_batch=8, vae_lr=1e-3, eval_images=16,
        eval_batch=16, lpips=False, rfid_images=0, threshold_images=16,
        feature_ratios=RATIOS, entropy_ratios=RATIOS,
        transformer=dict(n_embd=32, n_head=2, position_layers=1, content_layers=1, dropout=0.0),
        transformer_steps=2, transformer_batch=8, sample_batch=2, sample_repeats=1)
  elif mode == "quick":
    settings = Settings(
        mode=mode, image_size=64, model=demo_model, router_norm_groups=32, vae_steps=200,
        vae_batch=8, vae_lr=1e-3, eval_images=256, eval_batch=32, lpips=True, rfid_images=0,
        threshold_images=256, feature_ratios=RATIOS, entropy_ratios=RATIOS,
        transformer=demo_transformer, transformer_steps=60, transformer_batch=16,
        sample_batch=8, sample_repeats=3)
  else:
    settings = Settings(
        mode=mode, image_size=128,
        model=dict(demo_model, ch=64, num_res_blocks=2, z_channels=64, embed_dim=64,
                   codebook_size=1024, dec_ch=64, dec_num_res_blocks=1, norm_groups=32),
        router_norm_groups=32, vae_steps=20_000, vae_batch=32, vae_lr=1e-3, eval_images=1024,
        eval_batch=64, lpips=True, rfid_images=1024, threshold_images=2048,
        feature_ratios=RATIOS, entropy_ratios=RATIOS,
        transformer=dict(n_embd=256, n_head=8, position_layers=2, content_layers=6,
                         dropout=0.0),
        transformer_steps=5000, transformer_batch=32, sample_batch=32, sample_repeats=5)
  overrides = {}
  if vae_steps > 0:
    overrides["vae_steps"] = vae_steps
  if transformer_steps > 0:
    overrides["transformer_steps"] = transformer_steps
  if rfid_images >= 0:
    overrides["rfid_images"] = rfid_images
  unknown = sorted(set(recipes) - set(RECIPES))
  if unknown or not recipes:
    raise ValueError(f"recipes {unknown or list(recipes)} unknown; expected names from "
                     f"{sorted(RECIPES)}")
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and non-empty; got {seeds}")
  settings = dataclasses.replace(settings, models=tuple(models), seeds=tuple(seeds),
                                 recipes=tuple(recipes), dq_model=dq_model, **overrides)
  model_specs(settings)  # checks the names
  return settings


def model_specs(settings: Settings) -> list[dict]:
  """Name, router kind and target fine ratio of every stage-1 model, fixed grids first."""
  specs = [dict(name="fixed_coarse", router="fixed", fine_ratio=0.0),
           dict(name="fixed_fine", router="fixed", fine_ratio=1.0)]
  specs += [dict(name=f"{recipe}_{r}", router="feature", fine_ratio=r, recipe=recipe)
            for recipe in settings.recipes for r in settings.feature_ratios]
  specs += [dict(name=f"entropy_{r}", router="entropy", fine_ratio=r)
            for r in settings.entropy_ratios]
  if settings.models:
    known = [spec["name"] for spec in specs]
    unknown = sorted(set(settings.models) - set(known))
    if unknown:
      raise ValueError(f"models {unknown} unknown; expected names from {known}")
    specs = [spec for spec in specs if spec["name"] in settings.models]
  return specs


def _load_config_module(name: str):
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"claims_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_sampling_benchmark():
  """benchmarks/sampling.py (its `prefer_coarse_eos` and `time_sampler`)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampling.py")
  spec = importlib.util.spec_from_file_location("claims_sampling_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


apply_overrides = set_fields  # dotted config overrides, e.g. a recipe's


def vae_config(settings: Settings, spec: dict, thresholds_path: str,
               seed: int = 0) -> ml_collections.ConfigDict:
  """configs/demo_vae.py with this mode's sizes and budget, the model's router and recipe,
  and `seed` (initialisation, Gumbel noise and data order)."""
  steps = settings.vae_steps
  config = _load_config_module("demo_vae").get_config(f"steps={steps}")
  config.seed = seed
  # Fixed-grid and entropy models carry the base (paper) router-training fields, which they
  # do not use; learned-router models carry their recipe's.
  apply_overrides(config, RECIPES[spec.get("recipe") or "feature"])
  config.data.image_size = settings.image_size
  config.data.embedded.eval_size = settings.eval_images
  config.model.update(dict(settings.model, resolution=settings.image_size))
  router = config.model.router
  router.kind = spec["router"]
  router.fine_ratio = spec["fine_ratio"]
  router.norm_groups = settings.router_norm_groups
  router.threshold_images = settings.threshold_images
  # The entropy router and a learned router with an entropy teacher share one threshold table.
  from dq.models.router import needs_entropy_thresholds
  uses_table = spec["router"] == "entropy" or needs_entropy_thresholds(router)
  router.thresholds_path = thresholds_path if uses_table else ""
  # Checkpoints at every fifth of training: the learned router's routing changes between them
  # are a diagnostic (routing_change).
  config.train.update(dict(batch_size=settings.vae_batch, log_every=max(1, steps // 30),
                           summary_every=0, checkpoint_every=max(1, steps // 5),
                           keep_checkpoints=6, async_checkpointing=False, tensorboard=False))
  config.optim.update(dict(lr=settings.vae_lr, warmup_steps=min(100, steps // 10)))
  config.eval.update(dict(batch_size=settings.eval_batch, max_images=settings.eval_images,
                          lpips=settings.lpips, at_end=False))
  return config


def transformer_config(settings: Settings, stage1_dir: str, vae_cfg: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """configs/demo_transformer.py, unconditional, on the stage-1 model's data distribution."""
  steps = settings.transformer_steps
  config = _load_config_module("demo_transformer").get_config(
      f"stage1={stage1_dir},steps={steps}")
  config.data.embedded.update(vae_cfg.data.embedded.to_dict())
  config.data.image_size = 0  # the stage-1 model's
  config.class_conditional = False
  config.sample.labels = ""
  config.model.update(settings.transformer)
  config.train.update(dict(batch_size=settings.transformer_batch, log_every=max(1, steps // 4),
                           sample_every=0, checkpoint_every=steps, keep_checkpoints=1,
                           async_checkpointing=False, tensorboard=False))
  config.optim.warmup_steps = min(50, steps // 10)
  return config


def last_metrics(workdir: str) -> dict:
  """The last row of WORKDIR/metrics.jsonl (the final logged training step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.isfile(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = [row for row in rows if any("loss" in k for k in row)]
  return rows[-1] if rows else {}


class PhaseClock:
  """Wall seconds per named phase."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def run(self, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    self.seconds[name] = round(time.perf_counter() - start, 2)
    logging.info("claims: %s took %.1f s", name, self.seconds[name])
    return result


def _check_workdir(workdir: str, settings: Settings) -> None:
  """Refuses a workdir whose checkpoints were made with other settings (the selection of
  models, seeds and recipes may differ: each run's own config is checked by `_check_run_dir`)."""
  path = os.path.join(workdir, "claims_settings.json")
  current = {k: v for k, v in json.loads(json.dumps(settings.to_json())).items()
             if k not in SELECTION_FIELDS + ("recipes", "dq_model")}
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != current:
      changed = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
      raise ValueError(f"{workdir} holds a claims run with other settings (differs in "
                       f"{changed}); use a fresh --workdir")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(current, f, indent=1)


# Config sections that decide what a stage-1 run trains; a run dir made with others is refused.
RUN_SECTIONS = ("model", "loss", "optim", "data", "seed")


def _check_run_dir(config: ml_collections.ConfigDict, run_dir: str) -> None:
  """Refuses to resume a stage-1 run whose saved config.json differs in RUN_SECTIONS (e.g. a
  recipe whose definition changed since the run was made)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  changed = sorted(k for k in RUN_SECTIONS if saved.get(k) != current.get(k))
  if changed:
    raise ValueError(f"{run_dir} was trained with another config (differs in {changed}); "
                     "delete it or use a fresh --workdir")


def inception_params_or_reason() -> tuple[Any, Optional[str]]:
  """(Inception params, None) when the weights are installed, else (None, why not)."""
  from dq.evaluation.inception_weights import load_inception_params
  try:
    return load_inception_params(), None
  except (FileNotFoundError, ValueError) as error:
    return None, f"Inception weights not found: {str(error).splitlines()[0]}"


def lpips_reason(settings: Settings) -> Optional[str]:
  """None when LPIPS is evaluated, else why not."""
  if not settings.lpips:
    return f"LPIPS off in {settings.mode} mode"
  from dq.losses import lpips
  try:
    lpips.load_lpips_params()
  except FileNotFoundError as error:
    return f"LPIPS weights not found: {str(error).splitlines()[0]}"
  return None


def fid_config(vae_cfg: ml_collections.ConfigDict, settings: Settings, reference: str,
               stage1_dir: str = "") -> ml_collections.ConfigDict:
  from dq.configs import fid_base_config
  config = fid_base_config()
  config.data = vae_cfg.data.copy_and_resolve_references()
  config.fid.update(dict(split="eval", reference_stats=reference, batch_size=settings.eval_batch,
                         max_images=settings.rfid_images, save_features=False,
                         tensorboard=False))
  config.stage1.update(dict(path=stage1_dir, lpips=settings.lpips))
  return config


def evaluate_model(settings: Settings, config, workdir: str, state, inception,
                   reference: str) -> dict:
  """Held-out metrics of a trained stage-1 model: `vae_trainer.run_evaluation` on the state
  training returned, or the FID job `fid_jobs.stage1` on its workdir when rFID is on."""
  from dq import sharding as sh
  from dq.evaluation import fid_jobs
  from dq.train import vae_trainer
  from dq.train.writers import create_writer
  if inception is None:
    writer = create_writer(workdir, tensorboard=False)
    return dict(vae_trainer.run_evaluation(
        config, workdir, vae_trainer.build_model(config, workdir), state,
        sh.make_mesh(config.get("mesh")), writer))
  job = fid_config(config, settings, reference, stage1_dir=workdir)
  job.mode = "stage1"
  return dict(fid_jobs.stage1(job, workdir, inception_params=inception))


STAGE1_KEYS = ("codes_per_image", "regions_per_image", "fine_ratio_mean", "fine_ratio_std",
               "fine_ratio_min", "fine_ratio_max", "psnr", "ssim", "l1", "lpips", "rfid",
               "codebook_usage", "codebook_perplexity", "num_images", "detail_precision",
               "detail_recall", "detail_lift", "detail_base_rate", "detail_fine_coverage",
               "detail_coarse_coverage", "router_margin_mean", "router_undecided")


def stage1_row(spec: dict, metrics: dict, train_metrics: dict, lpips_note: Optional[str],
               rfid_note: Optional[str]) -> dict:
  """The per-run record of claims.json (one model, one seed)."""
  row = dict(router=spec["router"], target_fine_ratio=spec["fine_ratio"])
  if spec.get("recipe"):
    row["recipe"] = spec["recipe"]
  for key in STAGE1_KEYS:
    row[key] = metrics.get(key)
  if row["lpips"] is None:
    row["lpips_note"] = lpips_note
  if row["rfid"] is None:
    row["rfid_note"] = rfid_note
  row["train_final"] = {k: train_metrics[k] for k in ("step", "loss", "loss_l1", "loss_codebook",
                                                      "loss_budget", "fine_ratio")
                        if k in train_metrics}
  for key in ("routing_change", "routing_steps"):
    if key in metrics:
      row[key] = metrics[key]
  return row


def aggregate_seeds(runs: dict[int, dict]) -> dict:
  """One model's row over seeds: numeric fields are the mean over seeds with `<field>_std`
  (population std) beside them; `seeds` and `per_seed` keep every run."""
  first = runs[min(runs)]
  row = {}
  for key, value in first.items():
    values = [run.get(key) for run in runs.values()]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
        isinstance(v, (int, float)) for v in values):
      row[key] = float(np.mean(values))
      row[f"{key}_std"] = float(np.std(values))
    else:
      row[key] = value
  changes = [run["routing_change"] for run in runs.values() if run.get("routing_change")]
  if changes:
    row["routing_change_last"] = float(np.mean([c[-1] for c in changes]))
  row["seeds"] = sorted(runs)
  row["per_seed"] = {str(seed): runs[seed] for seed in sorted(runs)}
  return row


def routing_diagnostics(config, run_dir: str, settings: Settings) -> dict:
  """Grain maps of the held-out images at every checkpoint of a learned-router run: the
  fraction of regions whose grain changed between consecutive checkpoints."""
  from dq.data import pipeline
  from dq.evaluation import routing
  from dq import checkpoint as ckpt
  from dq.train import vae_trainer
  root = os.path.join(run_dir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(root) if n.isdigit()
                 and os.path.isdir(os.path.join(root, n, "state")))
  ds = pipeline.make_dataset(config.data, split="eval", batch_size=settings.eval_batch, seed=0,
                             train=False, num_epochs=1, drop_remainder=False)
  images = np.concatenate([b["image"] for b in ds])[:settings.eval_images]
  model = vae_trainer.build_model(config, run_dir)
  maps = []
  for step in steps:
    restored = ckpt.restore_params_from(os.path.join(root, str(step)))
    maps.append(routing.grain_maps(model, {"params": restored["params"],
                                           "codebook": restored["codebook"]}, images,
                                   settings.eval_batch))
  return {"routing_steps": steps, "routing_change": routing.routing_change(maps)}


def train_stage1(settings: Settings, workdir: str, clock: PhaseClock) -> tuple[dict, dict]:
  """Trains and evaluates every stage-1 model once per seed; returns (rows by name, seed-0
  configs by name). A row holds the mean over seeds (and `<field>_std`, `per_seed`)."""
  from dq.evaluation import fid_jobs
  from dq.models import entropy
  from dq.train import vae_trainer
  specs = model_specs(settings)
  thresholds_path = os.path.join(workdir, "entropy_thresholds.json")
  needs_table = any(vae_config(settings, s, thresholds_path).model.router.thresholds_path
                    for s in specs)
  if needs_table and not os.path.isfile(thresholds_path):
    probe = vae_config(settings, specs[-1], thresholds_path)
    clock.run("entropy_thresholds", entropy.write_thresholds_for_config, probe, thresholds_path,
              settings.threshold_images)
  lpips_note = lpips_reason(settings)
  inception, rfid_note = None, f"rFID off in {settings.mode} mode (--rfid_images 0)"
  reference = os.path.join(workdir, "reference_eval.npz")
  if settings.rfid_images > 0:
    inception, rfid_note = inception_params_or_reason()
    if inception is not None and not os.path.isfile(reference):
      job = fid_config(vae_config(settings, specs[0], thresholds_path), settings, reference)
      job.mode = "reference"
      clock.run("rfid_reference", fid_jobs.reference, job, workdir, inception_params=inception)
  rows, configs = {}, {}
  for spec in specs:
    name, runs = spec["name"], {}
    for seed in settings.seeds:
      run_dir = run_dir_of(workdir, name, seed)
      config = vae_config(settings, spec, thresholds_path, seed)
      validate_config(config)  # the checks dq.main runs, before anything is built
      _check_run_dir(config, run_dir)
      tag = f"vae/{name}/seed{seed}"
      state = clock.run(f"{tag}/train", vae_trainer.train_and_evaluate, config, run_dir)
      metrics = clock.run(f"{tag}/eval", evaluate_model, settings, config, run_dir, state,
                          inception, reference)
      if spec["router"] == "feature":
        metrics.update(clock.run(f"{tag}/routing", routing_diagnostics, config, run_dir,
                                 settings))
      runs[seed] = stage1_row(spec, metrics, last_metrics(run_dir), lpips_note, rfid_note)
      configs.setdefault(name, config)
      logging.info("claims: %s seed %d -> %s", name, seed, json.dumps(_clean(runs[seed])))
    rows[name] = aggregate_seeds(runs)
  return rows, configs


def run_dir_of(workdir: str, name: str, seed: int) -> str:
  """WORKDIR/vae/<model>/seed<k>: one stage-1 run."""
  return os.path.join(workdir, "vae", name, f"seed{seed}")


def train_transformer(settings: Settings, name: str, stage1_dir: str, vae_cfg,
                      workdir: str, clock: PhaseClock) -> dict:
  """Trains the StackedTransformer on a stage-1 model's tokens; returns the pieces to sample."""
  from dq import generator as gen
  from dq.stage2.build import build_transformer
  from dq.train import transformer_trainer as trainer
  config = transformer_config(settings, stage1_dir, vae_cfg)
  validate_config(config)
  out_dir = os.path.join(workdir, "transformer", name)
  state = clock.run(f"transformer/{name}/train", trainer.train_and_evaluate, config, out_dir)
  stage1 = gen.load_stage1(config)
  layout = gen.make_layout(config, stage1, gen.resolve_data_config(config, stage1))
  model = build_transformer(config.model, layout)
  params = jax.device_put(jax.device_get(state.params), jax.local_devices()[0])
  final = last_metrics(out_dir)
  return dict(model=model, layout=layout, params=params,
              train_final={k: v for k, v in final.items()
                           if k == "step" or "loss" in k or "accuracy" in k})


def time_sampling(settings: Settings, trained: dict, fixed_grid: bool, clock: PhaseClock,
                  name: str) -> dict:
  """Seconds per image of the KV-cached sampler and the sampled sequence lengths."""
  from dq.stage2.sampler import SamplingConfig, make_sampler
  bench = _load_sampling_benchmark()
  layout, params = trained["layout"], trained["params"]
  if fixed_grid:
    sampler = make_sampler(trained["model"], layout, SamplingConfig(fixed_fine_positions=True))
    params = bench.prefer_coarse_eos(params, layout)
  else:
    sampler = make_sampler(trained["model"], layout)
  seconds, lengths = clock.run(f"sampling/{name}", bench.time_sampler, sampler, params,
                               settings.sample_batch, settings.sample_repeats)
  regions = layout.num_coarse_cells
  fine = (lengths.astype(np.float64) - NUM_SPECIAL_TOKENS - regions) / (3.0 * regions)
  return dict(seconds_per_image=seconds / settings.sample_batch,
              seconds_per_batch=seconds, batch=settings.sample_batch,
              tokens_mean=float(lengths.mean()), tokens_max=int(lengths.max()),
              sampled_fine_ratio_mean=float(fine.mean()), max_len=int(layout.max_len),
              train_final=trained["train_final"])


def run_stage2(settings: Settings, workdir: str, configs: dict, rows: dict,
               clock: PhaseClock) -> dict:
  """DQ-Transformer on `settings.dq_model` tokens (first seed) vs the fixed-grid GPT on
  fixed_fine tokens."""
  results = {}
  for name, stage1_name, fixed in (("dq", settings.dq_model, False),
                                   ("fixed_fine", "fixed_fine", True)):
    stage1_dir = run_dir_of(workdir, stage1_name, settings.seeds[0])
    trained = train_transformer(settings, name, stage1_dir, configs[stage1_name], workdir, clock)
    results[name] = dict(stage1=stage1_name, **time_sampling(settings, trained, fixed, clock,
                                                             name))
    codes = rows[stage1_name]["codes_per_image"]
    results[name]["data_tokens_mean"] = codes + NUM_SPECIAL_TOKENS
  dq, grid = results["dq"], results["fixed_fine"]
  results["fixed_over_dq_seconds"] = grid["seconds_per_image"] / dq["seconds_per_image"]
  results["fixed_over_dq_tokens"] = grid["tokens_mean"] / dq["tokens_mean"]
  results["baseline"] = ("fixed grid = the same StackedTransformer trained on fixed_fine tokens, "
                         "sampled with fixed_fine_positions (raster order) after a forced "
                         "coarse EOS: a plain GPT over the fine grid with position + content "
                         "layers per token")
  return results


def acceptance(rows: dict) -> dict:
  """The issue's check: DQ at 0.5 vs fixed-coarse (clear PSNR gain) and fixed-fine (close)."""
  result = {"clear_margin_db": CLEAR_MARGIN_DB, "close_db": CLOSE_DB}
  if "fixed_coarse" not in rows or "fixed_fine" not in rows:
    return {**result, "skipped": "needs the fixed_coarse and fixed_fine models"}
  coarse, fine = rows["fixed_coarse"], rows["fixed_fine"]
  for name in (n for n in rows if n.endswith("_0.5")):
    dq = rows[name]
    span = fine["psnr"] - coarse["psnr"]
    code_span = fine["codes_per_image"] - coarse["codes_per_image"]
    gain, gap = dq["psnr"] - coarse["psnr"], fine["psnr"] - dq["psnr"]
    result[name] = dict(
        psnr_gain_over_coarse_db=gain, codes_over_coarse=dq["codes_per_image"]
        / coarse["codes_per_image"], psnr_gap_to_fine_db=gap,
        codes_over_fine=dq["codes_per_image"] / fine["codes_per_image"],
        psnr_gap_closed=gain / span if span else None,
        codes_gap_spent=(dq["codes_per_image"] - coarse["codes_per_image"]) / code_span,
        beats_coarse_clearly=bool(gain >= CLEAR_MARGIN_DB), close_to_fine=bool(gap <= CLOSE_DB))
    entropy = rows.get("entropy_0.5")
    if dq.get("router") == "feature" and entropy is not None:
      result[name].update(router_acceptance(dq, entropy, fine))
  return result


def router_acceptance(learned: dict, entropy: dict, fine: dict) -> dict:
  """Issue 15's bar for a learned router at fine ratio 0.5 (means over seeds): PSNR >= the
  entropy router's and >= fixed fine - 0.1 dB, fine regions on detail with precision >= 0.40,
  LPIPS no worse than the entropy router's (when measured)."""
  precision = learned.get("detail_precision")
  checks = dict(
      psnr_minus_entropy_db=learned["psnr"] - entropy["psnr"],
      psnr_minus_fine_db=learned["psnr"] - fine["psnr"],
      psnr_at_least_entropy=bool(learned["psnr"] >= entropy["psnr"]),
      psnr_within_0_1db_of_fine=bool(learned["psnr"] >= fine["psnr"] - ROUTER_FINE_SLACK_DB),
      detail_precision_at_least=bool(precision is not None
                                     and precision >= ROUTER_DETAIL_PRECISION))
  if learned.get("lpips") is not None and entropy.get("lpips") is not None:
    checks["lpips_no_worse_than_entropy"] = bool(learned["lpips"] <= entropy["lpips"])
  checks["router_bar_met"] = all(v for k, v in checks.items() if isinstance(v, bool))
  return checks


def _clean(value: Any) -> Any:
  """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _yes_no(flag: bool) -> str:
  return "yes" if flag else "no"


def _fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _pm(row: dict, key: str, digits: int = 3) -> str:
  """'mean ± std' of a field over seeds ('mean' alone with one seed)."""
  if row.get(key) is None:
    return "-"
  if len(row.get("seeds", [])) > 1 and row.get(f"{key}_std") is not None:
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"
  return _fmt(row[key], digits)


def markdown(doc: dict) -> str:
  """claims.md: the stage-1 table, the sampling table, the acceptance reading and timings."""
  s = doc["settings"]
  lines = [f"# Claims benchmark ({s['mode']} mode)", "",
           f"Embedded data at {s['image_size']} px; every stage-1 model: {s['vae_steps']} steps, "
           f"batch {s['vae_batch']}, codebook {s['model']['codebook_size']}, widths "
           f"{s['model']['ch']}x{list(s['model']['ch_mult'])}; held-out images: "
           f"{s['eval_images']}." + (
               " Short budget: the models are far from converged, so this table checks the "
               "pipeline; it is not evidence for or against the claims." if s["mode"] != "full"
               else ""), "",
           f"Mean ± std over seeds {s['seeds']} (same data order per seed for every model). "
           "Router margin: mean gap between the learned router's two logits on held-out "
           "regions; routing change: fraction of held-out regions whose grain changed over the "
           "last fifth of training.", "",
           "| model | router | target fine | fine ratio (eval) | codes/image | PSNR | SSIM | "
           "LPIPS | rFID | detail precision | detail recall | router margin | routing change "
           "| train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, row in doc["models"].items():
    train_s = [v for k, v in doc["phases_seconds"].items()
               if k.startswith(f"vae/{name}/seed") and k.endswith("/train")]
    lines.append(
        f"| {name} | {row['router']} | {_fmt(row['target_fine_ratio'], 2)} | "
        f"{_fmt(row['fine_ratio_mean'])} | {_fmt(row['codes_per_image'], 1)} | "
        f"{_pm(row, 'psnr', 2)} | {_pm(row, 'ssim')} | {_pm(row, 'lpips')} | "
        f"{_fmt(row['rfid'], 2)} | {_pm(row, 'detail_precision')} | "
        f"{_fmt(row['detail_recall'])} | {_fmt(row.get('router_margin_mean'), 2)} | "
        f"{_fmt(row.get('routing_change_last'))} | "
        f"{_fmt(float(np.mean(train_s)) if train_s else None, 0)} |")
  notes = {row.get(k) for row in doc["models"].values() for k in ("lpips_note", "rfid_note")}
  lines += [""] + [f"- {note}" for note in sorted(n for n in notes if n)]
  stage2 = doc.get("stage2")
  if stage2:
    lines += ["", f"Sampling (KV-cached, batch {stage2['dq']['batch']}, "
              f"{s['transformer_steps']} training steps each; transformer "
              f"{s['transformer']}):", "",
              "| sequence model | stage 1 | tokens sampled (mean / max) | tokens in data | "
              "s/image | final content loss |", "|---|---|---|---|---|---|"]
    for name in ("dq", "fixed_fine"):
      row = stage2[name]
      lines.append(f"| {name} | {row['stage1']} | {_fmt(row['tokens_mean'], 1)} / "
                   f"{row['tokens_max']} | {_fmt(row['data_tokens_mean'], 1)} | "
                   f"{_fmt(row['seconds_per_image'], 4)} | "
                   f"{_fmt(row['train_final'].get('content_loss'))} |")
    lines += ["", f"Fixed grid / DQ: {_fmt(stage2['fixed_over_dq_seconds'], 2)}x the sampling "
              f"time, {_fmt(stage2['fixed_over_dq_tokens'], 2)}x the tokens. Baseline: "
              f"{stage2['baseline']}."]
  lines += ["", f"Acceptance (clear margin >= {CLEAR_MARGIN_DB} dB, close <= {CLOSE_DB} dB):"]
  for name, check in doc["acceptance"].items():
    if name == "skipped":
      lines.append(f"- skipped: {check}")
    if isinstance(check, dict):
      lines.append(
          f"- {name}: PSNR - fixed_coarse = {_fmt(check['psnr_gain_over_coarse_db'], 2)} dB at "
          f"{_fmt(check['codes_over_coarse'], 2)}x its codes (clear gain: "
          f"{_yes_no(check['beats_coarse_clearly'])}); PSNR - fixed_fine = "
          f"{_fmt(-check['psnr_gap_to_fine_db'], 2)} dB at "
          f"{_fmt(100 * check['codes_over_fine'], 0)}% of its codes (close: "
          f"{_yes_no(check['close_to_fine'])}); it closes "
          f"{_fmt(check['psnr_gap_closed'], 2)} of the fixed_coarse -> fixed_fine PSNR difference "
          f"with {_fmt(check['codes_gap_spent'], 2)} of the extra codes.")
      if "router_bar_met" in check:
        lines.append(
            f"  - learned-router bar (issue 15): PSNR - entropy_0.5 = "
            f"{_fmt(check['psnr_minus_entropy_db'], 2)} dB, PSNR - fixed_fine = "
            f"{_fmt(check['psnr_minus_fine_db'], 2)} dB (>= -{ROUTER_FINE_SLACK_DB}), detail "
            f"precision >= {ROUTER_DETAIL_PRECISION}: "
            f"{_yes_no(check['detail_precision_at_least'])}, LPIPS <= entropy's: "
            f"{_yes_no(check.get('lpips_no_worse_than_entropy', False))}; met: "
            f"{_yes_no(check['router_bar_met'])}.")
  lines += ["", f"Total {doc['total_seconds']:.0f} s on {doc['device']} "
            f"({doc['cpu_count']} CPUs). Phases (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in doc["phases_seconds"].items()) + "."]
  return "\n".join(lines) + "\n"


def run_claims(settings: Settings, workdir: str, stage2: bool = True) -> dict:
  """Runs every phase, writes WORKDIR/claims.json and claims.md, returns the document."""
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  names = [spec["name"] for spec in model_specs(settings)]
  if stage2 and not {settings.dq_model, "fixed_fine"} <= set(names):
    raise ValueError(f"stage 2 needs the stage-1 models {settings.dq_model} and fixed_fine; "
                     f"the models are {names} (add them, or turn stage 2 off)")
  _check_workdir(workdir, settings)
  clock = PhaseClock()
  rows, configs = train_stage1(settings, workdir, clock)
  doc = {"benchmark": "claims", "mode": settings.mode, "settings": settings.to_json(),
         "models": rows, "acceptance": acceptance(rows)}
  if stage2:
    doc["stage2"] = run_stage2(settings, workdir, configs, rows, clock)
  doc.update({
      "phases_seconds": clock.seconds, "total_seconds": round(time.perf_counter() - start, 2),
      "workdir": workdir, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
      "platform": platform.processor() or platform.machine(), "jax": jax.__version__})
  doc = _clean(doc)
  with open(os.path.join(workdir, "claims.json"), "w") as f:
    json.dump(doc, f, indent=1)
  with open(os.path.join(workdir, "claims.md"), "w") as f:
    f.write(markdown(doc))
  return doc


def main(argv: Optional[list[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="~10-15 minutes on 2 CPU cores")
  group.add_argument("--smoke", action="store_true", help="seconds per model (tests)")
  parser.add_argument("--workdir", default="", help="default /tmp/dq_claims_<mode>")
  parser.add_argument("--vae_steps", type=int, default=0, help="override the mode's steps")
  parser.add_argument("--transformer_steps", type=int, default=0)
  parser.add_argument("--rfid_images", type=int, default=-1,
                      help="held-out images for rFID (0: off); default: the mode's")
  parser.add_argument("--models", default="",
                      help="comma-separated subset of the stage-1 models (default: all)")
  parser.add_argument("--no_stage2", action="store_true", help="stage-1 models only")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds (each model once "
                      "per seed; tables show mean ± std)")
  parser.add_argument("--recipes", default="feature", help="comma-separated learned-router "
                      f"recipes trained at every feature ratio; from {sorted(RECIPES)}")
  parser.add_argument("--dq_model", default=DQ_MODEL,
                      help="the stage-1 model whose tokens the DQ-Transformer learns")
  args = parser.parse_args(argv)
  mode = "quick" if args.quick else "smoke" if args.smoke else "full"
  settings = settings_for(mode, args.vae_steps, args.transformer_steps, args.rfid_images,
                          models=tuple(filter(None, args.models.split(","))),
                          seeds=tuple(int(x) for x in args.seeds.split(",")),
                          recipes=tuple(filter(None, args.recipes.split(","))),
                          dq_model=args.dq_model)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)
  doc = run_claims(settings, args.workdir or f"/tmp/dq_claims_{mode}",
                   stage2=not args.no_stage2)
  print(json.dumps(doc))
  return doc


if __name__ == "__main__":
  main()
