r"""Computes the entropy-router threshold table from the configured train data.

  python -m dq.tools.entropy_thresholds --config=configs/ffhq_vae.py:entropy \
      --output=thresholds/ffhq_256.json [--num_images=10000]

The region size is the coarsest downsampling factor, 2**(len(model.ch_mult) - 1).
Images come from the train split without augmentation; histograms use 32 bins
over [-1, 1] (the official tool used [0, 1] and cannot run as shipped).
"""
from __future__ import annotations

from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from dq.models import entropy

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write the JSON table (default: model.router.thresholds_path).")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", None, "Train images to use (default: model.router.threshold_images or 10000).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per entropy batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Data pipeline seed.")

DEFAULT_NUM_IMAGES = 10_000
REPORT_RATIOS = (0.25, 0.5, 0.75)


def run(config: Any, output: str | None, num_images: int | None, batch_size: int = 32,
        seed: int = 0) -> dict[str, Any]:
  """Computes, writes and returns the table for `config` (with `data` and `model`)."""
  router = config.model.get("router", {})
  output = output or router.get("thresholds_path", None)
  if not output:
    raise ValueError("no output path: pass --output=PATH or set "
                     "config.model.router.thresholds_path")
  num_images = num_images or router.get("threshold_images", None) or DEFAULT_NUM_IMAGES
  table = entropy.write_thresholds_for_config(config, output, num_images,
                                              batch_size=batch_size, seed=seed)
  meta = table["meta"]
  patch_size = meta["patch_size"]
  print(f"wrote {output}: {table['num_regions']} regions of {patch_size}x{patch_size} px from "
        f"{table['num_images']} images of {meta['data']}")
  for ratio in REPORT_RATIOS:
    print(f"fine_ratio {ratio:.2f}: threshold {entropy.threshold_for_ratio(table, ratio):.6f}")
  median_ratio, fine_ratio = router.get("median_ratio"), router.get("fine_ratio")
  if config.model.get("num_grains", 2) == 3 and median_ratio is not None and fine_ratio is not None:
    t_median, t_fine = entropy.thresholds_for_ratios(table, median_ratio, fine_ratio)
    print(f"median_ratio {median_ratio}, fine_ratio {fine_ratio}: "
          f"t_median {t_median:.6f}, t_fine {t_fine:.6f}")
  return table


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/X.py[:arg] is required")
  run(_CONFIG.value, _OUTPUT.value, _NUM_IMAGES.value, _BATCH_SIZE.value, _SEED.value)


if __name__ == "__main__":
  app.run(main)
