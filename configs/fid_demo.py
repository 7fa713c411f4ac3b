"""FID jobs for the quick-start demo: the embedded procedural images at 64 px (the data of
configs/demo_transformer.py), a few hundred images, minutes on 2 CPU cores.

  python -m dq.main --config=configs/fid_demo.py --workdir=/tmp/dq_demo_fid \
      --config.mode=reference
  python -m dq.main --config=configs/fid_demo.py:stage1=/tmp/dq_demo_vae \
      --workdir=/tmp/dq_demo_fid --config.mode=stage1
  python -m dq.main --config=configs/fid_demo.py:stage2=/tmp/dq_demo_transformer \
      --workdir=/tmp/dq_demo_fid --config.mode=stage2
Results: WORKDIR/eval/fid_<mode>_<step>.json (and metrics.jsonl / TensorBoard). Args
(comma-separated): `stage1=PATH` (DQ-VAE workdir or converted folder; the stage2 job takes the
transformer run's own by default), `stage2=PATH` (stage-2 workdir), `num=N` (images per set).
"""
from dq.configs import parse_arg
from dq.configs import fid_base_config


def get_config(arg=None):
  arg = parse_arg(arg, stage1="", stage2="", num=256)
  config = fid_base_config()
  config.mode = "stage2"
  config.stage1.path = arg.stage1
  config.stage2.workdir = arg.stage2
  config.data.name = "embedded"
  config.data.image_size = 64  # the demo DQ-VAE's size
  config.data.embedded.update(dict(procedural_fraction=1.0, photos=False, eval_size=arg.num))
  config.fid.update(dict(split="eval", batch_size=32, max_images=arg.num, num_images=arg.num,
                         save_features=True, pr_images=arg.num, is_splits=1, log_every=2))
  config.sample.update(dict(batch_size=32, seed=0))
  return config
