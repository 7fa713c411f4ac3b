"""Rules shared by the stages: keys, mode, mesh and batches, sharding, optimizer, train loop,
data, sample labels and sampling settings."""
from __future__ import annotations

import difflib
import re
from typing import Any, Optional

import jax
import ml_collections

from dq.train.optim import OPTIMIZERS, SCHEDULES
from dq.validate.checker import STAGE_MODES, Checker, is_section, one_line, plain



def check_keys(c: Checker) -> None:
  """Rule 1: keys absent from the stage's base config (typos), recursively."""

  def walk(section: Any, base: Any, prefix: str) -> None:
    known = list(base.keys())
    for key in section.keys():
      field = f"{prefix}.{key}" if prefix else key
      if key not in base:
        match = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
        hint = (f"did you mean '{match[0]}'?" if match
                else f"known keys: {', '.join(sorted(str(k) for k in known))}")
        where = f"config.{prefix}" if prefix else "config"
        c.fail(field, section[key], f"unknown key; expected a field of {where} ({hint})")
      elif is_section(base[key]) and is_section(section[key]):
        walk(section[key], base[key], field)

  walk(c.config, c.base, "")


def check_mode(c: Checker) -> None:
  stage = c.get("stage")
  c.choice("mode", STAGE_MODES[stage])


def check_mesh_and_batches(c: Checker) -> None:
  """Rule 5: the mesh fits the devices; global batches split over data x fsdp and processes;
  microbatches divide the per-device batch."""
  from dq import sharding
  stage, mode = c.get("stage"), c.get("mode")
  fields = ["train.batch_size"] + (["eval.batch_size"] if stage == "vae" else [])
  sizes = {field: c.integer(field, 1) for field in fields}
  microbatches = c.integer("train.microbatches", 1)
  # The batches a mode splits over the mesh (stage-2 sampling and encoding use no mesh).
  sharded = []
  if mode == "train":
    sharded.append("train.batch_size")
  if stage == "vae" and (mode == "eval" or (mode == "train" and c.get("eval.at_end"))):
    sharded.append("eval.batch_size")
  sizes = {field: size for field, size in sizes.items() if field in sharded}
  if not sizes:
    return
  mesh_cfg = c.get("mesh")
  try:
    mesh = sharding.make_mesh(mesh_cfg)
  except (TypeError, ValueError) as e:
    c.fail("mesh", mesh_cfg, f"expected sizes >= 1 (one may be -1: the rest) whose product is "
           f"the {jax.device_count()} devices ({one_line(str(e))})")
    return
  data_parallel, processes = sharding.data_parallel_size(mesh), jax.process_count()
  for field, size in sizes.items():
    if size is not None and (size % data_parallel or size % processes):
      c.fail(field, size, f"expected a multiple of the data-parallel size {data_parallel} "
             f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} on "
             f"{jax.device_count()} devices) and of the process count {processes}")
  batch = sizes.get("train.batch_size")
  if microbatches and batch is not None and not batch % data_parallel:
    per_device = batch // data_parallel
    if per_device % microbatches:
      c.fail("train.microbatches", microbatches, f"expected a divisor of the per-device batch "
             f"{per_device} (train.batch_size {batch} / data-parallel size {data_parallel})")


def check_sharding(c: Checker) -> None:
  """`sharding.rules`: [regex, spec] pairs over the mesh axes; `fsdp_min_size` >= 0."""
  from dq.sharding import MESH_AXES
  rules = c.get("sharding.rules")
  if not isinstance(rules, (list, tuple)):
    c.fail("sharding.rules", rules, "expected a list of [regex, partition spec] pairs")
    rules = ()
  for index, rule in enumerate(rules):
    field = f"sharding.rules[{index}]"
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
      c.fail(field, rule, "expected a [regex, partition spec] pair")
      continue
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      c.fail(field, pattern, f"expected a valid regular expression ({e})")
    if not isinstance(spec, (list, tuple)):
      c.fail(field, spec, f"expected a partition spec: one of {MESH_AXES}, None or a tuple of "
             "axes per array dimension")
      continue
    names = [name for axis in spec
             for name in (axis if isinstance(axis, (list, tuple)) else (axis,))]
    unknown = [name for name in names if name is not None and name not in MESH_AXES]
    if unknown:
      c.fail(field, spec, f"expected mesh axes from {MESH_AXES} or None; unknown {unknown}")
  c.integer("sharding.fsdp_min_size", 0)


def check_optim(c: Checker, section: str) -> None:
  """Rule 7: an optimizer and schedule that `dq.train.optim` knows, with sane numbers."""
  c.choice(f"{section}.name", OPTIMIZERS)
  c.choice(f"{section}.schedule", SCHEDULES)
  c.number(f"{section}.lr", low=0.0, low_open=True)
  c.number(f"{section}.b1", 0.0, 1.0, high_open=True)
  c.number(f"{section}.b2", 0.0, 1.0, high_open=True)
  c.number(f"{section}.eps", low=0.0, low_open=True)
  c.number(f"{section}.weight_decay", low=0.0)
  c.number(f"{section}.end_factor", 0.0, 1.0)
  c.number(f"{section}.grad_clip", low=0.0)
  c.integer(f"{section}.warmup_steps", 0)


def check_train_loop(c: Checker) -> None:
  """Rule 7: steps and intervals of `config.train`."""
  c.integer("seed")
  c.integer("train.num_steps", 1)
  c.integer("train.log_every", 1)
  c.integer("train.checkpoint_every", 1)
  c.integer("train.keep_checkpoints", 1)
  c.boolean("train.async_checkpointing")
  c.boolean("train.tensorboard")
  c.boolean("train.allow_data_restart")
  if c.get("stage") == "vae":
    c.integer("train.summary_every", 0)
    c.integer("train.summary_images", 0)
  else:
    c.integer("train.sample_every", 0)
    c.integer("train.sample_images", 0)


def check_data(c: Checker, require_files: bool, min_image_size: int) -> None:
  """Dataset name and sizes; the folders a folder/TFDS source reads (rule 6). With
  `require_files`, a folder source must name its train folder."""
  from dq.data.pipeline import DATASET_NAMES
  name = c.choice("data.name", DATASET_NAMES)
  c.integer("data.image_size", min_image_size)
  c.number("data.max_bad_fraction", 0.0, 1.0)
  c.integer("data.worker_count", 0)
  c.integer("data.prefetch_buffer", 0)
  if name == "embedded":
    c.number("data.embedded.procedural_fraction", 0.0, 1.0)
    c.integer("data.embedded.train_size", 1)
    c.integer("data.embedded.eval_size", 1)
  elif name == "folder":
    c.number("data.folder.eval_fraction", 0.0, 1.0, high_open=True)
    if require_files and not c.get("data.folder.train_path"):
      c.fail("data.folder.train_path", c.get("data.folder.train_path"),
             "expected the image folder (data.name='folder' reads it; "
             "--config.data.folder.train_path=DIR)")
    c.existing("data.folder.train_path", "dir", "the training image folder")
    c.existing("data.folder.eval_path", "dir", "the evaluation image folder")
  elif name == "tfds":
    if require_files and not c.get("data.tfds.name"):
      c.fail("data.tfds.name", c.get("data.tfds.name"),
             "expected a TFDS dataset name (data.name='tfds'), e.g. 'imagenet2012'")
    c.existing("data.tfds.data_dir", "dir", "the TFDS data folder")


def parse_labels(c: Checker, num_classes: Optional[int]) -> None:
  """`sample.labels`: '' or comma-separated ints in [0, num_classes] (num_classes: the null
  class); refused for an unconditional model (num_classes 0)."""
  text = str(c.get("sample.labels", "") or "").strip()
  if not text:
    return
  if num_classes == 0:
    c.fail("sample.labels", text, "expected '' for an unconditional model "
           "(class_conditional=False)")
    return
  from dq.generator import label_values  # Deferred: loads the models.
  try:
    values = label_values(text)
  except ValueError:
    c.fail("sample.labels", text, "expected '' or comma-separated ints, e.g. '3,3,7'")
    return
  if num_classes is not None and any(not 0 <= v <= num_classes for v in values):
    c.fail("sample.labels", text, f"expected labels in [0, {num_classes}] ({num_classes} "
           "classes; the last id is the null class)")


def check_sampling(c: Checker, default_fine_order: str) -> None:
  """Rule 7: `config.sample` through `SamplingConfig.__post_init__` (its own checks)."""
  from dq.stage2.sampler import sampling_config_from
  sample_cfg = c.get("sample")
  if not is_section(sample_cfg):
    c.fail("sample", sample_cfg, "expected a section")
    return
  fields = ml_collections.ConfigDict(plain(sample_cfg) if isinstance(sample_cfg, dict)
                                     else sample_cfg.to_dict())
  if not fields.get("fine_order"):
    fields.fine_order = default_fine_order
  try:
    sampling_config_from(fields)
  except (TypeError, ValueError) as e:
    field = next((f"sample.{key}" for key in sorted(fields.keys(), key=len, reverse=True)
                  if f"sample.{key}" in str(e)), "sample")
    c.fail(field, c.get(field), f"expected valid sampling settings: {e}")
  c.integer("sample.batch_size", 1)
  c.integer("sample.seed")
