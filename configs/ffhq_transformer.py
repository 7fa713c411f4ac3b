"""DQ-Transformer on FFHQ 256, unconditional, official size (d 1024, 8 heads, 6 position + 18
content layers, dropout 0.1, AdamW(0.9, 0.95), lr 5e-4 cosine to 0, weight decay 0.01).

  python -m dq.main --config=configs/ffhq_transformer.py:stage1=FFHQ_VAE_DIR --workdir=DIR \
      --config.data.folder.train_path=/data/ffhq/images1024x1024
  # once, optional: token shards instead of encoding every batch on the fly
  ... --config.mode=encode --config.tokens.dir=/data/ffhq_tokens   (then train with it)
  ... --config.mode=sample --config.sample.num_images=1000
Args (comma-separated): `stage1=PATH` (the FFHQ DQ-VAE workdir or converted folder), `tiny`
(small model and steps, for a smoke test on a `ffhq_vae.py:tiny` stage 1), `embedded` (the
embedded default data instead of a folder). Image size and token grids come from stage 1.
"""
from dq.configs import parse_arg, transformer_base_config, transformer_paper_sizes


def get_config(arg=None):
  arg = parse_arg(arg, stage1="", tiny=False, embedded=False)
  config = transformer_base_config()
  config.stage1.path = arg.stage1
  config.data.name = "embedded" if arg.embedded else "folder"
  config.data.folder.labels_from_subfolders = False
  config.class_conditional = False
  return transformer_paper_sizes(config, arg.tiny, num_steps=300_000)
