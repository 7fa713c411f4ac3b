"""Entry point: `python -m dq.main --config=configs/ffhq_vae.py[:arg] --workdir=DIR`.

Parses flags and dispatches on `config.stage` and `config.mode`; nothing else.
"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, summaries and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  config = FLAGS.config
  if config.get("matmul_precision"):
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
  logging.info("JAX %s, %d devices (%s), process %d/%d", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count())
  if config.stage == "vae":
    from dq.train import vae_trainer as trainer
  else:
    raise ValueError(f"config.stage={config.stage!r}: expected 'vae'")
  if config.mode == "train":
    trainer.train_and_evaluate(config, FLAGS.workdir)
  elif config.mode == "eval":
    trainer.evaluate(config, FLAGS.workdir)
  else:
    raise ValueError(f"config.mode={config.mode!r}: expected 'train' or 'eval'")


if __name__ == "__main__":
  app.run(main)
