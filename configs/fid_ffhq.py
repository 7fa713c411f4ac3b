"""FID jobs for FFHQ 256 (unconditional): 50k samples against the statistics of all 70k
images, rFID of the DQ-VAE, precision/recall on 10k features.

  # once: reference statistics (+ 10k features) of every image in the folder
  python -m dq.main --config=configs/fid_ffhq.py:data=/data/ffhq/images1024x1024 \
      --workdir=DIR --config.mode=reference
  # rFID + PSNR/SSIM/LPIPS of a stage-1 checkpoint (reuses DIR/eval/reference_eval.npz)
  python -m dq.main --config=configs/fid_ffhq.py:data=/data/ffhq/images1024x1024,stage1=VAE \
      --workdir=DIR --config.mode=stage1
  # FID / precision / recall of 50k samples of a stage-2 run
  python -m dq.main --config=configs/fid_ffhq.py:data=/data/ffhq/images1024x1024,stage2=RUN \
      --workdir=DIR --config.mode=stage2 [--config.fid.save_images=True]
Args (comma-separated): `data=FOLDER` (the images; the 'eval' split reads all of it),
`stage1=PATH` (DQ-VAE workdir or converted folder; the stage2 job defaults to the run's own),
`stage2=PATH` (stage-2 workdir or converted official folder), `num=N` (samples, 50000).
Sampling settings: --config.sample.* (temperatures, top_k/top_p, seed, batch_size).
"""
from dq.configs import parse_arg
from dq.configs import fid_base_config


def get_config(arg=None):
  arg = parse_arg(arg, data="", stage1="", stage2="", num=50_000)
  config = fid_base_config()
  config.mode = "stage2"
  config.stage1.path = arg.stage1
  config.stage2.workdir = arg.stage2
  config.data.name = "folder"
  # train_path must be set; eval_path makes the 'eval' split the whole folder (70k images).
  config.data.folder.update(dict(train_path=arg.data, eval_path=arg.data,
                                 labels_from_subfolders=False))
  config.data.image_size = 256
  config.data.worker_count = 8
  config.fid.update(dict(split="eval", batch_size=100, num_images=arg.num, save_features=True,
                         pr_images=10_000, log_every=20))
  config.sample.update(dict(batch_size=100, seed=0))
  return config
