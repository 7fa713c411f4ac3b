"""Converts an official DQ-VAE PyTorch checkpoint into DQVAE variables and a model config.

`convert_checkpoint(IN.ckpt, OUT)` (no torch needed; CLI: `python -m
dq.tools.convert_official_dqvae`) writes `OUT/params.npz` (keys `params/<a>/<b>/...` and
`codebook/quantize/...`) and the inferred `config.model` fields as JSON;
`load_converted(OUT)` reads both back.

Key mapping (dual and triple layouts, any widths, levels or resolution):
  `a.0.b.1.weight`        -> `a_0/b_1/{kernel|scale}` (a dotted index joins its parent name),
  `encoder.router.*`      -> `router/*` (the router is a top-level module here; an entropy
                             router has no weights),
  `decoder.position_bias_fourier.lff.ffm.conv.*` ('fourier+learned') and
  `decoder.position_bias.lff.ffm.conv.*` ('fourier') -> `decoder/fourier_conv/*`,
  `decoder.position_bias_learned.{row,col}_embed.weight` -> `decoder/{row,col}_embed`,
  `quantize.codebook.weight[:-1]` (the padding row K is dropped), `cluster_size_ema`,
  `embed_ema` -> codebook collection `quantize/{embedding,cluster_size,embed_sum}` (missing
  EMA buffers default to cluster_size = 1, embed_sum = embedding, the quantizer's own init).
Conv kernels [out, in, kh, kw] become [kh, kw, in, out], Linear [out, in] becomes [in, out], 1-D
weights (GroupNorm) become `scale`. Keys under `loss.` (discriminator, LPIPS) are skipped, and so
are `decoder.position_bias.{row,col}_embed` of position types 'learned' / 'learned-relative':
the official decoder builds those tables but its forward never adds them ('none' here).
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

SKIPPED_PREFIXES = ("loss.", "decoder.position_bias.row_embed.",
                    "decoder.position_bias.col_embed.")
SPECIAL_PATHS = {
    "decoder.position_bias_fourier.lff.ffm.conv": ("decoder", "fourier_conv"),
    "decoder.position_bias.lff.ffm.conv": ("decoder", "fourier_conv"),
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
TUPLE_FIELDS = ("ch_mult", "attn_resolutions", "dec_ch_mult", "dec_attn_resolutions")
PARAMS_FILE = "params.npz"
CONFIG_FILE = "model_config.json"


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


def _param_target(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """Parameter path and converted value of one official (non-codebook) tensor."""
  if key in EMBEDDING_TABLES:
    return EMBEDDING_TABLES[key], value
  dotted, _, leaf = key.rpartition(".")
  if not dotted:
    raise ValueError(f"state-dict key {key!r} has no module path")
  name, converted = _leaf(key, leaf, value)
  return _module_path(dotted) + (name,), converted


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
    else:
      path, converted = _param_target(key, value)
      _insert(params, path, converted, key)
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


class _Shapes:
  """Shape look-ups on a state dict with errors that say what was being inferred."""

  def __init__(self, sd: Mapping[str, Any]):
    self.shapes = {k: tuple(np.shape(v)) for k, v in sd.items() if not k.startswith("loss.")}

  def __contains__(self, key: str) -> bool:
    return key in self.shapes

  def get(self, key: str, what: str) -> tuple[int, ...]:
    if key not in self.shapes:
      raise ValueError(f"state dict has no {key!r} (needed to infer {what}); is this an "
                       "official DQ-VAE (DualGrain/TripleGrainVQModel) checkpoint?")
    return self.shapes[key]

  def count(self, pattern: str) -> int:
    """Number of consecutive indices i = 0, 1, ... for which `pattern.format(i)` exists."""
    n = 0
    while pattern.format(n) in self.shapes:
      n += 1
    return n

  def has_prefix(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in self.shapes)


def _multipliers(field: str, widths: Sequence[int], base: int) -> tuple[int, ...]:
  if any(w % base for w in widths):
    raise ValueError(f"{field}: level widths {tuple(widths)} are not multiples of ch={base}")
  return tuple(w // base for w in widths)


def _expect_shape(shapes: _Shapes, key: str, expected: tuple[int, ...], what: str) -> None:
  got = shapes.get(key, what)
  if got != expected:
    raise ValueError(f"{key!r} has shape {got}; expected {expected} for {what}")


def _router_kind(shapes: "_Shapes", num_grains: int, z_channels: int,
                 names: Sequence[str]) -> str:
  """'feature' when the state dict has router weights (checked against the one supported
  official router), else 'entropy'."""
  if not shapes.has_prefix("encoder.router."):
    return "entropy"
  width = num_grains * z_channels
  what = ("a feature router with 'group-N' norms and a '2layer-fc' gate (the only official "
          "router with weights that is supported)")
  _expect_shape(shapes, "encoder.router.gate.0.weight", (width, width), what)
  _expect_shape(shapes, "encoder.router.gate.2.weight", (num_grains, width), what)
  for name in names:
    _expect_shape(shapes, f"encoder.router.feature_norm_{name}.weight", (z_channels,), what)
  return "feature"


def _position_type_and_resolution(shapes: "_Shapes", dec_levels: int,
                                  resolution: int | None) -> tuple[str, int]:
  """The decoder's position type and the image resolution (from a learned position table, or
  the given `resolution`; both must agree when both exist)."""
  latent_size = None
  if shapes.has_prefix("decoder.position_bias_fourier.") and shapes.has_prefix(
      "decoder.position_bias_learned."):
    position_type = "fourier+learned"
    latent_size = shapes.get("decoder.position_bias_learned.row_embed.weight", "latent size")[0]
  elif shapes.has_prefix("decoder.position_bias.lff."):
    position_type = "fourier"
  else:
    position_type = "none"  # Includes 'learned': the official forward never adds its tables.
  inferred = latent_size * 2 ** (dec_levels - 1) if latent_size else None
  if resolution is None and inferred is None:
    raise ValueError(f"cannot infer the image resolution (decoder position type "
                     f"{position_type!r} has no learned table): pass --resolution")
  if resolution is not None and inferred is not None and int(resolution) != inferred:
    raise ValueError(f"resolution {resolution} disagrees with the checkpoint: its {latent_size}"
                     f"-row position table and {dec_levels} decoder levels give {inferred}")
  return position_type, int(resolution if resolution is not None else inferred)


def infer_model_config(sd: Mapping[str, Any], resolution: int | None = None) -> dict[str, Any]:
  """`config.model` (see `dq.models.build.default_model_config`) from official tensor shapes.

  Shapes give every width, level, block count, attention level, grain count, router kind,
  codebook size and position type. The image resolution follows from a learned position table
  ('fourier+learned'); otherwise pass `resolution`. Not in a state dict, hence defaults: dropout,
  beta, EMA decay, norm groups (32), the router's thresholds and target ratios.
  """
  from dq.models.build import default_model_config  # Deferred: imports jax.
  from dq.models.encoder import grain_names

  shapes = _Shapes(sd)
  ch, in_channels = shapes.get("encoder.conv_in.weight", "the encoder width ch")[:2]
  num_levels = shapes.count("encoder.down.{}.block.0.conv1.weight")
  num_res_blocks = shapes.count("encoder.down.0.block.{}.conv1.weight")
  if not num_levels or not num_res_blocks:
    raise ValueError("state dict has no 'encoder.down.0.block.0.conv1.weight' (encoder levels)")
  widths = [shapes.get(f"encoder.down.{i}.block.{num_res_blocks - 1}.conv2.weight",
                       f"the width of encoder level {i}")[0] for i in range(num_levels)]
  ch_mult = _multipliers("ch_mult", widths, ch)
  attn_levels = [i for i in range(num_levels) if f"encoder.down.{i}.attn.0.q.weight" in shapes]
  num_grains = 3 if shapes.has_prefix("encoder.conv_out_median.") else 2
  names = grain_names(num_grains)
  z_channels = shapes.get("encoder.conv_out_coarse.weight", "z_channels")[0]
  for g, name in enumerate(names):
    tap_width = widths[num_levels - 1 - g]
    _expect_shape(shapes, f"encoder.conv_out_{name}.weight", (z_channels, tap_width, 3, 3),
                  f"the {name} tap of encoder level {num_levels - 1 - g}")

  router_kind = _router_kind(shapes, num_grains, z_channels, names)

  codebook_rows, embed_dim = shapes.get("quantize.codebook.weight", "the codebook size")
  _expect_shape(shapes, "quant_conv.weight", (embed_dim, z_channels, 1, 1), "quant_conv")
  _expect_shape(shapes, "post_quant_conv.weight", (z_channels, embed_dim, 1, 1),
                "post_quant_conv")

  dec_levels = shapes.count("decoder.up.{}.block.0.conv1.weight")
  dec_blocks = shapes.count("decoder.up.0.block.{}.conv1.weight")
  if not dec_levels or not dec_blocks:
    raise ValueError("state dict has no 'decoder.up.0.block.0.conv1.weight' (decoder levels)")
  dec_widths = [shapes.get(f"decoder.up.{i}.block.{dec_blocks - 1}.conv2.weight",
                           f"the width of decoder level {i}")[0] for i in range(dec_levels)]
  dec_ch = dec_widths[0] if all(w % dec_widths[0] == 0 for w in dec_widths) else math.gcd(
      *dec_widths)
  dec_attn_levels = [i for i in range(dec_levels) if f"decoder.up.{i}.attn.0.q.weight" in shapes]
  _expect_shape(shapes, "decoder.conv_in.weight", (dec_widths[-1], z_channels, 3, 3),
                "the decoder input (its in_ch must equal z_channels)")

  position_type, resolution = _position_type_and_resolution(shapes, dec_levels, resolution)

  cfg = default_model_config()
  cfg.update(dict(
      resolution=resolution, in_channels=in_channels, ch=ch, ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels),
      z_channels=z_channels, num_grains=num_grains, codebook_size=codebook_rows - 1,
      embed_dim=embed_dim, dec_ch=dec_ch, dec_ch_mult=_multipliers("dec_ch_mult", dec_widths,
                                                                   dec_ch),
      dec_num_res_blocks=dec_blocks - 1,
      dec_attn_resolutions=tuple(resolution // 2 ** i for i in dec_attn_levels),
      position_type=position_type))
  cfg.router.kind = router_kind
  return cfg.to_dict()


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf} (empty dicts vanish)."""
  from flax import traverse_util  # Deferred: imports jax.

  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': leaf} -> nested dicts; ValueError when a key collides with another's leaf
  (`flax.traverse_util.unflatten_dict` would silently overwrite)."""
  tree: dict = {}
  for path, value in flat.items():
    _insert(tree, tuple(path.split("/")), value, path)
  return tree


def check_converted(sd: Mapping[str, Any], variables: Mapping[str, Any],
                    model_cfg: Mapping[str, Any]) -> None:
  """Raises ValueError unless `variables` has exactly the tree of the model `model_cfg` builds."""
  import jax  # Deferred: only needed for the check.
  import jax.numpy as jnp
  import ml_collections

  from dq.models.build import build_dqvae

  cfg = ml_collections.ConfigDict(dict(model_cfg))
  thresholds = (0.5,) * (cfg.num_grains - 1) if cfg.router.kind == "entropy" else ()
  model = build_dqvae(cfg, entropy_thresholds=thresholds)
  images = jnp.zeros((1, cfg.resolution, cfg.resolution, 3), jnp.float32)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            images)
  expected = {k: tuple(v.shape) for k, v in flatten(abstract).items()
              if k.split("/")[0] in ("params", "codebook")}
  got = {k: tuple(np.shape(v)) for k, v in flatten(variables).items()}
  origin = {}
  for key, value in sd.items():
    if not key.startswith(SKIPPED_PREFIXES) and key not in CODEBOOK_BUFFERS:
      origin["params/" + "/".join(_param_target(key, np.asarray(value))[0])] = key
  problems = [f"unexpected {origin.get(k, k)!r} (-> {k})" for k in sorted(set(got) - set(expected))]
  problems += [f"missing {k} {expected[k]}" for k in sorted(set(expected) - set(got))]
  problems += [f"{origin.get(k, k)!r} (-> {k}) has shape {got[k]}, expected {expected[k]}"
               for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
  if problems:
    shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8
                                       else "")
    raise ValueError(f"converted tensors do not fit the inferred DQ-VAE architecture: {shown}")


def save_converted(out_dir: str, variables: Mapping[str, Any], model_cfg: Mapping[str, Any],
                   config_out: str | None = None) -> None:
  """Writes `out_dir/params.npz` (flattened `params/...`, `codebook/...`) and the config JSON."""
  os.makedirs(out_dir, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in flatten(variables).items()}
  np.savez(os.path.join(out_dir, PARAMS_FILE), **flat)
  with open(config_out or os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(dict(model_cfg), f, indent=2, sort_keys=True)


def load_converted(path: str, config_path: str | None = None) -> tuple[dict, dict]:
  """Reads a converted folder: (variables {'params', 'codebook'}, model_cfg dict).

  `model_cfg` holds `config.model` fields (tuple fields as tuples); build the model with
  `build_dqvae(ml_collections.ConfigDict(model_cfg), ...)` (the entropy router needs thresholds).
  """
  params_path = os.path.join(path, PARAMS_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f"{path}: not a converted DQ-VAE (no {PARAMS_FILE}); run "
                            "python -m dq.tools.convert_official_dqvae IN.ckpt OUT first")
  config_path = config_path or os.path.join(os.path.dirname(params_path), CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: model config of {params_path} not found")
  with np.load(params_path) as npz:
    flat = {k: npz[k] for k in npz.files}
  bad = sorted(k for k in flat if k.split("/")[0] not in ("params", "codebook"))
  if bad or not flat:
    raise ValueError(f"{params_path}: keys must start with 'params/' or 'codebook/'; got "
                     f"{bad[:5] or 'no keys'}")
  with open(config_path) as f:
    model_cfg = json.load(f)
  for field in TUPLE_FIELDS:
    if field in model_cfg:
      model_cfg[field] = tuple(model_cfg[field])
  variables = unflatten(flat)
  variables.setdefault("codebook", {})
  return variables, model_cfg


def convert_checkpoint(in_path: str, out_dir: str, *, config_out: str | None = None,
                       resolution: int | None = None,
                       allow_unknown: bool = False) -> tuple[dict, dict]:
  """Reads an official checkpoint, converts, checks and saves it; returns (variables, cfg)."""
  from dq.official.torch_pickle import load_torch_state_dict

  sd = load_torch_state_dict(in_path, allow_unknown=allow_unknown)
  sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
  model_cfg = infer_model_config(sd, resolution)
  params, codebook = convert_state_dict(sd)
  variables = {"params": params, "codebook": codebook}
  check_converted(sd, variables, model_cfg)
  save_converted(out_dir, variables, model_cfg, config_out)
  return variables, model_cfg
