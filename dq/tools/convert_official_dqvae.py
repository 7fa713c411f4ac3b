"""Converts an official DQ-VAE PyTorch checkpoint into DQVAE variables and a model config.

CLI (no torch needed):
  python -m dq.tools.convert_official_dqvae IN.ckpt OUT [--config-out OUT/model_config.json]
      [--resolution R] [--allow-unknown-objects]
writes `OUT/params.npz` (keys `params/<a>/<b>/...` and `codebook/quantize/...`) and the
inferred `config.model` fields as JSON; `dq.official.dqvae.load_converted(OUT)` reads both
back. The conversion (and its key mapping) is `dq.official.dqvae`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from dq.official.dqvae import convert_checkpoint, flatten


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dq.tools.convert_official_dqvae",
      description="Convert an official DQ-VAE PyTorch checkpoint (no torch needed).")
  parser.add_argument("checkpoint", help="official .ckpt/.pth (Lightning or plain state dict)")
  parser.add_argument("out", help="output folder for params.npz and model_config.json")
  parser.add_argument("--config-out", default=None,
                      help="where to write the model config JSON (default OUT/model_config.json)")
  parser.add_argument("--resolution", type=int, default=None,
                      help="image size; needed when the decoder has no learned position table")
  parser.add_argument("--allow-unknown-objects", action="store_true",
                      help="replace non-tensor objects outside the state dict by inert "
                           "placeholders instead of refusing the file")
  args = parser.parse_args(argv)
  try:
    variables, cfg = convert_checkpoint(args.checkpoint, args.out, config_out=args.config_out,
                                        resolution=args.resolution,
                                        allow_unknown=args.allow_unknown_objects)
  except (OSError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  count = sum(np.size(v) for v in flatten(variables["params"]).values())
  fields = ("resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
            "num_grains", "codebook_size", "embed_dim", "dec_ch", "dec_ch_mult",
            "dec_num_res_blocks", "dec_attn_resolutions", "position_type")
  summary = ", ".join(f"{f}={cfg[f]}" for f in fields)
  print(f"converted {count:,} parameters to {args.out}: router={cfg['router']['kind']}, {summary}")
  if cfg["router"]["kind"] == "entropy":
    print("entropy router: set config.model.router.thresholds_path (dq.tools.entropy_thresholds)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
