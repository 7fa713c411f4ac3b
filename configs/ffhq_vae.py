"""DQ-VAE on FFHQ 256 with the official hyper-parameters (dual grain F=16/F=8, feature router).

  python -m dq.main --config=configs/ffhq_vae.py --workdir=DIR \
      --config.data.folder.train_path=/data/ffhq/images1024x1024
Args (comma-separated): `entropy` (entropy router), `paper_router` (the feature router trained
with the paper's recipe instead of the 'guided' default), `triple` (F=32/16/8), `tiny` (64 px smoke
test), `embedded` (the embedded default data instead of a folder).
"""
from dq.configs import parse_arg, vae_paper_config


def get_config(arg=None):
  arg = parse_arg(arg, entropy=False, triple=False, tiny=False, embedded=False,
                  paper_router=False)
  config = vae_paper_config(arg)
  config.data.name = "embedded" if arg.embedded else "folder"
  config.data.folder.labels_from_subfolders = False
  return config
