"""A tiny random dual-grain DQ-VAE saved as a converted folder, for stage-2 tests.

32 px images, coarse grid 4x4 (factor 8), fine grid 8x8 (factor 4), codebook 16 x 8. The
feature router's last layer is calibrated on the embedded data (`tiny_data_config`) so that
about half of the coarse regions go to each grain; the entropy router gets a threshold table
(`entropy_thresholds.json`, fine ratio 0.5) computed on the same images.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dq.data import embedded, transforms
from dq.data.config import default_data_config
from dq.models.build import build_dqvae, default_model_config
from dq.official.dqvae import save_converted

IMAGE_SIZE = 32
CALIBRATION_IMAGES = {"train": 64, "eval": 16}
ROUTER_KINDS = ("feature", "entropy")


def tiny_model_config(router: str = "feature") -> ml_collections.ConfigDict:
  """`config.model` of the tiny dual-grain DQ-VAE (32 px, 4x4 coarse, 8x8 fine, 16 codes)."""
  cfg = default_model_config()
  cfg.update(dict(
      resolution=IMAGE_SIZE, ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(),
      z_channels=8, norm_groups=4, codebook_size=16, embed_dim=8, dec_ch=8, dec_ch_mult=(1, 1, 2),
      dec_num_res_blocks=0, dec_attn_resolutions=()))
  cfg.router.kind = router
  cfg.router.norm_groups = 4
  cfg.router.fine_ratio = 0.5
  return cfg


def tiny_data_config(train_size: int = 48, eval_size: int = 16) -> ml_collections.ConfigDict:
  """Embedded data at 32 px with small splits (the data the router is calibrated on)."""
  cfg = default_data_config()
  cfg.image_size = IMAGE_SIZE
  cfg.embedded.train_size = train_size
  cfg.embedded.eval_size = eval_size
  cfg.prefetch_buffer = 0
  return cfg


@functools.lru_cache(maxsize=1)
def _calibration_images() -> np.ndarray:
  """Eval-mode embedded images of both splits and their mirror images [N, 32, 32, 3]."""
  images = []
  for split, count in CALIBRATION_IMAGES.items():
    source = embedded.EmbeddedSource(split, image_size=IMAGE_SIZE, size=count)
    images += [transforms.preprocess(source[i], image_size=IMAGE_SIZE, rng=None,
                                     random_crop=False, random_flip=False)["image"]
               for i in range(count)]
  images = np.stack(images).astype(np.float32)
  return np.concatenate([images, images[:, :, ::-1]])


@functools.lru_cache(maxsize=4)
def _gap_fn(model):
  """Jitted fn(variables, images) -> fine-minus-coarse router logits [N, hc, wc] (eval)."""

  def gaps(variables, images):
    def route(module, x):
      return module.router(module.encoder(x, False))
    logits = model.apply(variables, images, method=route)  # [N, hc, wc, 2]
    return logits[..., 1] - logits[..., 0]

  return jax.jit(gaps)


@functools.lru_cache(maxsize=4)
def _abstract_variables(model):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jnp.zeros((1, model.resolution, model.resolution, 3)))


def random_variables(model, model_cfg: ml_collections.ConfigDict, seed: int) -> dict:
  """Random {'params', 'codebook'} of `model` drawn in numpy (an XLA-compiled `model.init`
  takes tens of seconds on CPU): LeCun-normal kernels, small random biases, unit norm scales,
  codebook uniform in +-1/K like the quantizer's own init."""
  abstract = _abstract_variables(model)
  rng = np.random.default_rng(seed)

  def draw(path, leaf) -> np.ndarray:
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      value = np.ones(shape)
    elif name == "bias":
      value = 0.1 * rng.normal(size=shape)
    elif name == "cluster_size":
      value = np.ones(shape)
    elif name in ("embedding", "embed_sum"):
      value = np.zeros(shape)  # Set below.
    else:  # Learned position tables.
      value = 0.02 * rng.normal(size=shape)
    return value.astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(
      draw, {"params": abstract["params"], "codebook": abstract["codebook"]})
  codebook = variables["codebook"]["quantize"]
  bound = 1.0 / model_cfg.codebook_size
  codebook["embedding"] = rng.uniform(-bound, bound, codebook["embedding"].shape).astype(
      np.float32)
  codebook["embed_sum"] = codebook["embedding"].copy()
  return variables


def make_tiny_stage1(out_dir: str, *, router: str = "feature", seed: int = 0) -> str:
  """Builds, calibrates and saves the tiny DQ-VAE under `out_dir` (params.npz +
  model_config.json, plus entropy_thresholds.json for the entropy router); returns out_dir."""
  if router not in ROUTER_KINDS:
    raise ValueError(f"router must be one of {ROUTER_KINDS}; got {router!r}")
  cfg = tiny_model_config(router)
  images = _calibration_images()
  thresholds = ()
  if router == "entropy":
    from dq.models import entropy  # pylint: disable=g-import-not-at-top
    factor = 2 ** (len(cfg.ch_mult) - 1)
    table = entropy.entropy_threshold_table(
        np.asarray(entropy.patch_entropy(jnp.asarray(images[:len(images) // 2]), factor)))
    entropy.save_threshold_table(os.path.join(out_dir, "entropy_thresholds.json"), table,
                                 {"patch_size": factor, "data": "embedded", "split": "train"})
    thresholds = (entropy.threshold_for_ratio(table, cfg.router.fine_ratio),)
  model = build_dqvae(cfg, entropy_thresholds=thresholds)
  variables = random_variables(model, cfg, seed)
  if router == "feature":
    # Put the decision boundary between the two middle gaps, so about half of the regions
    # are fine and none sits on the boundary.
    gaps = np.sort(np.asarray(_gap_fn(model)(variables, images)).reshape(-1))
    middle = len(gaps) // 2
    shift = 0.5 * (gaps[middle - 1] + gaps[middle])
    bias = variables["params"]["router"]["gate_2"]["bias"].copy()
    bias[1] -= shift
    variables["params"]["router"]["gate_2"]["bias"] = bias
  save_converted(out_dir, variables, cfg.to_dict())
  return out_dir

