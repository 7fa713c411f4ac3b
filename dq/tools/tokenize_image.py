"""Tokenizes image files with a trained DQ-VAE: grain overlay, reconstruction and token count.

  python -m dq.tools.tokenize_image photo.jpg [more.png ...] --checkpoint DIR [--out DIR]

DIR is a dq stage-1 workdir (or one of its checkpoints) or a converted official folder
(`python -m dq.tools.convert_official_dqvae`); dual-grain models. Any size and mode of image
is read (`dq.data.decode`), centre-cropped to a square and resized to the model's resolution
(bicubic), as the eval pipeline does. For each image STEM, OUT gets:
- STEM_grain.png: the adaptive coding map (`dq.summaries.grain_overlay`: blue coarse, vermillion
  fine, borders on every code's cell) on the resized input;
- STEM_reconstruction.png: the DQ-VAE reconstruction;
- STEM_grid.png: input | reconstruction | |error| | grain map;
- STEM_tokens.json: token count and grain statistics (also printed, one JSON line per image).
STEM is the file name without its extension; images whose names would collide (a/x.png and
b/x.jpg) get distinct stems (`output_stems`: the extension, then parent folders, are added).
PNGs are magnified (nearest neighbour) by `--scale`, default the smallest integer that makes
them at least 256 px wide.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

MIN_DISPLAY_SIZE = 256


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 [size, size, 3] centre crop resized, original (height, width)) of an image file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable image.
  """
  from dq.data import decode, transforms  # Deferred: keeps --help fast.

  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    image = decode.decode_image(path)
  except Exception as error:  # PIL raises many types for corrupt or non-image files.
    raise ValueError(f"{path} is not a readable image file ({type(error).__name__}: "
                     f"{error})") from error
  height, width = image.shape[:2]
  box = transforms.square_crop_box(height, width, None)
  return transforms.crop_resize(image, box, size), (height, width)


def default_scale(resolution: int) -> int:
  """Smallest integer magnification that makes a `resolution` image >= 256 px."""
  return max(1, -(-MIN_DISPLAY_SIZE // resolution))


def _magnify(image: np.ndarray, scale: int) -> np.ndarray:
  return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def output_stems(paths: Sequence[str]) -> list[str]:
  """Distinct output stems of `paths`: the file name without extension, and for names that
  collide, with the extension (x_png, x_jpg), then the parent folders (a_x_png) added; a file
  given twice gets a number (x_2)."""
  files = list(dict.fromkeys(os.path.abspath(p) for p in paths))

  def stem_of(path: str, depth: int) -> str:
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    name, ext = os.path.splitext(parts[-1])
    return "_".join(parts[max(0, len(parts) - 1 - depth):-1] + [name] +
                    ([ext.lstrip(".")] if ext else []))

  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  depth = 0
  while len(set(stems)) < len(stems) and depth < 256:
    stems = [stem_of(f, depth) if stems.count(s) > 1 else s for f, s in zip(files, stems)]
    depth += 1
  by_file, seen, out = dict(zip(files, stems)), {}, []
  for path in paths:
    stem = by_file[os.path.abspath(path)]
    seen[stem] = seen.get(stem, 0) + 1
    out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
  return out


def tokenize_image(path: str, stage1, out_dir: str, scale: Optional[int] = None,
                   encode_fn=None, decode_fn=None, stem: Optional[str] = None) -> dict:
  """Writes STEM_grain.png, STEM_reconstruction.png, STEM_grid.png, STEM_tokens.json.

  Args:
    path: an image file.
    stage1: a loaded `dq.tokenizer.Stage1`.
    out_dir: output folder (created).
    scale: PNG magnification; None: `default_scale(stage1.image_size)`.
    encode_fn, decode_fn: `make_encode_fn(stage1)` / `make_decode_fn(stage1)` to reuse.
    stem: output file prefix; None: the image's file name without extension.

  Returns:
    the JSON summary (with the paths written).
  """
  from dq import summaries as viz
  from dq.data import transforms
  from dq.evaluation import metrics
  from dq.models.grains import fine_fraction
  from dq import tokenizer as stage1_lib

  size = stage1.image_size
  scale = default_scale(size) if scale is None else int(scale)
  if scale < 1:
    raise ValueError(f"--scale must be >= 1; got {scale}")
  image, original = load_image(path, size)  # [S, S, 3] uint8
  encode_fn = encode_fn or stage1_lib.make_encode_fn(stage1)
  decode_fn = decode_fn or stage1_lib.make_decode_fn(stage1)
  x = transforms.to_unit_range(image)[None]  # [1, S, S, 3]
  codes, grain = encode_fn(x)  # [1, hf, wf], [1, hc, wc]
  recon = np.asarray(decode_fn(codes))  # [1, S, S, 3] in [-1, 1]
  codes, grain = np.asarray(codes), np.asarray(grain)
  num_grains = int(stage1.model_cfg.num_grains)
  layout = stage1_lib.token_layout(stage1)

  stem = stem or os.path.splitext(os.path.basename(path))[0]
  paths = {kind: os.path.join(out_dir, f"{stem}_{kind}.png")
           for kind in ("grain", "reconstruction", "grid")}
  big = _magnify(image, scale)
  viz.save_png(paths["grain"], viz.grain_overlay(big, grain[0], num_grains))
  viz.save_png(paths["reconstruction"], _magnify(viz.to_uint8(recon[0]), scale))
  grid = viz.reconstruction_grid(x, recon, grain, num_grains)
  viz.save_png(paths["grid"], _magnify(grid, scale))

  fine_regions = int(np.sum(grain == num_grains - 1))
  regions = int(grain.size)
  summary = {
      "image": os.path.abspath(path),
      "checkpoint": stage1.source,
      "original_size": list(original),
      "resolution": size,
      "num_grains": num_grains,
      "regions": regions,
      "fine_regions": fine_regions,
      "fine_ratio": float(fine_fraction(grain, num_grains)),
      "num_tokens": int(viz.codes_per_image(grain, num_grains)[0]),
      "sequence_length": layout.sequence_length(fine_regions),
      "coarse_grid_tokens": layout.num_coarse_cells,
      "fine_grid_tokens": layout.num_fine_cells,
      "distinct_codes": int(np.unique(codes).size),
      "psnr": float(np.asarray(metrics.psnr(x, recon))[0]),
      "scale": scale,
      "files": {**paths, "tokens": os.path.join(out_dir, f"{stem}_tokens.json")},
  }
  with open(summary["files"]["tokens"], "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dq.tools.tokenize_image",
      description="Grain overlay, reconstruction and token count of image files.")
  parser.add_argument("images", nargs="+", metavar="IMG", help="image files (any size)")
  parser.add_argument("--checkpoint", required=True,
                      help="DQ-VAE: stage-1 workdir, its checkpoint, or a converted folder")
  parser.add_argument("--out", default=".", help="output folder (default: current folder)")
  parser.add_argument("--scale", type=int, default=None,
                      help="PNG magnification (default: enough for 256 px)")
  args = parser.parse_args(argv)
  from dq import tokenizer as stage1_lib

  try:
    stage1 = stage1_lib.load_stage1(args.checkpoint)
    encode_fn, decode_fn = stage1_lib.make_encode_fn(stage1), stage1_lib.make_decode_fn(stage1)
    os.makedirs(args.out, exist_ok=True)
    for path, stem in zip(args.images, output_stems(args.images)):
      summary = tokenize_image(path, stage1, args.out, args.scale, encode_fn, decode_fn, stem)
      print(json.dumps(summary))
  except (FileNotFoundError, ValueError) as error:
    print(f"tokenize_image: error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
