"""Config validation before any model is built: `validate_config(config)`.

`dq.main` calls it right after the distributed start, so a typo or an impossible setting stops
the run within seconds with every problem listed, not after minutes of data loading and
compilation. It reads the config, a few small JSON files (the config of the stage-1 model, of
an `init_from` run, token meta) and the device and process counts; it compiles nothing and
loads no weights.

Rules, for the stages 'vae', 'transformer' and 'fid':
1. every key exists in the stage's base config (the closest known key is suggested);
2. image sizes are multiples of the encoder's coarsest factor; decoder depth and attention
   resolutions fit the encoder;
3. grain targets (`fine_ratio`, `median_ratio`) and `num_grains`;
4. stage 2: token grids, vocabulary and `tokens.max_len` from the stage-1 model config at
   `stage1.path`; an `init_from` run's sizes; token meta; class labels;
5. batch sizes are multiples of the mesh's data-parallel size and of the process count;
   `train.microbatches` divides the per-device batch;
6. paths that must exist (local paths, as the loaders read them; `scheme://` TFDS folders are
   not checked);
7. ranges of steps, intervals, learning rates, optimizer names, sampler settings.

Where the rules live:
- `checker`: `Checker` (what every rule reads and writes its failures to), `ConfigError`,
  `base_config` and small helpers;
- `common`: the rules every stage shares (keys, mode, mesh and batches, sharding, optimizer,
  train loop, data, sample labels, sampling);
- `stage1`: DQ-VAE rules (`VAE_RULES`);
- `stage2`: DQ-Transformer rules (`TRANSFORMER_RULES`; the stage-1 model is found by
  `dq.tokenizer.read_stage1_config`, as the loader finds it);
- `fid`: FID-job rules (`FID_RULES`);
- `resume`: the fields a training run may not change when it resumes in its workdir
  (`RESUME_FIXED`, checked by `dq.train.workdir.TrainingRun`, not by `validate_config`: the
  workdir is not part of the config).
"""
from __future__ import annotations

from typing import Any, Callable

from dq.validate.checker import (MAX_SHOWN, STAGE_MODES, Checker, ConfigError, base_config,
                                 is_section, one_line, show)
from dq.validate.common import OPTIMIZERS, SCHEDULES, check_keys, check_mode
from dq.validate.fid import FID_RULES
from dq.validate.stage1 import VAE_RULES, VAE_SHAPE_FIELDS
from dq.validate.stage2 import TRANSFORMER_RULES, TRANSFORMER_SHAPE_FIELDS

__all__ = ["MAX_SHOWN", "OPTIMIZERS", "SCHEDULES", "STAGE_MODES",
           "TRANSFORMER_SHAPE_FIELDS", "VAE_SHAPE_FIELDS", "ConfigError",
           "base_config", "validate_config"]


def validate_config(config: Any) -> None:
  """Checks `config` (a ConfigDict of `configs/*.py`) without building anything.

  Raises:
    ConfigError: one line per failed rule, each naming the field, its value and what is
      expected.
  """
  stage = config.get("stage") if is_section(config) else None
  if stage not in STAGE_MODES:
    raise ConfigError([f"config.stage = {show(stage)}: expected one of "
                       f"{sorted(STAGE_MODES)}"])
  checker = Checker(config, base_config(stage))
  rules: list[Callable[[Checker], None]] = [check_keys, check_mode]
  rules += {"vae": VAE_RULES, "transformer": TRANSFORMER_RULES, "fid": FID_RULES}[stage]
  for rule in rules:
    try:
      rule(checker)
    except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:
      checker.failures.append(f"config: {rule.__name__.lstrip('_')} could not run "
                              f"({type(e).__name__}: {one_line(str(e))})")
  if checker.failures:
    raise ConfigError(checker.failures)
