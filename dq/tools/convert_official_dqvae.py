"""Maps an official DQ-VAE PyTorch state dict onto DQVAE variables.

Key mapping (dual and triple layouts, any widths, levels or resolution):
  `a.0.b.1.weight`        -> `a_0/b_1/{kernel|scale}` (a dotted index joins its parent name),
  `encoder.router.*`      -> `router/*` (the router is a top-level module here),
  `...position_bias_fourier.lff.ffm.conv.*` -> `decoder/fourier_conv/*`,
  `...position_bias_learned.{row,col}_embed.weight` -> `decoder/{row,col}_embed`,
  `quantize.codebook.weight[:-1]` (the padding row K is dropped), `cluster_size_ema`,
  `embed_ema` -> codebook collection `quantize/{embedding,cluster_size,embed_sum}` (missing
  EMA buffers default to cluster_size = 1, embed_sum = embedding, the quantizer's own init).
Conv kernels [out, in, kh, kw] become [kh, kw, in, out], Linear [out, in] becomes [in, out], 1-D
weights (GroupNorm) become `scale`. Keys under `loss.` (discriminator, LPIPS) are skipped.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SKIPPED_PREFIXES = ("loss.",)
SPECIAL_PATHS = {
    "decoder.position_bias_fourier.lff.ffm.conv": ("decoder", "fourier_conv"),
}
EMBEDDING_TABLES = {
    "decoder.position_bias_learned.row_embed.weight": ("decoder", "row_embed"),
    "decoder.position_bias_learned.col_embed.weight": ("decoder", "col_embed"),
}
CODEBOOK_BUFFERS = {
    "quantize.codebook.weight": "embedding",
    "quantize.codebook.cluster_size_ema": "cluster_size",
    "quantize.codebook.embed_ema": "embed_sum",
}


def _module_path(dotted: str) -> tuple[str, ...]:
  """`encoder.down.0.block.1` -> ('encoder', 'down_0', 'block_1'); router moved to the top."""
  if dotted in SPECIAL_PATHS:
    return SPECIAL_PATHS[dotted]
  if dotted.startswith("encoder.router."):
    dotted = dotted[len("encoder."):]
  path: list[str] = []
  for token in dotted.split("."):
    if token.isdigit():
      if not path:
        raise ValueError(f"state-dict key part {dotted!r} starts with an index")
      path[-1] = f"{path[-1]}_{token}"
    else:
      path.append(token)
  return tuple(path)


def _leaf(key: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf == "bias":
    return "bias", value
  if leaf != "weight":
    raise ValueError(f"state-dict key {key!r}: unknown tensor name {leaf!r} (expected weight "
                     "or bias)")
  if value.ndim == 4:
    return "kernel", np.transpose(value, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
  if value.ndim == 2:
    return "kernel", value.T  # Linear [out, in] -> [in, out]
  if value.ndim == 1:
    return "scale", value  # GroupNorm
  raise ValueError(f"state-dict key {key!r}: weight of shape {value.shape} is not a conv, "
                   "linear or norm weight")


def _insert(tree: dict, path: tuple[str, ...], value: np.ndarray, key: str) -> None:
  node = tree
  for name in path[:-1]:
    node = node.setdefault(name, {})
    if not isinstance(node, dict):
      raise ValueError(f"state-dict key {key!r} collides with a tensor at {'/'.join(path)}")
  if path[-1] in node:
    raise ValueError(f"state-dict key {key!r} maps to {'/'.join(path)} twice")
  node[path[-1]] = value


def convert_state_dict(sd: Mapping[str, Any]) -> tuple[dict, dict]:
  """Converts official DQ-VAE tensors (numpy-convertible, PyTorch keys) to DQVAE variables.

  Returns:
    (params, codebook_state): use as `{'params': params, 'codebook': codebook_state}`.
  """
  params: dict = {}
  codebook: dict = {}
  for key, tensor in sd.items():
    if key.startswith(SKIPPED_PREFIXES):
      continue
    value = np.asarray(tensor, dtype=np.float32)
    if key in CODEBOOK_BUFFERS:
      codebook[CODEBOOK_BUFFERS[key]] = value
    elif key in EMBEDDING_TABLES:
      _insert(params, EMBEDDING_TABLES[key], value, key)
    else:
      dotted, _, leaf = key.rpartition(".")
      if not dotted:
        raise ValueError(f"state-dict key {key!r} has no module path")
      name, converted = _leaf(key, leaf, value)
      _insert(params, _module_path(dotted) + (name,), converted, key)
  if "embedding" not in codebook:
    raise ValueError("state dict has no 'quantize.codebook.weight' (the codebook)")
  weight = codebook["embedding"]
  if weight.ndim != 2 or weight.shape[0] < 2:
    raise ValueError(f"'quantize.codebook.weight' has shape {weight.shape}; expected [K+1, D] "
                     "with the padding row last")
  num_codes, dim = weight.shape[0] - 1, weight.shape[1]
  codebook["embedding"] = weight[:-1]
  codebook.setdefault("cluster_size", np.ones((num_codes,), np.float32))
  codebook.setdefault("embed_sum", codebook["embedding"] * codebook["cluster_size"][:, None])
  expected = {"cluster_size": (num_codes,), "embed_sum": (num_codes, dim)}
  for name, shape in expected.items():
    if codebook[name].shape != shape:
      raise ValueError(f"codebook {name!r} has shape {codebook[name].shape}; expected {shape} "
                       f"for a codebook of {num_codes} x {dim}")
  return params, {"quantize": codebook}
