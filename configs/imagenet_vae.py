"""DQ-VAE on ImageNet 256 with the official hyper-parameters (dual grain, feature router).

Class folders:  --config.data.folder.train_path=/data/imagenet/train
                --config.data.folder.eval_path=/data/imagenet/val
TFDS build (`:tfds`):  --config.data.tfds.data_dir=/data/tfds   (imagenet2012, ArrayRecord)
Args (comma-separated): `tfds`, `entropy`, `triple`, `tiny`, `embedded`.
"""
from dq.configs import parse_arg, vae_paper_config


def get_config(arg=None):
  arg = parse_arg(arg, tfds=False, entropy=False, triple=False, tiny=False, embedded=False)
  config = vae_paper_config(arg)
  if arg.embedded:
    config.data.name = "embedded"
  elif arg.tfds:
    config.data.name = "tfds"
    config.data.tfds.name = "imagenet2012"
    config.data.tfds.train_split = "train"
    config.data.tfds.eval_split = "validation"
  else:
    config.data.name = "folder"
    config.data.folder.labels_from_subfolders = True
  return config
