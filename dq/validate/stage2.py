"""Stage-2 (DQ-Transformer) rules: the stage-1 model at `stage1.path` (grids, vocabulary,
`tokens.max_len`), token meta, `init_from`, classes and sampling; `TRANSFORMER_RULES` lists them
with the shared ones. Also `stage1_facts`, which the FID rules use. The stage-1 model is found
as `dq.tokenizer` finds it (`read_stage1_config`): one resolver for the checks and the loader."""
from __future__ import annotations

import os
from typing import Any, Optional

from dq.models.grains import grid_factors
from dq.tokenizer import THRESHOLDS_FILE, read_stage1_config
from dq.validate.checker import Checker, is_int, is_remote, one_line, read_json, run_config_path
from dq.validate.common import (check_data, check_mesh_and_batches, check_optim, check_sampling,
                                check_sharding, check_train_loop, parse_labels)

TRANSFORMER_SHAPE_FIELDS = ("n_embd", "position_layers", "content_layers")


def stage1_facts(c: Checker, field: str, path: Any, via: str = "") -> Optional[dict]:
  """Grids, codebook and resolution of the DQ-VAE at `path` (its config only), or None after
  a failure on `field`. `via`: how `field` leads to `path` when `path` is not its value."""

  def report(expectation: str) -> None:
    if via:
      c.fail(field, c.get(field), f"{via}: {expectation}")
    else:
      c.fail(field, path, expectation)

  if not path:
    report("expected a stage-1 DQ-VAE: a stage-1 workdir (python -m dq.main "
           "--config=configs/demo_vae.py --workdir=DIR) or a converted folder (python -m "
           "dq.tools.convert_official_dqvae)")
    return None
  if not isinstance(path, str) or not os.path.exists(path):
    report("expected an existing stage-1 workdir or converted DQ-VAE folder; it does not "
           "exist")
    return None
  try:
    model, directory = read_stage1_config(path)
  except (OSError, ValueError) as e:
    report(f"expected a stage-1 DQ-VAE ({one_line(str(e))})")
    return None
  if not _has_checkpoint(path, directory):
    report(f"expected a stage-1 workdir with a saved checkpoint; {directory}/checkpoints has "
           "none yet (train stage 1 first: python -m dq.main --config=configs/demo_vae.py "
           f"--workdir={directory})")
    return None
  try:
    num_grains, resolution = int(model["num_grains"]), int(model["resolution"])
    codebook_size = int(model["codebook_size"])
    coarse_factor, fine_factor = grid_factors(model["ch_mult"], 2)
  except (KeyError, TypeError, ValueError) as e:
    report(f"expected a DQ-VAE model config with num_grains, resolution, ch_mult and "
           f"codebook_size ({type(e).__name__}: {e})")
    return None
  if num_grains != 2:
    report(f"expected a dual-grain DQ-VAE (stage 2 supports num_grains=2); its model has "
           f"num_grains={num_grains}")
    return None
  router = model.get("router") or {}
  if router.get("kind") == "entropy":
    table = router.get("thresholds_path") or os.path.join(directory, THRESHOLDS_FILE)
    if not os.path.isfile(table):
      report(f"expected the entropy-router threshold table {table} next to the DQ-VAE (its "
             "model.router.thresholds_path, else DIR/entropy_thresholds.json)")
  return {"path": path, "resolution": resolution, "coarse": resolution // coarse_factor,
          "fine": resolution // fine_factor,
          "codebook_size": codebook_size}


def _has_checkpoint(path: str, directory: str) -> bool:
  """False for a stage-1 workdir (or its checkpoints folder) that holds no step folder."""
  root = os.path.join(directory, "checkpoints")
  if os.path.abspath(path) not in (os.path.abspath(directory), os.path.abspath(root)):
    return True  # a converted folder or one checkpoints/STEP folder
  from dq.official import dqvae as convert
  if os.path.isfile(os.path.join(directory, convert.PARAMS_FILE)):
    return True
  return os.path.isdir(root) and any(name.isdigit() and os.path.isdir(os.path.join(root, name))
                                     for name in os.listdir(root))


def _known_num_classes(c: Checker) -> Optional[int]:
  """Classes of a class-conditional model when known without reading the data (0 when
  unconditional, None when only the data can tell)."""
  from dq.data import embedded
  if not c.get("class_conditional"):
    return 0
  name = c.get("data.name")
  if name == "embedded":
    return embedded.NUM_CLASSES
  if name == "folder" and not c.get("data.folder.labels_from_subfolders"):
    return 1
  return None


def _transformer_needs_data(c: Checker) -> bool:
  """True when the mode reads images (or counts classes in a folder)."""
  counts_classes = bool(c.get("class_conditional")) and c.get("data.name") == "folder"
  mode = c.get("mode")
  if mode == "encode":
    return True
  if mode == "train":
    tokens_dir = c.get("tokens.dir")
    meta_path = os.path.join(tokens_dir, "meta.json") if tokens_dir else ""
    has_tokens = False
    if meta_path and os.path.isfile(meta_path):
      has_tokens = "train" in (read_json(meta_path).get("splits") or {})
    return counts_classes or not has_tokens
  return counts_classes


def _check_transformer_stage1(c: Checker) -> None:
  """Rules 4 and 6: stage 1 exists and is dual grain; data image size, max_len, token meta,
  model fields against the stage-1 token layout."""
  from dq.stage2.build import build_transformer
  from dq.stage2.layout import TokenLayout
  facts = stage1_facts(c, "stage1.path", c.get("stage1.path"))
  image_size = c.get("data.image_size")
  max_len = c.integer("tokens.max_len", 0)
  num_classes = _known_num_classes(c)
  layout = None
  if facts is not None:
    if is_int(image_size) and image_size not in (0, facts["resolution"]):
      c.fail("data.image_size", image_size, f"expected 0 or {facts['resolution']}, the image "
             f"size of the stage-1 model at {facts['path']}")
    coarse, fine = facts["coarse"], facts["fine"]
    shortest, worst = coarse * coarse + 4, fine * fine + 4
    if max_len and max_len < shortest:
      c.fail("tokens.max_len", max_len, f"expected 0 (the worst case, {worst}) or >= {shortest}:"
             f" the all-coarse sequence of the stage-1 grids ({coarse}x{coarse} coarse, "
             f"{fine}x{fine} fine) at {facts['path']}")
      max_len = None
    if max_len is not None:
      layout = TokenLayout((coarse, coarse), (fine, fine), facts["codebook_size"],
                           num_classes=num_classes or 0, max_len=max_len or None)
  before = len(c.failures)
  try:
    build_transformer(c.get("model"), layout or TokenLayout((1, 1), (2, 2), 1))
  except (TypeError, ValueError, AttributeError, KeyError) as e:
    c.failures.append(one_line(str(e)) if str(e).startswith("config.model")
                      else f"config.model: {one_line(str(e))}")
  if layout is not None and len(c.failures) == before:
    _check_token_meta(c, layout, num_classes)
    _check_transformer_init_from(c, layout, num_classes)
    _check_sampling_fits(c, layout)
  else:
    c.existing("init_from", "any", "a stage-2 workdir, checkpoint folder or converted "
               "DQ-Transformer folder")


def _check_sampling_fits(c: Checker, layout: Any) -> None:
  """Sampler settings that do not fit the model (guidance without classes, top-k above the
  vocabulary); their ranges are checked with the other sampling rules."""
  from dq.stage2 import sampler
  from dq.stage2.sampler_checks import check_sampling_fits
  try:
    settings = sampler.sampling_config_from(c.get("sample"))
  except (TypeError, ValueError):
    return  # out-of-range settings are reported by the sampling rule
  try:
    check_sampling_fits(layout, settings)
  except ValueError as e:  # "sample.FIELD=VALUE <why>"
    field, _, rest = str(e).partition("=")
    name = field.split(".")[-1]
    c.fail(field, c.get(field), f"expected a setting that fits the model: {name}="
           f"{one_line(rest)}")


def _check_token_meta(c: Checker, layout: Any, num_classes: Optional[int]) -> None:
  """Token shards already in `tokens.dir` must be of this layout (tokens.dir itself need not
  exist: training and the encode mode create it)."""
  import dataclasses
  from dq.stage2 import token_data
  directory = c.get("tokens.dir")
  if not directory or not os.path.isfile(os.path.join(directory, token_data.META_FILE)):
    return
  try:
    meta = token_data.load_token_meta(directory)
    if num_classes is None:  # unknown without the data: take the shards' own count
      layout = dataclasses.replace(layout, num_classes=int(meta.get("num_classes", 0)))
    token_data.check_token_meta(meta, layout, directory)
  except (OSError, ValueError, TypeError) as e:
    c.fail("tokens.dir", directory, f"expected tokens of this stage 1 and class setting "
           f"({one_line(str(e))})")


def _check_transformer_init_from(c: Checker, layout: Any, num_classes: Optional[int]) -> None:
  """`init_from` exists; a converted DQ-Transformer's vocabulary (codebook + special tokens +
  classes), grids and block size, or a stage-2 run's sizes, match this config."""
  from dq.stage2.layout import TokenLayout
  from dq.official import transformer as convert
  path = c.existing("init_from", "any", "a stage-2 workdir, checkpoint folder or converted "
                    "DQ-Transformer folder")
  if not path or is_remote(path):
    return
  converted_config = os.path.join(path, convert.CONFIG_FILE)
  if os.path.isfile(converted_config):
    converted = read_json(converted_config)
    model, theirs = converted.get("model", {}), TokenLayout(**converted.get("layout", {}))
    for field in ("coarse_size", "fine_size", "codebook_size"):
      if getattr(theirs, field) != getattr(layout, field):
        c.fail("init_from", path, f"expected a DQ-Transformer of the stage-1 model's "
               f"{field}={getattr(layout, field)}; {converted_config} has "
               f"{getattr(theirs, field)}")
    if num_classes is not None and theirs.num_classes != num_classes:
      c.fail("class_conditional", c.get("class_conditional"), f"expected the class setting of "
             f"init_from ({theirs.num_classes} classes, content vocabulary "
             f"{theirs.content_vocab_size} = codebook {theirs.codebook_size} + 3 special ids"
             f"{' + classes + null class' if theirs.num_classes else ''}); this config has "
             f"{num_classes} classes (vocabulary {layout.content_vocab_size})")
    block_size = model.get("block_size")
    if block_size is not None and int(block_size) < layout.max_len - 1:
      c.fail("tokens.max_len", c.get("tokens.max_len"), f"expected a length whose block size "
             f"(max_len - 1 = {layout.max_len - 1}) fits the {block_size} positions of "
             f"init_from {path}")
  else:
    config_path = run_config_path(path)
    if config_path is None:
      return
    run = read_json(config_path)
    if run.get("stage") != "transformer":
      c.fail("init_from", path, f"expected a stage-2 run; {config_path} is a "
             f"{run.get('stage')!r} run")
      return
    model = run.get("model") or {}
    if "class_conditional" in run and bool(run["class_conditional"]) != bool(
        c.get("class_conditional")):
      c.fail("class_conditional", c.get("class_conditional"), f"expected "
             f"{run['class_conditional']}, the setting of init_from {config_path} (the content "
             "vocabulary differs)")
  for field in TRANSFORMER_SHAPE_FIELDS:
    ours = c.get(f"model.{field}")
    if model.get(field) is not None and model[field] != ours:
      c.fail(f"model.{field}", ours, f"expected {model[field]}, the value of init_from {path}")


def _check_transformer_misc(c: Checker) -> None:
  """Tokens, classes, labels, sampling (rules 4 and 7) and the data the mode reads (6)."""
  from dq.stage2.layout import FINE_ORDERS
  fine_order = c.choice("tokens.fine_order", FINE_ORDERS)
  c.boolean("tokens.flip")
  c.integer("tokens.encode_batch_size", 1)
  c.integer("tokens.shard_size", 1)
  c.integer("tokens.max_images", 0)
  conditional = c.boolean("class_conditional")
  c.number("label_dropout", 0.0, 1.0, high_open=True)
  if conditional and c.get("data.name") == "folder" and not c.get(
      "data.folder.labels_from_subfolders"):
    c.fail("class_conditional", True, "expected labels in the data: set "
           "data.folder.labels_from_subfolders=True (class subfolders) or "
           "class_conditional=False")
  if conditional and c.get("data.name") == "tfds" and not c.get("data.tfds.label_key"):
    c.fail("data.tfds.label_key", c.get("data.tfds.label_key"), "expected the label feature "
           "of a class-conditional model")
  parse_labels(c, _known_num_classes(c))
  c.integer("sample.num_images", 1)
  check_sampling(c, fine_order or "row")
  check_data(c, require_files=_transformer_needs_data(c), min_image_size=0)


def _check_transformer_optimizer(c: Checker) -> None:
  check_optim(c, "optim")


TRANSFORMER_RULES = [check_mesh_and_batches, check_sharding, check_train_loop,
                     _check_transformer_optimizer, _check_transformer_stage1,
                     _check_transformer_misc]
