"""Quick-start stage 2: a small class-conditional DQ-Transformer on the demo DQ-VAE's tokens of
the embedded procedural images (8 kinds), a few minutes on 2 CPU cores.

  python -m dq.main --config=configs/demo_vae.py --workdir=/tmp/dq_demo_vae
  python -m dq.main --config=configs/demo_transformer.py:stage1=/tmp/dq_demo_vae \
      --workdir=/tmp/dq_demo_transformer
  python -m dq.main --config=configs/demo_transformer.py:stage1=/tmp/dq_demo_vae \
      --workdir=/tmp/dq_demo_transformer --config.mode=sample
Sample grids land in WORKDIR/summaries, sample mode writes WORKDIR/samples. Image size and
token grids come from the stage-1 model. Args: `stage1=PATH` (required), `steps=N`.
"""
from dq.configs import parse_arg, transformer_base_config


def get_config(arg=None):
  arg = parse_arg(arg, stage1="", steps=300)
  config = transformer_base_config()
  config.stage1.path = arg.stage1
  config.data.name = "embedded"
  config.data.embedded.update(dict(procedural_fraction=1.0, photos=False, train_size=10_000))
  config.class_conditional = True   # labels 0..7: the procedural kinds
  config.label_dropout = 0.1
  config.model.update(dict(n_embd=128, n_head=4, position_layers=2, content_layers=4,
                           dropout=0.0))
  config.optim.update(dict(lr=1e-3, warmup_steps=50))
  config.train.update(dict(batch_size=16, num_steps=arg.steps, log_every=25,
                           sample_every=max(1, arg.steps // 2), sample_images=16,
                           checkpoint_every=250, keep_checkpoints=2))
  labels = ",".join(str(k) for k in range(8))  # the procedural kinds (no photos here)
  config.sample.update(dict(num_images=32, batch_size=16, labels=labels))
  return config
