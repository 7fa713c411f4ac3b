"""Sampler input checks: a stage-2 checkpoint paired with another DQ-VAE (codebook, grid) or
sequence length, class ids, guidance on an unconditional model, top-k / top-p / temperature
ranges and batch sizes all fail with a message naming the field, before anything compiles."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq import generator as gen
from dq.models.build import build_dqvae
from dq.stage2 import sampler as smp
from dq.stage2.build import build_transformer
from dq.stage2.layout import TokenLayout
from dq.stage2.sampler_checks import check_checkpoint_matches_layout
from dq.official.dqvae import save_converted
from dq import checkpoint as ckpt
from dq.train import transformer_sample
from dq.train import transformer_step as ts
from dq.train import transformer_trainer as tt
from dq.train.loop import save_config
from stage1_util import random_variables, tiny_model_config
from stage2_util import tiny_config

NUM_CLASSES = 9  # the embedded data's classes


def save_stage1(directory: str, seed: int = 0, **model) -> str:
  """A random (uncalibrated) tiny DQ-VAE as a converted folder: 32 px, coarse 4x4, fine 8x8,
  K=16 unless `model` overrides config.model fields."""
  cfg = tiny_model_config()
  cfg.update(model)
  save_converted(directory, random_variables(build_dqvae(cfg), cfg, seed=seed), cfg.to_dict())
  return directory


def save_stage2_run(workdir: str, stage1_dir: str, class_conditional: bool) -> TokenLayout:
  """A stage-2 workdir (config.json + a step-1 checkpoint of freshly initialised params)
  trained against `stage1_dir`; returns its token layout."""
  config = stage2_config(stage1_dir, class_conditional)
  stage1 = gen.load_stage1(config)
  layout = gen.make_layout(config, stage1, gen.resolve_data_config(config, stage1))
  model = build_transformer(config.model, layout)
  tx, _ = ts.make_transformer_optimizer(config.optim, config.train.num_steps)
  state = jax.jit(ts.make_init_fn(model, tx, layout))(jax.random.PRNGKey(0))
  manager = ckpt.make_manager(workdir, async_save=False)
  ckpt.save(manager, 1, state, None)
  manager.wait_until_finished()
  tt.record_stage1(workdir, stage1)  # as the trainer does
  config.stage = "transformer"
  save_config(config, workdir)
  return layout


def stage2_config(stage1_dir: str, class_conditional: bool = True):
  config = tiny_config(stage1_dir, 1)
  config.mode = "sample"
  config.class_conditional = class_conditional
  config.sample.labels = "0,3" if class_conditional else ""
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Stage-1 folders (the one stage 2 was trained with, one with another codebook, one with
  other grids, one of the same shapes with other weights) and conditional / unconditional
  stage-2 workdirs trained against the first."""
  base = tmp_path_factory.mktemp("sampler_checks")
  stage1 = {"trained": save_stage1(str(base / "vae")),
            "codebook32": save_stage1(str(base / "vae_k32"), codebook_size=32),
            "grid8x16": save_stage1(str(base / "vae_64px"), resolution=64),
            "reseeded": save_stage1(str(base / "vae_seed1"), seed=1)}
  workdirs = {"cond": str(base / "cond"), "uncond": str(base / "uncond")}
  layouts = {"cond": save_stage2_run(workdirs["cond"], stage1["trained"], True),
             "uncond": save_stage2_run(workdirs["uncond"], stage1["trained"], False)}
  return dict(stage1=stage1, workdirs=workdirs, layouts=layouts)


def _sample(runs, run: str, stage1: str = "trained", **sample):
  config = stage2_config(runs["stage1"][stage1], class_conditional=run == "cond")
  config.sample.update(sample)
  return transformer_sample.sample(config, runs["workdirs"][run])


def test_layouts_of_the_runs(runs):
  assert runs["layouts"]["cond"] == TokenLayout(4, 8, 16, num_classes=NUM_CLASSES)
  assert runs["layouts"]["uncond"] == TokenLayout(4, 8, 16)


@pytest.mark.parametrize("stage1", ["codebook32", "grid8x16"])
def test_sample_mode_refuses_a_stage1_the_checkpoint_was_not_trained_with(runs, stage1):
  # The checkpoint's embeddings are sized by the stage-1 codebook and grids it was trained
  # with; sample mode names the checkpoint, the mismatch and config.stage1.path.
  workdir = re.escape(runs["workdirs"]["cond"])
  with pytest.raises(ValueError, match=rf"checkpoint {workdir} does not fit the token layout "
                     r"\(trained for another one\): .*config\.stage1\.path"):
    _sample(runs, "cond", stage1=stage1)


def test_sample_mode_refuses_a_stage1_of_the_same_shapes_with_other_weights(runs):
  # Shapes cannot tell this one apart; the tokenizer fingerprint the run recorded can.
  with pytest.raises(ValueError, match=re.escape(
      f"the transformer in {runs['workdirs']['cond']} was trained on tokens of the stage-1 "
      f"model {runs['stage1']['trained']} (tokenizer fingerprint ")):
    _sample(runs, "cond", stage1="reseeded")


def _restored_params(runs, run: str):
  return ckpt.restore_params_from(runs["workdirs"][run])["params"]


LAYOUT_MISMATCHES = {
    "codebook": (TokenLayout(4, 8, 32, NUM_CLASSES),
                 "content vocabulary: checkpoint 29 ids, expected 45 (codebook_size=32 + 3 "
                 "special ids + 10 class ids). config.stage1.path must be the DQ-VAE the "
                 "transformer was trained with (same codebook size and grids), with the same "
                 "classes (config.class_conditional, data) and config.tokens.max_len"),
    "grids": (TokenLayout(8, 16, 16, NUM_CLASSES),
              "coarse positions: checkpoint 19 ids, expected 67 (64 cells of the 8x8 coarse grid "
              "+ 3 special ids); fine positions: checkpoint 67 ids, expected 259 (256 cells of "
              "the 16x16 fine grid + 3 special ids); sequence length: checkpoint 68 tokens, "
              "expected 260 (tokens.max_len=260)"),
    # A class-conditional checkpoint sampled as unconditional.
    "classes": (TokenLayout(4, 8, 16),
                "content vocabulary: checkpoint 29 ids, expected 19 (codebook_size=16 + 3 "
                "special ids)"),
    "max_len": (TokenLayout(4, 8, 16, NUM_CLASSES, max_len=40),
                "sequence length: checkpoint 68 tokens, expected 40 (tokens.max_len=40)"),
}


@pytest.mark.parametrize("mismatch", sorted(LAYOUT_MISMATCHES))
def test_checkpoint_layout_check_names_the_mismatch(runs, mismatch):
  params = _restored_params(runs, "cond")
  source = f"checkpoint {runs['workdirs']['cond']}"
  check_checkpoint_matches_layout(params, runs["layouts"]["cond"], source)  # fits
  layout, message = LAYOUT_MISMATCHES[mismatch]
  with pytest.raises(ValueError, match=re.escape(
      f"{source} does not fit the token layout (trained for another one): ") + ".*"
                     + re.escape(message)):
    check_checkpoint_matches_layout(params, layout, source)


def test_checkpoint_layout_check_refuses_trees_that_are_not_params(runs):
  params = _restored_params(runs, "cond")
  with pytest.raises(ValueError, match=r"pass the params tree itself, not \{'params': \.\.\.\}"):
    check_checkpoint_matches_layout({"params": params}, runs["layouts"]["cond"])
  with pytest.raises(ValueError, match="has no content_emb/embedding: not a DQ-Transformer"):
    check_checkpoint_matches_layout({"pos_emb": params["pos_emb"]}, runs["layouts"]["cond"])


@pytest.mark.parametrize("labels,message", [
    ("0,10", r"config.sample.labels='0,10': labels must lie in \[0, 9\] \(9 = null class\)"),
    ("-1", r"config.sample.labels='-1': labels must lie in \[0, 9\]"),
    ("cat", r"config.sample.labels='cat': expected comma-separated ints"),
    (",", r"config.sample.labels=',': labels must lie in \[0, 9\]"),
])
def test_sample_mode_class_ids(runs, labels, message):
  with pytest.raises(ValueError, match=message):
    _sample(runs, "cond", labels=labels)


def test_sample_mode_labels_on_an_unconditional_model(runs):
  with pytest.raises(ValueError, match=r"config.sample.labels='2' but the model is "
                                       r"unconditional \(config.class_conditional=False\)"):
    _sample(runs, "uncond", labels="2")


def test_sample_mode_guidance_on_an_unconditional_model(runs):
  with pytest.raises(ValueError, match=re.escape(
      "sample.guidance_scale=3.0 needs a class-conditional model, and this one is "
      "unconditional (num_classes=0); set it to 1.0 (no guidance)")):
    _sample(runs, "uncond", guidance_scale=3.0)


@pytest.mark.parametrize("field,value,message", [
    ("content_top_k", 20, "sample.content_top_k=20 exceeds the content vocabulary of the model "
                          "(19 ids: codebook_size=16 + 3 special ids); use 0 (off) or at most 19"),
    ("position_top_k", 100, "sample.position_top_k=100 exceeds the position vocabulary of the "
                            "model (67 ids: 64 fine cells + 3 special ids); use 0 (off) or at "
                            "most 67"),
    ("content_top_k", -2, "sample.content_top_k must be an int >= 0 (0 = off); got -2"),
    ("position_top_p", 0.0, "sample.position_top_p must lie in (0, 1] (1 = off); got 0.0"),
    ("content_top_p", 1.5, "sample.content_top_p must lie in (0, 1] (1 = off); got 1.5"),
    ("content_temperature", -1.0, "sample.content_temperature must be a finite value >= 0; "
                                  "got -1.0"),
    ("position_temperature", float("inf"), "sample.position_temperature must be a finite "
                                           "value >= 0; got inf"),
    ("guidance_scale", -1.0, "sample.guidance_scale must be a finite value >= 0 (1 = no "
                             "guidance); got -1.0"),
    ("fine_order", "column", "sample.fine_order must be one of ('row', 'region'); got "
                             "'column'"),
    ("num_images", 0, "config.sample.num_images=0 and config.sample.batch_size=4 must be >= 1"),
])
def test_sample_mode_setting_ranges(runs, field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _sample(runs, "uncond", **{field: value})


def test_stage1_path_pointing_at_a_stage2_run(runs):
  config = stage2_config(runs["workdirs"]["cond"])
  with pytest.raises(ValueError, match=re.escape(
      f"{runs['workdirs']['cond']}/config.json is the config of a 'transformer' run, not of a "
      "stage-1 DQ-VAE (config.stage='vae')")):
    transformer_sample.sample(config, runs["workdirs"]["cond"])


@pytest.fixture(scope="module")
def sampler_env(runs):
  layout = runs["layouts"]["cond"]
  model = build_transformer(stage2_config("").model, layout)
  return layout, model, _restored_params(runs, "cond")


def test_make_sampler_refuses_inputs_that_do_not_fit(runs, sampler_env):
  layout, model, params = sampler_env
  sampler = smp.make_sampler(model, layout)
  rng = jax.random.PRNGKey(0)
  cases = [
      (np.array([0, 10], np.int32), r"labels must lie in \[0, 9\] \(9 = null class\); got "
                                    r"range \[0, 10\]"),
      (np.array([0.5, 1.0]), "labels must be a non-empty 1-D integer array; got float64 \\(2,\\)"),
      (np.zeros((2, 2), np.int32), "labels must be a non-empty 1-D integer array"),
      (np.zeros((0,), np.int32), "labels must be a non-empty 1-D integer array"),
      (4, r"the model is class-conditional \(9 classes\): pass labels \[B\]"),
  ]
  for labels, message in cases:
    with pytest.raises(ValueError, match=message):
      sampler(params, rng, labels)
  with pytest.raises(ValueError, match=re.escape(
      "the transformer params tree does not fit the token layout (trained for another one): "
      "content vocabulary: checkpoint 29 ids")):
    smp.make_sampler(build_transformer(stage2_config("").model, runs["layouts"]["uncond"]),
                     runs["layouts"]["uncond"])(params, rng, 2)
  with pytest.raises(ValueError, match="pass the params tree itself"):
    sampler({"params": params}, rng, np.array([0], np.int32))
  uncond = runs["layouts"]["uncond"]
  uncond_sampler = smp.make_sampler(build_transformer(stage2_config("").model, uncond), uncond)
  uncond_params = _restored_params(runs, "uncond")
  for batch in (0, -3):
    with pytest.raises(ValueError, match=f"batch size must be >= 1; got {batch}"):
      uncond_sampler(uncond_params, rng, batch)
  with pytest.raises(ValueError, match="labels given, but the model is unconditional"):
    uncond_sampler(uncond_params, rng, np.array([1], np.int32))


def test_make_sampler_refuses_a_model_of_another_layout(sampler_env):
  layout, model, _ = sampler_env
  other = TokenLayout(4, 8, 32, NUM_CLASSES)
  with pytest.raises(ValueError, match=re.escape(
      "model vocab_size=29 but the token layout needs 45; build the model with "
      "build_transformer(config, layout)")):
    smp.make_sampler(model, other)
  with pytest.raises(ValueError, match=re.escape(
      "sample.content_top_k=46 exceeds the content vocabulary of the model (45 ids: "
      "codebook_size=32 + 3 special ids + 10 class ids)")):
    smp.make_sampler(build_transformer(stage2_config("").model, other), other,
                     smp.SamplingConfig(content_top_k=46))
  # top-k equal to the vocabulary is allowed (the same as off); guidance on a conditional one.
  smp.make_sampler(model, layout, smp.SamplingConfig(content_top_k=layout.content_vocab_size,
                                                     guidance_scale=0.0))


def test_sampler_checks_run_before_compiling(sampler_env, monkeypatch):
  layout, model, params = sampler_env
  sampler = smp.make_sampler(model, layout)

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before checking")
  monkeypatch.setattr(smp, "run_sampling", no_compile)
  with pytest.raises(ValueError, match="labels must lie in"):
    sampler(params, jax.random.PRNGKey(0), jnp.array([12], jnp.int32))
  with pytest.raises(ValueError, match=re.escape(
      "sample.content_top_k must be an int >= 0 (0 = off); got 2.5")):
    smp.SamplingConfig(content_top_k=2.5)
