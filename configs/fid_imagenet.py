"""FID jobs for class-conditional ImageNet 256: 50k samples, class-balanced (sample i gets
class i mod 1000, so 50 per class), against the statistics of the training set (the ADM
convention; 10k features for precision/recall); Inception Score needs weights with logits
(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, converted with dq.tools.convert_inception).

Class folders:  data=/data/imagenet/train,eval_data=/data/imagenet/val
TFDS build (`tfds`):  --config.data.tfds.data_dir=/data/tfds   (imagenet2012, ArrayRecord)

  python -m dq.main --config=configs/fid_imagenet.py:data=TRAIN,eval_data=VAL --workdir=DIR \
      --config.mode=reference
  python -m dq.main --config=configs/fid_imagenet.py:data=TRAIN,eval_data=VAL,stage2=RUN \
      --workdir=DIR --config.mode=stage2 --config.sample.guidance_scale=2.0 \
      --config.fid.inception_weights=/weights/inception_with_logits.npz
  # rFID of a DQ-VAE on the 50k validation images (against their own statistics)
  python -m dq.main --workdir=DIR --config.mode=stage1 \
      --config=configs/fid_imagenet.py:data=TRAIN,eval_data=VAL,split=eval,stage1=VAE
Args (comma-separated): `data=TRAIN_FOLDER`, `eval_data=VAL_FOLDER`, `tfds`, `split=train|eval`
(reference split, train by default), `stage1=PATH`, `stage2=PATH`, `num=N` (samples, 50000).
"""
from dq.configs import parse_arg, set_imagenet_data
from dq.configs import fid_base_config


def get_config(arg=None):
  arg = parse_arg(arg, data="", eval_data="", tfds=False, split="train", stage1="", stage2="",
                  num=50_000)
  config = fid_base_config()
  config.mode = "stage2"
  config.stage1.path = arg.stage1
  config.stage2.workdir = arg.stage2
  set_imagenet_data(config.data, tfds=arg.tfds, train_path=arg.data, eval_path=arg.eval_data)
  config.data.image_size = 256
  config.data.worker_count = 8
  config.fid.update(dict(split=arg.split, batch_size=100, num_images=arg.num,
                         save_features=True, pr_images=10_000, log_every=20))
  # '' cycles over the classes: with num a multiple of 1000 every class gets num / 1000.
  config.sample.update(dict(batch_size=100, seed=0, labels=""))
  return config
