"""The files of a run's workdir that other jobs look up, and finding a run from a path inside it.

Both trainers write `WORKDIR/config.json`; stage 2, FID, the tokenizer and the config checks
accept a workdir, its `checkpoints` folder or one `checkpoints/N` and find the run's config here.
"""
from __future__ import annotations

import os
from typing import Optional

WORKDIR_CONFIG = "config.json"  # the run's config, written by both trainers
CHECKPOINTS_DIR = "checkpoints"


def run_config_path(path: str) -> Optional[str]:
  """config.json of a run given its workdir, `WORKDIR/checkpoints` or `.../checkpoints/N`
  (joined onto `path` as given, relative or absolute); None when there is none."""
  parent = os.path.dirname(path)
  candidates = [path]
  if os.path.basename(path) == CHECKPOINTS_DIR:
    candidates.append(parent)
  elif os.path.basename(parent) == CHECKPOINTS_DIR:
    candidates.append(os.path.dirname(parent))
  for candidate in candidates:
    config = os.path.join(candidate, WORKDIR_CONFIG)
    if os.path.isfile(config):
      return config
  return None
