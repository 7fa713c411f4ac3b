"""Builds a validated DQVAE from an ml_collections model config."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from dq.models.decoder import POSITION_TYPES
from dq.models.dqvae import DQVAE, ROUTER_KINDS, TRAIN_GATES
from dq.models.grains import GrainTargets, grid_factors
from dq.models.router import GATE_GRADIENTS, ROUTER_NORMS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_model_config() -> ml_collections.ConfigDict:
  """The official 256px dual-grain DQ-VAE (feature router, 1024 x 256 codebook)."""
  return ml_collections.ConfigDict(dict(
      resolution=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,), dropout=0.0, z_channels=256, num_grains=2, norm_groups=32,
      router=dict(kind="feature", norm_groups=32, gumbel_temperature=1.0, fine_ratio=0.5,
                  median_ratio=0.0, thresholds_path="", **paper_router_training()),
      codebook_size=1024, embed_dim=256, beta=0.25, ema_decay=0.99, restart_unused_codes=True,
      dec_ch=128, dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=2, dec_attn_resolutions=(32,),
      position_type="fourier+learned", dtype="float32"))


def paper_router_training() -> dict:
  """The feature router's training recipe as in the paper and the official code: GroupNorm
  on the taps, hard Gumbel-softmax at a constant temperature, the gate entering as
  `h * gate.max()`, no warm-up. (`model.router` fields; see `default_model_config`.)

  - norm: 'group' | 'layer' | 'none' (`dq.models.router.FeatureRouter`);
  - gate_gradient: 'official' | 'both' (`dq.models.router.merge_grains`);
  - train_gate: 'gumbel' | 'argmax' (no noise; `dq.models.dqvae.TRAIN_GATES`);
  - gumbel_temperature_end, temperature_steps: anneal the temperature geometrically from
    `gumbel_temperature` to `gumbel_temperature_end` over the first `temperature_steps`
    steps (0: constant);
  - detach_input: the router's input is detached from the encoder (its losses train only the
    router, not the encoder features it reads);
  - warmup_steps: route by a teacher for the first K steps while the router learns to
    imitate it (`loss.router_distill_weight`); 0: no warm-up. teacher: 'entropy' (the entropy
    router for `fine_ratio`, thresholds computed like the entropy router's) or 'detail' (the
    batch's regions with the most high-frequency detail, `dq.train.router_control`);
    distill_steps: how long the imitation loss lasts (0: the warm-up, -1: all training).
  """
  return dict(norm="group", gate_gradient="official", train_gate="gumbel",
              gumbel_temperature_end=1.0, temperature_steps=0, warmup_steps=0,
              teacher="entropy", distill_steps=0, detach_input=False)


def _fail(field: str, value: Any, expected: str) -> None:
  raise ValueError(f"model config field '{field}' = {value!r}: {expected}")


def _check_widths(field: str, base: int, mults: tuple[int, ...], groups: int) -> None:
  for mult in mults:
    if (base * mult) % groups:
      _fail(field, base, f"every width {field}*mult must be divisible by norm_groups={groups} "
            f"(mults {mults})")


def build_dqvae(model_cfg: Any, entropy_thresholds: tuple = ()) -> DQVAE:
  """Validates `model_cfg` (see `default_model_config`) and returns the DQVAE module.

  `entropy_thresholds` are required for `router.kind == 'entropy'`: (t,) for dual grain,
  (t_median, t_fine) for triple grain; they are ignored by the other routers.
  `router.kind == 'fixed'` codes every region at one grain, chosen by the grain targets (see
  `dq.models.grains.GrainTargets.fixed_grain`): a fixed-length VQ grid with the DQ-VAE's layers.
  """
  cfg = model_cfg
  num_grains = int(cfg.num_grains)
  if num_grains not in (2, 3):
    _fail("num_grains", cfg.num_grains, "must be 2 or 3")
  ch_mult = tuple(int(m) for m in cfg.ch_mult)
  if len(ch_mult) < num_grains:
    _fail("ch_mult", cfg.ch_mult, f"needs at least {num_grains} levels for {num_grains} grains")
  if int(cfg.in_channels) != 3:
    _fail("in_channels", cfg.in_channels, "only RGB images (3) are supported")
  factors = grid_factors(ch_mult, num_grains)
  coarse_factor, fine_factor = factors[0], factors[-1]
  if cfg.resolution % coarse_factor:
    _fail("resolution", cfg.resolution, f"must be divisible by the coarsest downsampling "
          f"factor {coarse_factor} (ch_mult {ch_mult})")
  dec_ch_mult = tuple(int(m) for m in cfg.dec_ch_mult)
  if 2 ** (len(dec_ch_mult) - 1) != fine_factor:
    _fail("dec_ch_mult", cfg.dec_ch_mult, f"upsamples by {2 ** (len(dec_ch_mult) - 1)}; must "
          f"match the finest grain's factor {fine_factor}")
  router = cfg.router
  if router.kind not in ROUTER_KINDS:
    _fail("router.kind", router.kind, f"must be one of {ROUTER_KINDS}")
  thresholds = tuple(float(t) for t in entropy_thresholds)
  if router.kind == "entropy":
    if not thresholds:
      _fail("router.kind", router.kind, "the entropy router needs entropy_thresholds (compute "
            "them with dq.tools.entropy_thresholds and pass them to build_dqvae)")
    if len(thresholds) != num_grains - 1:
      raise ValueError(f"entropy_thresholds {thresholds}: {num_grains} grains need "
                       f"{num_grains - 1} thresholds")
  targets = GrainTargets.from_router(router, num_grains)  # checks fine_ratio / median_ratio
  fixed_grain = targets.fixed_grain if router.kind == "fixed" else 0
  for field, value, choices in (("router.norm", router.get("norm", "group"), ROUTER_NORMS),
                                ("router.gate_gradient", router.get("gate_gradient", "both"),
                                 GATE_GRADIENTS),
                                ("router.train_gate", router.get("train_gate", "gumbel"),
                                 TRAIN_GATES)):
    if value not in choices:
      _fail(field, value, f"must be one of {choices}")
  if cfg.position_type not in POSITION_TYPES:
    _fail("position_type", cfg.position_type, f"must be one of {POSITION_TYPES}")
  if cfg.dtype not in DTYPES:
    _fail("dtype", cfg.dtype, f"must be one of {tuple(DTYPES)}")
  norm_groups = int(cfg.get("norm_groups", 32))
  _check_widths("ch", cfg.ch, ch_mult, norm_groups)
  _check_widths("dec_ch", cfg.dec_ch, dec_ch_mult, norm_groups)
  _check_widths("z_channels", cfg.z_channels, (1,), norm_groups)
  _check_widths("z_channels", cfg.z_channels, (1,), int(router.norm_groups))
  if cfg.codebook_size < 1 or cfg.embed_dim < 1:
    _fail("codebook_size/embed_dim", (cfg.codebook_size, cfg.embed_dim), "must be positive")
  return DQVAE(
      resolution=int(cfg.resolution), ch=int(cfg.ch), ch_mult=ch_mult,
      num_res_blocks=int(cfg.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in cfg.attn_resolutions),
      z_channels=int(cfg.z_channels), dropout=float(cfg.dropout), num_grains=num_grains,
      norm_groups=norm_groups, router_kind=router.kind,
      router_norm_groups=int(router.norm_groups),
      router_norm=router.get("norm", "group"),
      gate_gradient=router.get("gate_gradient", "both"),
      train_gate=router.get("train_gate", "gumbel"),
      router_detach=bool(router.get("detach_input", False)),
      entropy_thresholds=thresholds if router.kind == "entropy" else (),
      fixed_grain=fixed_grain,
      gumbel_temperature=float(router.gumbel_temperature),
      codebook_size=int(cfg.codebook_size), embed_dim=int(cfg.embed_dim), beta=float(cfg.beta),
      ema_decay=float(cfg.ema_decay), restart_unused_codes=bool(cfg.restart_unused_codes),
      dec_ch=int(cfg.dec_ch), dec_ch_mult=dec_ch_mult,
      dec_num_res_blocks=int(cfg.dec_num_res_blocks),
      dec_attn_resolutions=tuple(int(r) for r in cfg.dec_attn_resolutions),
      position_type=cfg.position_type, dtype=DTYPES[cfg.dtype])
