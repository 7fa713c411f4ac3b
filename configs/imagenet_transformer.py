"""Class-conditional DQ-Transformer on ImageNet 256 (1000 classes), official size (d 1024,
8 heads, 6 position + 18 content layers, dropout 0.1), label dropout 10% so that sampling can
use classifier-free guidance (`--config.sample.guidance_scale=S`).

Class folders:  --config.data.folder.train_path=/data/imagenet/train
                --config.data.folder.eval_path=/data/imagenet/val
TFDS build (`:tfds`):  --config.data.tfds.data_dir=/data/tfds   (imagenet2012, ArrayRecord)

  python -m dq.main --config=configs/imagenet_transformer.py:stage1=IMAGENET_VAE_DIR \
      --workdir=DIR --config.data.folder.train_path=/data/imagenet/train
Args (comma-separated): `stage1=PATH`, `tfds`, `tiny` (small model and steps for a smoke
test), `embedded` (the embedded data and its 9 classes). Image size and grids come from stage 1.
"""
from dq.configs import (parse_arg, set_imagenet_data, transformer_base_config,
                        transformer_paper_sizes)


def get_config(arg=None):
  arg = parse_arg(arg, stage1="", tfds=False, tiny=False, embedded=False)
  config = transformer_base_config()
  config.stage1.path = arg.stage1
  set_imagenet_data(config.data, tfds=arg.tfds, embedded=arg.embedded)
  config.class_conditional = True  # classes counted from the data (1000 for ImageNet)
  config.label_dropout = 0.1
  return transformer_paper_sizes(config, arg.tiny, num_steps=500_000)
