"""FID-job rules: job fields, the stage-1 / stage-2 models and the files each mode reads;
`FID_RULES`."""
from __future__ import annotations

import os
from typing import Optional

from dq.run_files import WORKDIR_CONFIG
from dq.validate.checker import Checker, is_int, read_json
from dq.validate.common import check_data, check_sampling, parse_labels
from dq.validate.stage2 import stage1_facts


def _check_fid(c: Checker) -> None:
  """The FID job fields (rule 7), the models and files each mode reads (rule 6)."""
  mode = c.get("mode")
  c.choice("fid.split", ("train", "eval"))
  for field in ("batch_size", "num_images", "pr_k", "is_splits", "log_every"):
    c.integer(f"fid.{field}", 1)
  for field in ("max_images", "pr_images"):
    c.integer(f"fid.{field}", 0)
  c.existing("fid.inception_weights", "file", "Inception weights (.npz or pytorch-fid .pth)")
  c.existing("stage1.lpips_weights", "file", "LPIPS weights (.npz of dq.tools.convert_lpips)")
  check_sampling(c, "row")
  parse_labels(c, None)
  stage1_path = c.get("stage1.path")
  if mode == "stage2":
    run_stage1 = _check_fid_generator(c)
    if not stage1_path and run_stage1:
      _check_fid_image_size(c, stage1_facts(
          c, "stage2.workdir", run_stage1, via=f"its run's stage1.path {run_stage1!r}"))
  if mode == "stage1" or stage1_path:
    _check_fid_image_size(c, stage1_facts(c, "stage1.path", stage1_path))
  reference = c.get("fid.reference_stats")
  require = mode in ("reference", "stage1") or bool(
      mode == "stage2" and reference and not os.path.isfile(reference))
  check_data(c, require_files=require, min_image_size=1 if mode == "reference" else 0)


def _check_fid_generator(c: Checker) -> Optional[str]:
  """`stage2.workdir` is a stage-2 run or a converted DQ-Transformer; returns the run's own
  stage-1 path ('' for a converted one, which needs `stage1.path`)."""
  from dq.official import transformer as convert
  workdir = c.get("stage2.workdir")
  if not workdir:
    c.fail("stage2.workdir", workdir, "expected a stage-2 workdir (python -m dq.main "
           "--config=configs/*_transformer.py) or a converted official DQ-Transformer")
    return None
  if not c.existing("stage2.workdir", "dir", "a stage-2 workdir or converted DQ-Transformer"):
    return None
  if os.path.isfile(os.path.join(workdir, convert.CONFIG_FILE)):
    if not c.get("stage1.path"):
      c.fail("stage1.path", c.get("stage1.path"), f"expected the DQ-VAE of the converted "
             f"DQ-Transformer {workdir} (a converted transformer names no stage 1)")
    return ""
  run_config = os.path.join(workdir, WORKDIR_CONFIG)
  if not os.path.isfile(run_config):
    c.fail("stage2.workdir", workdir, f"expected {WORKDIR_CONFIG} (a stage-2 workdir) or "
           f"{convert.CONFIG_FILE} (a converted DQ-Transformer) in it")
    return None
  run = read_json(run_config)
  if run.get("stage") != "transformer":
    c.fail("stage2.workdir", workdir, f"expected a stage-2 run; {run_config} is a "
           f"{run.get('stage')!r} run")
    return None
  run_stage1 = (run.get("stage1") or {}).get("path") or ""
  if not run_stage1 and not c.get("stage1.path"):
    c.fail("stage1.path", c.get("stage1.path"), f"expected the DQ-VAE of the stage-2 run "
           f"{workdir} (its {WORKDIR_CONFIG} names none)")
  return run_stage1


def _check_fid_image_size(c: Checker, facts: Optional[dict]) -> None:
  image_size = c.get("data.image_size")
  if facts is not None and is_int(image_size) and image_size not in (0, facts["resolution"]):
    c.fail("data.image_size", image_size, f"expected 0 or {facts['resolution']}, the image size "
           f"of the stage-1 model at {facts['path']}")


FID_RULES = [_check_fid]
