"""FID evaluation jobs (`config.stage = "fid"`): `reference`, `stage1` (rFID) and `stage2`.

  python -m dq.main --config=configs/fid_ffhq.py:... --workdir=DIR --config.mode=reference
Each job is `fn(config, workdir, inception_params=None) -> dict`; the dict is written to
`WORKDIR/eval/fid_<mode>_<step>.json` and its numbers to the metric writer (process 0).

The jobs live in `dq.evaluation.evaluators`, one module each, with what they share in
`evaluators.common`; their config defaults are `dq.configs.fid_base_config`:
- `reference` (`evaluators.reference`): mu/sigma (and pool_3 features for precision/recall)
  of the `config.fid.split` split of `config.data` -> `config.fid.reference_stats` (default
  WORKDIR/eval/reference_<split>.npz).
- `stage1` (`evaluators.reconstruction`): rFID, PSNR/SSIM/L1, LPIPS, fine ratio and codebook
  use of the DQ-VAE at `config.stage1.path` on that split.
- `stage2` (`evaluators.generation`): FID, Inception Score and precision/recall of
  `fid.num_images` samples of the DQ-Transformer of `config.stage2.workdir` (`dq.generator`).

Devices and processes: the DQ-VAE and Inception run data-parallel over this process's devices
(batches padded to a multiple of the device count); the sampler runs on the first local device
(on hosts with several accelerators, start one process per device: launch/). The reference job
reads the whole split on every process (as `compute_reference_stats` does) and process 0
writes the file. The stage1 job reads this process's shard of the split and the stage2 job
samples a contiguous share of the N images; their per-process features (float32, as the
network gives them) are gathered at the end (`common.gather_rows`: N x 2048 float32 on every
process, 400 MB for 50k) and the statistics merged from per-process `FeatureStats` in process
order (`common.merged_stats`), so every process gets the same numbers. Stage-2 samples depend
on the process count (each process folds its index into the sampling key).
"""
from __future__ import annotations

from typing import Callable

from dq.evaluation.evaluators import generation, reconstruction
from dq.evaluation.evaluators import reference as reference_job

reference = reference_job.run
stage1 = reconstruction.run
stage2 = generation.run

JOBS: dict[str, Callable[..., dict]] = {"reference": reference, "stage1": stage1,
                                        "stage2": stage2}
MODES = tuple(JOBS)

