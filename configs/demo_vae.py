"""Quick-start demo: a small DQ-VAE on the embedded data, ~10 minutes on 2 CPU cores.

64 px images, dual grain with coarse F=8 (8x8 regions) and fine F=4 (16x16 cells), so grain maps
are readable; widths 16-64 with GroupNorm(8) and batch 8 keep a step near 0.3 s on 2 cores.
Args: `entropy` (entropy router instead of the feature router), `paper_router` (train the
feature router with the paper's recipe instead of this project's 'guided' default; see
dq.configs.ROUTER_RECIPES and the README), `steps=N`.
"""
from dq.configs import apply_router_recipe, parse_arg, vae_base_config


def get_config(arg=None):
  arg = parse_arg(arg, entropy=False, paper_router=False, steps=1500)
  config = vae_base_config()
  config.data.name = "embedded"
  config.data.image_size = 64
  config.model.update(dict(
      resolution=64, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(),
      z_channels=32, codebook_size=256, embed_dim=32, dec_ch=16, dec_ch_mult=(1, 2, 2),
      dec_num_res_blocks=0, dec_attn_resolutions=(), norm_groups=8))
  config.model.router.kind = "entropy" if arg.entropy else "feature"
  if not arg.entropy:
    apply_router_recipe(config, "paper" if arg.paper_router else "guided")
  config.model.router.fine_ratio = 0.5
  config.model.router.threshold_images = 256
  config.train.update(dict(batch_size=8, num_steps=arg.steps, log_every=50, summary_every=500,
                           checkpoint_every=500, keep_checkpoints=2))
  config.optim.update(dict(lr=1e-3, warmup_steps=100, b1=0.9, b2=0.99))
  config.eval.update(dict(batch_size=32, max_images=256))
  return config
