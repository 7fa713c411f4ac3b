"""Converts an official `StackGPT.state_dict()` into `StackedTransformer` params.

Linear weights [out, in] become Dense kernels [in, out]; embeddings and `pos_emb` are kept as
they are; the `attn.mask` buffers (a fixed lower triangle) are dropped. A Dualformer checkpoint's
`transformer.` prefix is accepted. Unknown keys raise.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

_EMBEDDINGS = ("content_emb", "content_coarse_pos_emb", "content_fine_pos_emb", "seg_emb")
_BLOCK_LINEARS = {"attn.query": ("attn", "query"), "attn.key": ("attn", "key"),
                  "attn.value": ("attn", "value"), "attn.proj": ("attn", "proj"),
                  "mlp.0": ("mlp_fc",), "mlp.2": ("mlp_proj",)}
_BLOCK_NORMS = {"ln1": ("ln1",), "ln2": ("ln2",)}
_BLOCK_KEY = re.compile(r"^(position|content)_transformer\.(\d+)\.(.+)\.(weight|bias)$")
_MASK_KEY = re.compile(r"^(position|content)_transformer\.\d+\.attn\.mask$")
_HEAD_KEY = re.compile(r"^(position|content)_head\.([01])\.(weight|bias)$")


def _set(params: dict[str, Any], path: tuple[str, ...], value: np.ndarray, key: str) -> None:
  node = params
  for name in path[:-1]:
    node = node.setdefault(name, {})
  if path[-1] in node:
    raise ValueError(f"state_dict key {key!r} maps to {'/'.join(path)}, which is already set")
  node[path[-1]] = value


def _linear_or_norm(kind: str, leaf: str, value: np.ndarray, key: str) -> tuple[str, np.ndarray]:
  """Flax leaf name and value of a Linear ('linear') or LayerNorm ('norm') tensor."""
  if kind == "norm":
    return ("scale" if leaf == "weight" else "bias"), value
  if leaf == "bias":
    return "bias", value
  if value.ndim != 2:
    raise ValueError(f"state_dict key {key!r}: Linear weight must be 2-D [out, in]; got shape "
                     f"{value.shape}")
  return "kernel", value.T


def convert_stackgpt_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Maps official StackGPT tensors to a `StackedTransformer` params tree (numpy float32).

  Args:
    state_dict: `StackGPT.state_dict()` as numpy-convertible arrays, keys optionally prefixed
      with `transformer.` (Dualformer checkpoints).

  Returns:
    The `params` collection (pass as `{"params": ...}` to `apply`).
  """
  params: dict[str, Any] = {}
  for raw_key, raw_value in state_dict.items():
    key = raw_key[len("transformer."):] if raw_key.startswith("transformer.") else raw_key
    value = np.asarray(raw_value, dtype=np.float32)
    if key == "pos_emb":
      if value.ndim != 3 or value.shape[0] != 1:
        raise ValueError(f"state_dict key {raw_key!r}: pos_emb must be [1, block_size, n_embd]; "
                         f"got shape {value.shape}")
      _set(params, ("pos_emb",), value, raw_key)
      continue
    name, _, leaf = key.rpartition(".")
    if name in _EMBEDDINGS and leaf == "weight":
      _set(params, (name, "embedding"), value, raw_key)
      continue
    block = _BLOCK_KEY.match(key)
    if block:
      stack, index, module, leaf = block.groups()
      if module in _BLOCK_LINEARS:
        path, kind = _BLOCK_LINEARS[module], "linear"
      elif module in _BLOCK_NORMS:
        path, kind = _BLOCK_NORMS[module], "norm"
      else:
        raise ValueError(f"unknown StackGPT state_dict key {raw_key!r}")
      flax_leaf, converted = _linear_or_norm(kind, leaf, value, raw_key)
      _set(params, (f"{stack}_block_{index}",) + path + (flax_leaf,), converted, raw_key)
      continue
    if _MASK_KEY.match(key):
      continue
    head = _HEAD_KEY.match(key)
    if head:
      stack, index, leaf = head.groups()
      if index == "1" and leaf == "bias":
        raise ValueError(f"state_dict key {raw_key!r}: the official heads' Linear has no bias")
      kind, module = ("norm", "ln") if index == "0" else ("linear", "linear")
      flax_leaf, converted = _linear_or_norm(kind, leaf, value, raw_key)
      _set(params, (f"{stack}_head", module, flax_leaf), converted, raw_key)
      continue
    raise ValueError(f"unknown StackGPT state_dict key {raw_key!r}")
  if not params:
    raise ValueError("state_dict holds no StackGPT parameters")
  return params
