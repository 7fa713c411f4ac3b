"""Converts an official DQ-Transformer (StackGPT / Dualformer) checkpoint into dq params.

CLI (no torch needed):
  python -m dq.tools.convert_official_transformer IN.ckpt OUT [--n_head 8]
      [--codebook_size K] [--num_classes C] [--allow-unknown-objects]
writes `OUT/params.npz` (keys `params/<a>/<b>/...`) and `OUT/transformer_config.json` with the
`config.model` fields (n_embd, n_head, layer counts, block_size) and the token layout (grids,
codebook size, classes). `load_converted_transformer(OUT)` reads both back;
`python -m dq.main --config=configs/ffhq_transformer.py --config.init_from=OUT` starts from it.

Shapes give everything but the number of heads (`--n_head`, official configs use 8) and, for a
class-conditional model, how the content vocabulary splits into codes and classes: by default the
codebook is `vocab_size - 3` (unconditional). The key mapping is in
`dq.stage2.convert_official.convert_stackgpt_state_dict`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dq.stage2.convert_official import convert_stackgpt_state_dict
from dq.tools.convert_official_dqvae import _flatten, _unflatten

PARAMS_FILE = "params.npz"
CONFIG_FILE = "transformer_config.json"


def _square_side(cells: int, what: str) -> int:
  side = math.isqrt(cells)
  if side * side != cells:
    raise ValueError(f"{what}: {cells} cells is not a square grid")
  return side


def infer_transformer_config(params: Mapping[str, Any], n_head: int,
                             codebook_size: Optional[int] = None,
                             num_classes: int = 0) -> dict[str, Any]:
  """{'model': config.model fields, 'layout': TokenLayout fields} from converted params."""
  n_embd = int(np.shape(params["content_emb"]["embedding"])[1])
  if n_head < 1 or n_embd % n_head:
    raise ValueError(f"--n_head={n_head} must divide n_embd={n_embd}")
  vocab = int(np.shape(params["content_emb"]["embedding"])[0])
  coarse_cells = int(np.shape(params["content_coarse_pos_emb"]["embedding"])[0]) - 3
  fine_cells = int(np.shape(params["content_fine_pos_emb"]["embedding"])[0]) - 3
  coarse, fine = (_square_side(coarse_cells, "content_coarse_pos_emb"),
                  _square_side(fine_cells, "content_fine_pos_emb"))
  if fine != 2 * coarse:
    raise ValueError(f"fine grid {fine}x{fine} is not twice the coarse grid {coarse}x{coarse} "
                     "(dual grain only)")
  codebook = vocab - 3 if codebook_size is None else int(codebook_size)
  expected_vocab = codebook + 3 + (num_classes + 1 if num_classes else 0)
  if expected_vocab != vocab:
    raise ValueError(
        f"content vocabulary has {vocab} ids, but codebook_size={codebook} with "
        f"num_classes={num_classes} needs {expected_vocab} (codes + pad/eos/sos"
        f"{' + classes + null class' if num_classes else ''}); pass --codebook_size/--num_classes")
  count = lambda stack: sum(1 for name in params if name.startswith(f"{stack}_block_"))
  block_size = int(np.shape(params["pos_emb"])[1])
  return {
      "model": {"n_embd": n_embd, "n_head": int(n_head), "position_layers": count("position"),
                "content_layers": count("content"), "block_size": block_size},
      "layout": {"coarse_size": coarse, "fine_size": fine, "codebook_size": codebook,
                 "num_classes": int(num_classes), "max_len": min(block_size + 1,
                                                                 fine * fine + 4)},
  }


def save_converted_transformer(out_dir: str, params: Mapping[str, Any],
                               config: Mapping[str, Any]) -> None:
  """Writes `out_dir/params.npz` and `out_dir/transformer_config.json`."""
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, PARAMS_FILE),
           **{f"params/{k}": np.asarray(v) for k, v in _flatten(params).items()})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)


def load_converted_transformer(path: str) -> tuple[dict, dict]:
  """(params tree, {'model': ..., 'layout': ...}) from a folder written by this tool."""
  params_path, config_path = (os.path.join(path, PARAMS_FILE), os.path.join(path, CONFIG_FILE))
  for required in (params_path, config_path):
    if not os.path.isfile(required):
      raise FileNotFoundError(f"{path}: not a converted DQ-Transformer (no "
                              f"{os.path.basename(required)}); run python -m "
                              "dq.tools.convert_official_transformer IN.ckpt OUT first")
  with np.load(params_path) as npz:
    flat = {k: npz[k] for k in npz.files}
  bad = sorted(k for k in flat if not k.startswith("params/"))
  if bad or not flat:
    raise ValueError(f"{params_path}: keys must start with 'params/'; got {bad[:5] or 'none'}")
  with open(config_path) as f:
    config = json.load(f)
  return _unflatten({k[len("params/"):]: v for k, v in flat.items()}), config


def convert_checkpoint(in_path: str, out_dir: str, *, n_head: int = 8,
                       codebook_size: Optional[int] = None, num_classes: int = 0,
                       allow_unknown: bool = False) -> tuple[dict, dict]:
  """Reads an official checkpoint, converts and saves it; returns (params, config)."""
  from dq.tools.torch_pickle import load_torch_state_dict

  sd = load_torch_state_dict(in_path, allow_unknown=allow_unknown)
  prefix = "transformer."
  if any(k.startswith(prefix) for k in sd):
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}  # drop the stage-1 copy
  params = convert_stackgpt_state_dict(sd)
  config = infer_transformer_config(params, n_head, codebook_size, num_classes)
  save_converted_transformer(out_dir, params, config)
  return params, config


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dq.tools.convert_official_transformer",
      description="Convert an official DQ-Transformer checkpoint (no torch needed).")
  parser.add_argument("checkpoint", help="official .ckpt/.pth (Lightning or plain state dict)")
  parser.add_argument("out", help="output folder for params.npz and transformer_config.json")
  parser.add_argument("--n_head", type=int, default=8, help="attention heads (not in weights)")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="codes in the content vocabulary (default: vocab_size - 3)")
  parser.add_argument("--num_classes", type=int, default=0,
                      help="classes of a class-conditional model (0: unconditional)")
  parser.add_argument("--allow-unknown-objects", action="store_true",
                      help="replace non-tensor objects outside the state dict by placeholders")
  args = parser.parse_args(argv)
  try:
    params, config = convert_checkpoint(
        args.checkpoint, args.out, n_head=args.n_head, codebook_size=args.codebook_size,
        num_classes=args.num_classes, allow_unknown=args.allow_unknown_objects)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for v in _flatten(params).values())
  print(f"converted {count:,} parameters to {args.out}: model {config['model']}, "
        f"layout {config['layout']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
