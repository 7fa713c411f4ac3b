"""Converts an official DQ-Transformer (StackGPT / Dualformer) checkpoint into dq params.

CLI (no torch needed):
  python -m dq.tools.convert_official_transformer IN.ckpt OUT [--n_head 8]
      [--codebook_size K] [--num_classes C] [--allow-unknown-objects]
writes `OUT/params.npz` (keys `params/<a>/<b>/...`) and `OUT/transformer_config.json` with the
`config.model` fields (n_embd, n_head, layer counts, block_size) and the token layout (grids,
codebook size, classes). `dq.official.transformer.load_converted_transformer(OUT)` reads both
back; `python -m dq.main --config=configs/ffhq_transformer.py --config.init_from=OUT` starts
from it.

Shapes give everything but the number of heads (`--n_head`, official configs use 8) and, for a
class-conditional model, how the content vocabulary splits into codes and classes: by default the
codebook is `vocab_size - 3` (unconditional). The conversion is `dq.official.transformer`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from dq.official.dqvae import flatten
from dq.official.transformer import convert_checkpoint


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
  count = sum(np.size(v) for v in flatten(params).values())
  print(f"converted {count:,} parameters to {args.out}: model {config['model']}, "
        f"layout {config['layout']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
