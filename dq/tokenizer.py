"""The tokenizer: the frozen stage-1 DQ-VAE that stage 2 tokenizes images with and decodes
samples through (also what the FID jobs and the tokenize tools load).

`load_stage1(path)` reads either a converted official folder (`params.npz` +
`model_config.json`, written by `python -m dq.tools.convert_official_dqvae`) or a dq stage-1
workdir (`config.json` + orbax checkpoints, written by `dq.train.vae_trainer`). Only dual-grain
models are supported (the token layout has one coarse and one fine grid).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dq.models import entropy
from dq.models.build import build_dqvae
from dq.models.dqvae import DQVAE
from dq.models.grains import grid_factors
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import pack_tokens_jax
from dq.official import dqvae as convert
from dq.run_files import WORKDIR_CONFIG, run_config_path

THRESHOLDS_FILE = "entropy_thresholds.json"
# Parameters that only decode: a DQ-VAE whose other weights are equal makes the same tokens.
DECODE_ONLY_PARAMS = ("decoder", "post_quant_conv")
STAGE1_HINT = ("train stage 1 first (python -m dq.main --config=configs/demo_vae.py "
               "--workdir=DIR) or convert official weights (python -m "
               "dq.tools.convert_official_dqvae)")


@dataclasses.dataclass
class Stage1:
  """A loaded DQ-VAE: module, variables {'params', 'codebook'} and its grid sizes."""
  model: DQVAE
  variables: dict
  model_cfg: ml_collections.ConfigDict
  image_size: int
  coarse_size: tuple[int, int]
  fine_size: tuple[int, int]
  codebook_size: int
  source: str
  fingerprint: str = ""


def _is_converted(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, convert.PARAMS_FILE))
          or (os.path.isfile(path) and path.endswith(".npz")))


def _workdir_of(path: str) -> str:
  """The workdir holding config.json for a workdir, `.../checkpoints` or `.../checkpoints/N`."""
  config = run_config_path(path)
  if config is None:
    raise FileNotFoundError(
        f"{path} is neither a converted DQ-VAE folder (no {convert.PARAMS_FILE}) nor a stage-1 "
        f"workdir (no {WORKDIR_CONFIG}); {STAGE1_HINT}")
  return os.path.dirname(config)


def read_stage1_config(path: str) -> tuple[dict, str]:
  """(model config dict, folder) of the DQ-VAE at `path`, without reading its weights: a
  converted folder's model_config.json, or the config.json of a stage-1 workdir (`path` may be
  the workdir, its checkpoints folder or one checkpoint). `load_stage1` and the config checks
  (dq.validate) find a stage-1 model this one way.

  Raises:
    FileNotFoundError: neither file is there.
    ValueError: the workdir is not a stage-1 run.
  """
  path = os.path.abspath(os.fspath(path))
  if _is_converted(path):
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, convert.CONFIG_FILE)
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"converted DQ-VAE {path} has no {convert.CONFIG_FILE}")
    with open(config_path) as f:
      return json.load(f), directory
  directory = _workdir_of(path)
  config_path = os.path.join(directory, WORKDIR_CONFIG)
  with open(config_path) as f:
    config = json.load(f)
  stage = config.get("stage", "vae")
  if stage != "vae" or not isinstance(config.get("model"), dict):
    raise ValueError(f"{config_path} is the config of a {stage!r} run, not of a stage-1 DQ-VAE "
                     f"(config.stage='vae'); {STAGE1_HINT}")
  return config["model"], directory


def _model_config(model: dict) -> ml_collections.ConfigDict:
  model = dict(model)
  for field in convert.TUPLE_FIELDS:
    if field in model:
      model[field] = tuple(model[field])
  return ml_collections.ConfigDict(model)


def _read_workdir(path: str) -> tuple[dict, ml_collections.ConfigDict, str]:
  """(variables, model config, workdir) of a dq stage-1 workdir or one of its checkpoints."""
  from dq import checkpoint  # Deferred: orbax is heavy.

  model, workdir = read_stage1_config(path)
  try:
    restored = checkpoint.restore_params_from(path, field="stage-1 DQ-VAE")
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (the stage-1 run has saved no checkpoint yet); "
                            f"{STAGE1_HINT}") from e
  missing = [name for name in ("params", "codebook") if name not in restored]
  if missing:
    raise ValueError(f"the checkpoint under {path} has no {missing} (not a DQ-VAE train state)")
  return ({"params": restored["params"], "codebook": restored["codebook"]},
          _model_config(model), workdir)


def _entropy_thresholds(model_cfg: ml_collections.ConfigDict, directory: str) -> tuple:
  """Thresholds of the entropy router from `router.thresholds_path` or DIR/entropy_thresholds
  .json, derived as the stage-1 trainer does (`entropy.resolve_entropy_thresholds`)."""
  if model_cfg.router.kind != "entropy":
    return ()
  path = model_cfg.router.get("thresholds_path") or os.path.join(directory, THRESHOLDS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"the entropy-router DQ-VAE in {directory} needs its threshold table {path} "
        "(model.router.thresholds_path, else DIR/entropy_thresholds.json); copy the table "
        "stage 1 was trained with there or create it with python -m dq.tools.entropy_thresholds")
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.router.thresholds_path = path
  return entropy.resolve_entropy_thresholds(ml_collections.ConfigDict({"model": model_cfg}),
                                            directory)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in leaves}


def _check_shapes(model: DQVAE, variables: dict, source: str) -> None:
  """Raises ValueError unless `variables` has exactly the tree and shapes of `model`."""
  resolution = model.resolution
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, resolution, resolution, 3), jnp.float32))
  expected = _flat_shapes({"params": abstract["params"], "codebook": abstract["codebook"]})
  got = _flat_shapes(variables)
  problems = [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
  problems += [f"missing {k} {expected[k]}" for k in sorted(set(expected) - set(got))]
  problems += [f"{k} has shape {got[k]}, the config builds {expected[k]}"
               for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
  if problems:
    shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more"
                                       if len(problems) > 6 else "")
    raise ValueError(f"stage-1 weights in {source} do not fit the model its config describes: "
                     f"{shown}")


def load_stage1(path: str) -> Stage1:
  """Loads a converted DQ-VAE folder or a dq stage-1 workdir (or one of its checkpoints).

  Raises:
    FileNotFoundError: `path` (or the entropy router's threshold table) does not exist.
    ValueError: not dual grain, or the weights do not fit the config.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"stage-1 DQ-VAE {path} does not exist; {STAGE1_HINT}")
  if _is_converted(path):
    variables, cfg_dict = convert.load_converted(path)
    model_cfg = ml_collections.ConfigDict(cfg_dict)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
  else:
    variables, model_cfg, directory = _read_workdir(path)
  if int(model_cfg.num_grains) != 2:
    raise ValueError(f"stage 2 supports dual-grain DQ-VAEs only; {path} has "
                     f"model.num_grains={model_cfg.num_grains}")
  model = build_dqvae(model_cfg, entropy_thresholds=_entropy_thresholds(model_cfg, directory))
  variables = {"params": variables["params"], "codebook": variables.get("codebook", {})}
  _check_shapes(model, variables, path)
  fingerprint = tokenizer_fingerprint(variables, model.entropy_thresholds)
  variables = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), variables)
  image_size = int(model_cfg.resolution)
  coarse_factor, fine_factor = grid_factors(model_cfg.ch_mult, 2)
  coarse, fine = image_size // coarse_factor, image_size // fine_factor
  return Stage1(model=model, variables=variables, model_cfg=model_cfg, image_size=image_size,
                coarse_size=(coarse, coarse), fine_size=(fine, fine),
                codebook_size=int(model_cfg.codebook_size), source=path,
                fingerprint=fingerprint)


def tokenizer_fingerprint(variables: dict, entropy_thresholds: tuple = ()) -> str:
  """16 hex digits of a SHA-256 over what turns images into tokens: every param but the
  decoder's (`DECODE_ONLY_PARAMS`), the codebook vectors (float32, in path order) and the
  entropy router's thresholds.

  Two DQ-VAEs with equal fingerprints make the same tokens (a decoder fine-tune keeps it);
  another or a further-trained model gets another one.
  """
  digest = hashlib.sha256(f"entropy_thresholds={tuple(map(float, entropy_thresholds))};"
                          .encode())
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": {k: v for k, v in variables["params"].items() if k not in DECODE_ONLY_PARAMS},
       "codebook": variables.get("codebook", {})})[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    name = jax.tree_util.keystr(path)
    if name.startswith("['codebook']") and not name.endswith("['embedding']"):
      continue  # EMA statistics do not change the tokens
    array = np.ascontiguousarray(np.asarray(leaf, np.float32))
    digest.update(f"{name}:{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def token_layout(stage1: Stage1, num_classes: int = 0,
                 max_len: Optional[int] = None) -> TokenLayout:
  """The TokenLayout of the stage-1 grids and codebook."""
  return TokenLayout(stage1.coarse_size, stage1.fine_size, stage1.codebook_size,
                     num_classes=num_classes, max_len=max_len)


def _encode(model: DQVAE, variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  return model.apply(variables, images.astype(jnp.float32), method="encode")


# Module-level jits with the (hashable) model static: equal models share compiled code.
_encode_jit = jax.jit(_encode, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(model: DQVAE, variables: dict, codes: jax.Array) -> jax.Array:
  images = model.apply(variables, codes.astype(jnp.int32), method="decode")
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def make_encode_fn(stage1: Stage1) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Jitted images [B, H, W, 3] in [-1, 1] -> (codes int32 [B, hf, wf], grain int32 [B, hc, wc])."""
  model, variables = stage1.model, stage1.variables
  return lambda images: _encode_jit(model, variables, images)


def make_decode_fn(stage1: Stage1) -> Callable[[jax.Array], jax.Array]:
  """Jitted codes [B, hf, wf] -> images float32 [B, H, W, 3] clipped to [-1, 1]."""
  model, variables = stage1.model, stage1.variables
  return lambda codes: _decode_jit(model, variables, codes)


def _check_layout(stage1: Stage1, layout: TokenLayout) -> None:
  for field in ("coarse_size", "fine_size", "codebook_size"):
    if getattr(layout, field) != getattr(stage1, field):
      raise ValueError(f"TokenLayout.{field}={getattr(layout, field)} does not match the "
                       f"stage-1 model {stage1.source} ({field}={getattr(stage1, field)})")


def make_image_token_fn(stage1: Stage1, layout: TokenLayout, fine_order: str = "row"
                        ) -> Callable[..., dict]:
  """Jittable fn(images [B, H, W, 3], labels [B] or None, rng or None, variables=None) ->
  packed tokens.

  With `rng`, image b is flipped horizontally before encoding where
  `jax.random.bernoulli(rng, 0.5, [B])[b]`. Labels are required for a class-conditional
  layout and refused for an unconditional one. Returns pack_tokens_jax's dict
  (content/position/segment int32, valid bool, each [B, max_len]).

  `variables` defaults to `stage1.variables`; inside your own `jax.jit`, pass them as a jit
  argument instead, or the DQ-VAE weights are baked into the compiled program as constants.
  """
  _check_layout(stage1, layout)

  def image_tokens(images: jax.Array, labels: Optional[jax.Array] = None,
                   rng: Optional[jax.Array] = None, variables: Optional[dict] = None) -> dict:
    if (labels is None) != (layout.num_classes == 0):
      raise ValueError(f"labels must be given exactly when the layout is class-conditional "
                       f"(num_classes={layout.num_classes}); got labels={labels is not None}")
    images = jnp.asarray(images, jnp.float32)  # [B, H, W, 3]
    if rng is not None:
      flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))  # [B]
      images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    variables = stage1.variables if variables is None else variables
    codes, grain = _encode(stage1.model, variables, images)
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    return pack_tokens_jax(codes, grain, layout, labels, fine_order=fine_order)

  return image_tokens
