"""Converts an official DQ-Transformer (StackGPT / Dualformer) checkpoint into dq params.

`convert_checkpoint(IN.ckpt, OUT)` (no torch needed; CLI: `python -m
dq.tools.convert_official_transformer`) writes `OUT/params.npz` (keys `params/<a>/<b>/...`) and
`OUT/transformer_config.json` with the `config.model` fields (n_embd, n_head, layer counts,
block_size) and the token layout (grids, codebook size, classes).
`load_converted_transformer(OUT)` reads both back; `python -m dq.main
--config=configs/ffhq_transformer.py --config.init_from=OUT` starts from it.

Shapes give everything but the number of heads (`n_head`, official configs use 8) and, for a
class-conditional model, how the content vocabulary splits into codes and classes: by default the
codebook is `vocab_size - 3` (unconditional).

Key mapping (`convert_stackgpt_state_dict`): Linear weights [out, in] become Dense kernels
[in, out]; embeddings and `pos_emb` are kept as they are; the `attn.mask` buffers (a fixed lower
triangle) are dropped. A Dualformer checkpoint's `transformer.` prefix is accepted. Unknown keys
raise.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Optional

import numpy as np

from dq.official.dqvae import flatten, unflatten

PARAMS_FILE = "params.npz"
CONFIG_FILE = "transformer_config.json"

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
           **{f"params/{k}": np.asarray(v) for k, v in flatten(params).items()})
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
  return unflatten({k[len("params/"):]: v for k, v in flat.items()}), config


def convert_checkpoint(in_path: str, out_dir: str, *, n_head: int = 8,
                       codebook_size: Optional[int] = None, num_classes: int = 0,
                       allow_unknown: bool = False) -> tuple[dict, dict]:
  """Reads an official checkpoint, converts and saves it; returns (params, config)."""
  from dq.official.torch_pickle import load_torch_state_dict

  sd = load_torch_state_dict(in_path, allow_unknown=allow_unknown)
  prefix = "transformer."
  if any(k.startswith(prefix) for k in sd):
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}  # drop the stage-1 copy
  params = convert_stackgpt_state_dict(sd)
  config = infer_transformer_config(params, n_head, codebook_size, num_classes)
  save_converted_transformer(out_dir, params, config)
  return params, config
