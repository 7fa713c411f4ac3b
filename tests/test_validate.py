"""dq.validate: every rule fails with field, value and expectation; shipped configs pass.

Stage-2 and FID configs point at models by path; the shipped-config test gives them stand-in
runs (the `config.json` a stage-1 / stage-2 run writes, from the matching shipped config) and
stand-in data folders, so every rule runs, the path rules included, and none may fire.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dq.stage2 import token_data
from dq.validate import ConfigError, validate_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def load_config(name, arg=None):
  """`get_config(arg)` of configs/NAME, imported without config_flags, unlocked (these tests
  put unknown keys in to see the checker name them; the base configs are locked)."""
  spec = importlib.util.spec_from_file_location("cfg", CONFIG_DIR / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def failures(config):
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert str(info.value) == "\n".join(info.value.failures)
  return list(info.value.failures)


def assert_fails(config, field, value, expectation):
  """The failure line of `field`: `field = repr(value): ...expectation...`."""
  lines = failures(config)
  hits = [line for line in lines if line.startswith(f"{field} = {value!r}:")]
  assert hits, lines
  assert expectation in hits[0], hits[0]
  return hits[0]


def write_run(workdir, config):
  """A run folder as a trainer leaves it (config.json and an empty checkpoints/1 folder: the
  rules look for a checkpoint but read none)."""
  os.makedirs(os.path.join(workdir, "checkpoints", "1"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  return str(workdir)


def write_converted_dqvae(folder, model_cfg):
  """A converted DQ-VAE folder: model_config.json and a (dummy) params.npz."""
  os.makedirs(folder, exist_ok=True)
  np.savez(os.path.join(folder, "params.npz"), **{"params/x": np.zeros(1)})
  with open(os.path.join(folder, "model_config.json"), "w") as f:
    json.dump(model_cfg.to_dict(), f)
  return str(folder)


@pytest.fixture
def demo_stage1(tmp_path):
  """A stand-in demo DQ-VAE run: 64 px, coarse 8x8, fine 16x16, codebook 256."""
  return write_run(tmp_path / "demo_vae", load_config("demo_vae.py"))


def demo_transformer(stage1):
  return load_config("demo_transformer.py", f"stage1={stage1}")


# --- shipped configs ---------------------------------------------------------------------------

VAE_CASES = [("demo_vae.py", None), ("demo_vae.py", "entropy"), ("ffhq_vae.py", None),
             ("ffhq_vae.py", "tiny"), ("ffhq_vae.py", "entropy,triple"),
             ("ffhq_vae.py", "tiny,triple"), ("ffhq_vae.py", "embedded"),
             ("imagenet_vae.py", None), ("imagenet_vae.py", "tfds"),
             ("imagenet_vae.py", "tiny,triple,entropy"), ("imagenet_vae.py", "embedded")]
# (transformer config, its arg, the stage-1 config it is trained on, that config's arg)
TRANSFORMER_CASES = [("demo_transformer.py", "", "demo_vae.py", None),
                     ("demo_transformer.py", "steps=10", "demo_vae.py", "entropy"),
                     ("ffhq_transformer.py", "", "ffhq_vae.py", None),
                     ("ffhq_transformer.py", "tiny", "ffhq_vae.py", "tiny"),
                     ("ffhq_transformer.py", "tiny,embedded", "ffhq_vae.py", "tiny,embedded"),
                     ("imagenet_transformer.py", "", "imagenet_vae.py", None),
                     ("imagenet_transformer.py", "tfds", "imagenet_vae.py", "tfds"),
                     ("imagenet_transformer.py", "tiny,embedded", "imagenet_vae.py",
                      "tiny,embedded")]
FID_CASES = [("fid_demo.py", mode) for mode in ("reference", "stage1", "stage2")] + [
    ("fid_ffhq.py", mode) for mode in ("reference", "stage1", "stage2")] + [
    ("fid_imagenet.py", mode) for mode in ("reference", "stage1", "stage2")]


def fill_data_folders(config, folder):
  """What the command line adds: --config.data.folder.train_path=DIR (and eval_path)."""
  if config.data.name == "folder" and not config.data.folder.train_path:
    config.data.folder.train_path = str(folder)
  return config


def stage1_run(tmp_path, name, arg):
  """A stand-in stage-1 run of configs/NAME:ARG (plus its entropy threshold table)."""
  config = load_config(name, arg)
  workdir = write_run(tmp_path / f"{name}_{arg}".replace(",", "_"), config)
  if config.model.router.kind == "entropy":
    with open(os.path.join(workdir, "entropy_thresholds.json"), "w") as f:
      f.write("{}")
  return workdir


def test_every_config_file_is_covered():
  covered = {case[0] for case in VAE_CASES + TRANSFORMER_CASES + FID_CASES}
  assert covered == {p.name for p in CONFIG_DIR.glob("*.py")}


@pytest.mark.parametrize("name,arg", VAE_CASES)
def test_shipped_vae_configs_pass(name, arg, tmp_path):
  validate_config(fill_data_folders(load_config(name, arg), tmp_path))


@pytest.mark.parametrize("name,arg,stage1_name,stage1_arg", TRANSFORMER_CASES)
def test_shipped_transformer_configs_pass(name, arg, stage1_name, stage1_arg, tmp_path):
  stage1 = stage1_run(tmp_path, stage1_name, stage1_arg)
  config = load_config(name, ",".join(filter(None, [arg, f"stage1={stage1}"])))
  validate_config(fill_data_folders(config, tmp_path))


@pytest.mark.parametrize("name,mode", FID_CASES)
def test_shipped_fid_configs_pass(name, mode, tmp_path):
  stage1_name = "demo_vae.py" if name == "fid_demo.py" else "ffhq_vae.py"
  stage1 = stage1_run(tmp_path, stage1_name, None)
  transformer = load_config("demo_transformer.py", f"stage1={stage1}")
  stage2 = write_run(tmp_path / "stage2", transformer)
  args = {"stage1": f"stage1={stage1}", "stage2": f"stage2={stage2}", "reference": ""}[mode]
  if name != "fid_demo.py":
    args = ",".join(filter(None, [args, f"data={tmp_path}"]))
  if name == "fid_imagenet.py":
    args += f",eval_data={tmp_path}"
  config = load_config(name, args)
  config.mode = mode
  validate_config(config)


def test_shipped_configs_without_paths_fail_only_on_paths():
  lines = failures(load_config("demo_transformer.py"))
  assert len(lines) == 1 and lines[0].startswith("config.stage1.path = '': expected a stage-1")
  lines = failures(load_config("ffhq_vae.py"))
  assert len(lines) == 1 and lines[0].startswith("config.data.folder.train_path = '':")


# --- rule 1: unknown keys ----------------------------------------------------------------------


@pytest.mark.parametrize("name,arg", [("demo_vae.py", None), ("ffhq_vae.py", "tiny,triple"),
                                      ("demo_transformer.py", "stage1=x"),
                                      ("fid_demo.py", None)])
def test_shipped_configs_are_locked_so_a_typo_fails_where_it_is_written(name, arg):
  spec = importlib.util.spec_from_file_location("cfg", CONFIG_DIR / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with pytest.raises(AttributeError, match='Did you mean "mode"'):
    config.mdoe = "eval"
  with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
    config.data.imagesize = 32
  config.data.image_size = 32      # existing fields keep their values' types and can change
  assert config.data.image_size == 32
  with pytest.raises(TypeError):
    config.data.image_size = "large"


def test_unknown_keys_are_named_with_the_closest_known_key():
  config = load_config("demo_vae.py")
  config.train.num_stepz = 5
  config.model.routr = {"kind": "entropy"}
  config.sead = 1
  config.model.router.fine_ratoi = 0.3
  lines = failures(config)
  assert len(lines) == 4, lines
  assert_fails(config, "config.train.num_stepz", 5, "unknown key; expected a field of "
               "config.train (did you mean 'num_steps'?)")
  assert_fails(config, "config.model.routr", {"kind": "entropy"}, "did you mean 'router'?")
  assert_fails(config, "config.sead", 1, "unknown key; expected a field of config (did you mean "
               "'seed'?)")
  assert_fails(config, "config.model.router.fine_ratoi", 0.3, "did you mean 'fine_ratio'?")


def test_unknown_key_without_a_close_match_lists_the_known_keys(demo_stage1):
  config = demo_transformer(demo_stage1)
  config.tokens.zzz = 1
  line = assert_fails(config, "config.tokens.zzz", 1, "known keys: dir, encode_batch_size")
  assert "did you mean" not in line


def test_mesh_axes_and_sharding_rules():
  config = load_config("demo_vae.py")
  config.sharding.rules = [(r".*/kernel", (None, "fsdp")), (r"embed", (("data", "fsdp"),))]
  config.mesh.update(dict(data=2, fsdp=4))
  validate_config(config)
  config.mesh.dta = 2
  assert_fails(config, "config.mesh.dta", 2, "did you mean 'data'?")
  assert_fails(config, "config.mesh", {"data": 2, "dta": 2, "fsdp": 4, "tensor": 1},
               "unknown axes ['dta']")
  config = load_config("demo_vae.py")
  config.sharding.rules = [(r".*/kernel", (None, "model")), (r"([", (None,)), "nonsense"]
  assert_fails(config, "config.sharding.rules[0]", (None, "model"),
               "expected mesh axes from ('data', 'fsdp', 'tensor') or None; unknown ['model']")
  assert_fails(config, "config.sharding.rules[1]", "([", "expected a valid regular expression")
  assert_fails(config, "config.sharding.rules[2]", "nonsense", "expected a [regex, partition "
               "spec] pair")


# --- rule 2: image sizes and downsampling ------------------------------------------------------


def test_image_size_must_be_a_multiple_of_the_coarse_factor():
  config = load_config("demo_vae.py")
  config.data.image_size = config.model.resolution = 60
  lines = failures(config)
  for field in ("config.model.resolution", "config.data.image_size"):
    assert_fails(config, field, 60, "expected a multiple of the coarsest downsampling factor 8 "
                 "= 2**(len(model.ch_mult) - 1)")
  assert len(lines) == 2, lines


def test_triple_grain_needs_the_extra_factor():
  config = load_config("ffhq_vae.py", "tiny,triple,embedded")
  validate_config(config)
  config.data.image_size = config.model.resolution = 48  # a multiple of 16, not of 32
  assert_fails(config, "config.model.resolution", 48, "factor 32 = 2**(len(model.ch_mult) - 1) "
               "(ch_mult (1, 1, 2, 2, 4, 4), 3 grains: F=32/16/8)")


def test_decoder_and_attention_must_fit_the_encoder():
  config = load_config("demo_vae.py")
  config.model.dec_ch_mult = (1, 2)
  config.model.attn_resolutions = (5,)
  config.data.image_size = 32
  assert_fails(config, "config.model.dec_ch_mult", (1, 2), "expected 3 levels: the decoder "
               "upsamples by 2**(len - 1) = 2 but the finest grain's factor is 4")
  assert_fails(config, "config.model.attn_resolutions", (5,), "expected resolutions from "
               "(64, 32, 16, 8)")
  assert_fails(config, "config.data.image_size", 32, "expected model.resolution=64")


def test_remaining_model_fields_are_checked_by_build_dqvae():
  config = load_config("demo_vae.py")
  config.model.ch = 12  # widths must be multiples of norm_groups=8
  lines = failures(config)
  assert lines == ["config.model: model config field 'ch' = 12: every width ch*mult must be "
                   "divisible by norm_groups=8 (mults (1, 2, 2, 4))"]


# --- rule 3: grain targets ---------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.5, -0.1])
def test_fine_ratio_in_unit_interval(ratio):
  config = load_config("demo_vae.py")
  config.model.router.fine_ratio = ratio
  assert_fails(config, "config.model.router.fine_ratio", ratio,
               "expected a number [0.0, 1.0]")


def test_triple_grain_ratios_and_grain_count():
  config = load_config("ffhq_vae.py", "tiny,triple,embedded")
  config.model.router.median_ratio = 0.6
  config.model.router.fine_ratio = 0.5
  assert_fails(config, "config.model.router.median_ratio", 0.6,
               "expected median_ratio + fine_ratio <= 1 (fine_ratio 0.5")
  config.model.router.median_ratio = 1.2
  assert_fails(config, "config.model.router.median_ratio", 1.2, "expected a number [0.0, 1.0]")
  config = load_config("demo_vae.py")
  config.model.num_grains = 4
  assert_fails(config, "config.model.num_grains", 4, "expected one of (2, 3)")


# --- rule 4: stage 2 against its stage-1 model -------------------------------------------------


def test_max_len_against_the_stage1_grids(demo_stage1):
  config = demo_transformer(demo_stage1)
  config.tokens.max_len = 68  # 8x8 coarse + 4: the shortest legal sequence
  validate_config(config)
  config.tokens.max_len = 67
  assert_fails(config, "config.tokens.max_len", 67, "expected 0 (the worst case, 260) or >= 68:"
               " the all-coarse sequence of the stage-1 grids (8x8 coarse, 16x16 fine)")


def test_stage2_image_size_and_dual_grain(tmp_path, demo_stage1):
  config = demo_transformer(demo_stage1)
  config.data.image_size = 32
  assert_fails(config, "config.data.image_size", 32, "expected 0 or 64, the image size of the "
               "stage-1 model")
  triple = load_config("ffhq_vae.py", "tiny,triple,embedded")
  path = write_converted_dqvae(tmp_path / "triple", triple.model)
  assert_fails(demo_transformer(path), "config.stage1.path", path,
               "expected a dual-grain DQ-VAE (stage 2 supports num_grains=2); its model has "
               "num_grains=3")


def test_entropy_stage1_needs_its_threshold_table(tmp_path):
  path = write_run(tmp_path / "vae", load_config("demo_vae.py", "entropy"))
  assert_fails(demo_transformer(path), "config.stage1.path", path, "expected the "
               "entropy-router threshold table")


def test_stage1_path_must_be_a_stage1_run(tmp_path, demo_stage1):
  stage2 = write_run(tmp_path / "stage2", demo_transformer(demo_stage1))
  assert_fails(demo_transformer(stage2), "config.stage1.path", stage2,
               "is the config of a 'transformer' run, not of a stage-1 DQ-VAE")


def test_stage1_workdir_without_a_checkpoint_is_named_as_stage1_path(tmp_path, demo_stage1):
  import shutil
  shutil.rmtree(os.path.join(demo_stage1, "checkpoints", "1"))
  line = assert_fails(demo_transformer(demo_stage1), "config.stage1.path", demo_stage1,
                      "expected a stage-1 workdir with a saved checkpoint")
  assert "init_from" not in line
  from dq import tokenizer as stage1_lib
  with pytest.raises(FileNotFoundError) as error:  # the loader, used without the checks
    stage1_lib.load_stage1(demo_stage1)
  assert str(error.value).startswith("stage-1 DQ-VAE: no checkpoint under")
  assert "init_from" not in str(error.value)


def test_converted_init_from_vocabulary_block_size_and_width(tmp_path, demo_stage1):
  folder = tmp_path / "converted"
  os.makedirs(folder)
  np.savez(folder / "params.npz", **{"params/x": np.zeros(1)})
  layout = dict(coarse_size=8, fine_size=16, codebook_size=512, num_classes=0, max_len=101)
  model = dict(n_embd=256, n_head=8, position_layers=2, content_layers=4, block_size=100)
  with open(folder / "transformer_config.json", "w") as f:
    json.dump({"model": model, "layout": layout}, f)
  config = demo_transformer(demo_stage1)
  config.init_from = str(folder)
  lines = failures(config)
  assert_fails(config, "config.init_from", str(folder), "expected a DQ-Transformer of the "
               "stage-1 model's codebook_size=256; ")
  assert_fails(config, "config.class_conditional", True, "expected the class setting of "
               "init_from (0 classes, content vocabulary 515 = codebook 512 + 3 special ids); "
               "this config has 9 classes (vocabulary 269)")
  assert_fails(config, "config.tokens.max_len", 0, "expected a length whose block size "
               "(max_len - 1 = 259) fits the 100 positions")
  assert_fails(config, "config.model.n_embd", 128, "expected 256, the value of init_from")
  assert len(lines) == 4, lines


def test_stage2_run_init_from_class_setting(tmp_path, demo_stage1):
  other = demo_transformer(demo_stage1)
  other.class_conditional = False
  run = write_run(tmp_path / "run", other)
  config = demo_transformer(demo_stage1)
  config.init_from = os.path.join(run, "checkpoints", "100")  # a checkpoint of that run
  os.makedirs(config.init_from)
  assert_fails(config, "config.class_conditional", True, "expected False, the setting of "
               "init_from")


def test_token_meta_must_match_the_layout(tmp_path, demo_stage1):
  config = demo_transformer(demo_stage1)
  config.tokens.dir = str(tmp_path / "tokens_not_made_yet")
  validate_config(config)  # tokens.dir is created by training / encode
  os.makedirs(config.tokens.dir)
  meta = {"format": token_data.META_FORMAT, "coarse_size": [8, 8], "fine_size": [16, 16],
          "codebook_size": 1024, "num_classes": 9, "splits": {}}
  with open(os.path.join(config.tokens.dir, "meta.json"), "w") as f:
    json.dump(meta, f)
  assert_fails(config, "config.tokens.dir", config.tokens.dir, "codebook_size=1024 but the "
               "token layout needs codebook_size=256")


def test_class_labels(tmp_path, demo_stage1):
  config = demo_transformer(demo_stage1)
  config.sample.labels = "0,9,10"
  assert_fails(config, "config.sample.labels", "0,9,10", "expected labels in [0, 9]")
  config.class_conditional = False
  config.sample.labels = "3"
  assert_fails(config, "config.sample.labels", "3", "expected '' for an unconditional model")
  config = demo_transformer(demo_stage1)
  config.data.name = "folder"
  config.data.folder.train_path = str(tmp_path)
  assert_fails(config, "config.class_conditional", True,
               "set data.folder.labels_from_subfolders=True")


def test_transformer_model_fields_via_build_transformer(demo_stage1):
  config = demo_transformer(demo_stage1)
  config.model.n_head = 3
  assert failures(config) == ["config.model.n_embd=128 must be divisible by "
                              "config.model.n_head=3"]


# --- rule 5: batches and the mesh --------------------------------------------------------------


def test_batch_sizes_against_the_mesh():
  config = load_config("demo_vae.py")
  config.train.batch_size = 12
  config.eval.batch_size = 4
  assert_fails(config, "config.train.batch_size", 12, "expected a multiple of the data-parallel "
               "size 8 (mesh data x fsdp = 8 x 1 on 8 devices) and of the process count 1")
  assert_fails(config, "config.eval.batch_size", 4, "data-parallel size 8")
  config.mesh.update(dict(data=2, fsdp=2, tensor=-1))  # data-parallel size 4
  validate_config(config)
  config.mesh.data = 3
  assert_fails(config, "config.mesh", {"data": 3, "fsdp": 2, "tensor": -1},
               "expected sizes >= 1 (one may be -1: the rest) whose product is the 8 devices")


def test_batch_size_against_the_process_count(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  config = load_config("demo_vae.py")
  config.train.batch_size = 16
  config.eval.batch_size = 24
  assert failures(config) == [
      "config.train.batch_size = 16: expected a multiple of the data-parallel size 8 (mesh "
      "data x fsdp = 8 x 1 on 8 devices) and of the process count 3"]


def test_microbatches_divide_the_per_device_batch(demo_stage1):
  config = demo_transformer(demo_stage1)  # batch 16 on 8 devices: 2 per device
  config.train.microbatches = 2
  validate_config(config)
  config.train.microbatches = 4
  assert_fails(config, "config.train.microbatches", 4, "expected a divisor of the per-device "
               "batch 2 (train.batch_size 16 / data-parallel size 8)")
  vae = load_config("demo_vae.py")  # stage 1: batch 8 on 8 devices, 1 per device
  vae.train.microbatches = 2
  assert_fails(vae, "config.train.microbatches", 2, "expected a divisor of the per-device "
               "batch 1 (train.batch_size 8 / data-parallel size 8)")


# --- rule 6: paths -----------------------------------------------------------------------------


def test_paths_that_must_exist(tmp_path):
  missing = str(tmp_path / "missing")
  config = load_config("demo_vae.py")
  config.init_from = missing
  config.model.router.thresholds_path = missing + ".json"
  config.loss.lpips_weights = missing + ".npz"
  lines = failures(config)
  assert_fails(config, "config.init_from", missing, "expected an existing path (a stage-1 "
               "workdir")
  assert_fails(config, "config.model.router.thresholds_path", missing + ".json",
               "expected an existing file (an entropy threshold table")
  assert_fails(config, "config.loss.lpips_weights", missing + ".npz", "expected an existing "
               "file (LPIPS weights")
  assert len(lines) == 3, lines
  config = load_config("ffhq_vae.py", "tiny")
  config.data.folder.train_path = missing
  assert_fails(config, "config.data.folder.train_path", missing, "expected an existing folder "
               "(the training image folder); it does not exist")
  assert_fails(demo_transformer(missing), "config.stage1.path", missing,
               "expected an existing stage-1 workdir or converted DQ-VAE folder")


def test_vae_init_from_shapes(tmp_path):
  config = load_config("demo_vae.py")
  other = load_config("demo_vae.py")
  other.model.ch = 32
  config.init_from = write_converted_dqvae(tmp_path / "converted", other.model)
  assert_fails(config, "config.model.ch", 16, "expected 32, the value of the init_from "
               "checkpoint")
  config.init_from = write_run(tmp_path / "run", load_config("demo_vae.py"))
  validate_config(config)


def test_fid_paths_and_sizes(tmp_path):
  config = load_config("fid_demo.py")
  config.mode = "stage1"
  assert_fails(config, "config.stage1.path", "", "expected a stage-1 DQ-VAE")
  config.mode = "reference"
  config.data.image_size = 0
  config.fid.inception_weights = str(tmp_path / "missing.npz")
  assert_fails(config, "config.data.image_size", 0, "expected an int >= 1")
  assert_fails(config, "config.fid.inception_weights", str(tmp_path / "missing.npz"),
               "expected an existing file")
  stage1 = write_run(tmp_path / "vae", load_config("demo_vae.py"))
  config = load_config("fid_demo.py", f"stage1={stage1}")
  config.mode = "stage1"
  config.data.image_size = 128
  assert_fails(config, "config.data.image_size", 128, "expected 0 or 64")


# --- rule 7: misc ------------------------------------------------------------------------------


def test_misc_fields_all_reported_at_once():
  config = load_config("demo_vae.py")
  config.mode = "sample"
  config.train.num_steps = 0
  config.train.log_every = 0
  config.train.checkpoint_every = -5
  config.optim.lr = 0.0
  config.optim.name = "sgd"
  config.loss.disc_loss = "wasserstein"
  config.loss.disc_weight = 0.5
  lines = failures(config)
  assert_fails(config, "config.mode", "sample", "expected one of ('train', 'eval')")
  assert_fails(config, "config.train.num_steps", 0, "expected an int >= 1")
  assert_fails(config, "config.train.log_every", 0, "expected an int >= 1")
  assert_fails(config, "config.train.checkpoint_every", -5, "expected an int >= 1")
  assert_fails(config, "config.optim.lr", 0.0, "expected a number > 0.0")
  assert_fails(config, "config.optim.name", "sgd", "expected one of ('adam', 'adamw')")
  assert_fails(config, "config.loss.disc_loss", "wasserstein",
               "expected one of ('hinge', 'non_saturating')")
  assert len(lines) == 7, lines


def test_transformer_sampler_and_label_dropout(demo_stage1):
  config = demo_transformer(demo_stage1)
  config.sample.position_temperature = -1.0
  config.label_dropout = 1.0
  config.tokens.fine_order = "column"
  lines = failures(config)
  assert_fails(config, "config.sample.position_temperature", -1.0, "expected valid sampling "
               "settings: sample.position_temperature must be a finite value >= 0; got -1.0")
  assert_fails(config, "config.label_dropout", 1.0, "expected a number [0.0, 1.0)")
  assert_fails(config, "config.tokens.fine_order", "column", "expected one of ('row', 'region')")
  assert len(lines) == 3, lines


def test_sampler_settings_must_fit_the_model(demo_stage1):
  config = demo_transformer(demo_stage1)
  config.sample.content_top_k = 100_000
  assert_fails(config, "config.sample.content_top_k", 100_000, "exceeds the content vocabulary "
               "of the model (269 ids: codebook_size=256 + 3 special ids + 10 class ids)")
  config.sample.content_top_k = 0
  config.class_conditional = False
  config.sample.guidance_scale = 3.0
  assert_fails(config, "config.sample.guidance_scale", 3.0, "needs a class-conditional model")


def test_stage_and_error_type():
  config = load_config("demo_vae.py")
  config.stage = "vqgan"
  with pytest.raises(ValueError, match=r"config.stage = 'vqgan': expected one of \['fid', "
                     r"'transformer', 'vae'\]"):
    validate_config(config)


# --- the hook in dq.main -----------------------------------------------------------------------


def test_main_rejects_a_bad_config_before_building_anything(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "dq.main", "--config=configs/demo_vae.py",
       "--config.model.router.fine_ratio=1.5", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "config.model.router.fine_ratio = 1.5: expected a number [0.0, 1.0]" in result.stderr
  assert not workdir.exists()  # the trainer never started (it writes config.json first)


def test_batches_are_checked_only_where_a_mode_splits_them(demo_stage1):
  config = load_config("demo_vae.py")
  config.mode = "eval"
  config.train.batch_size = 12  # eval mode trains nothing
  validate_config(config)
  config.eval.batch_size = 12
  assert failures(config) == [
      "config.eval.batch_size = 12: expected a multiple of the data-parallel size 8 (mesh data "
      "x fsdp = 8 x 1 on 8 devices) and of the process count 1"]
  config = demo_transformer(demo_stage1)
  config.mode = "sample"  # sampling and encoding run without the mesh
  config.train.batch_size = 12
  config.mesh.data = 3
  validate_config(config)


def test_fid_stage2_run_without_its_stage1(tmp_path, demo_stage1):
  run = demo_transformer(demo_stage1)
  run.stage1.path = str(tmp_path / "deleted_vae")
  config = load_config("fid_demo.py", f"stage2={write_run(tmp_path / 'stage2', run)}")
  assert_fails(config, "config.stage2.workdir", str(tmp_path / "stage2"), "its run's "
               f"stage1.path '{tmp_path / 'deleted_vae'}': expected an existing stage-1 workdir")
  config.stage1.path = demo_stage1  # overrides the run's own
  validate_config(config)
