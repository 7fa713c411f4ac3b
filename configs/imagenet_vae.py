"""DQ-VAE on ImageNet 256 with the official hyper-parameters (dual grain, feature router).

Class folders:  --config.data.folder.train_path=/data/imagenet/train
                --config.data.folder.eval_path=/data/imagenet/val
TFDS build (`:tfds`):  --config.data.tfds.data_dir=/data/tfds   (imagenet2012, ArrayRecord)
Args (comma-separated): `tfds`, `entropy`, `paper_router`, `triple`, `tiny`, `embedded`.
"""
from dq.configs import parse_arg, set_imagenet_data, vae_paper_config


def get_config(arg=None):
  arg = parse_arg(arg, tfds=False, entropy=False, triple=False, tiny=False, embedded=False,
                  paper_router=False)
  config = vae_paper_config(arg)
  set_imagenet_data(config.data, tfds=arg.tfds, embedded=arg.embedded)
  return config
