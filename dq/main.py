"""Entry point: `python -m dq.main --config=configs/ffhq_vae.py[:arg] --workdir=DIR`.

Stage 1 (`config.stage='vae'`): modes train, eval. Stage 2 (`'transformer'`): modes train,
sample, encode (`--config.mode=sample`). FID jobs (`'fid'`): modes reference, stage1, stage2.

Parses flags, validates the config (`dq.validate`, before anything is built or compiled) and
dispatches on `config.stage` and `config.mode`; nothing else.
"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, summaries and results.")
flags.DEFINE_enum("distributed", "none", ["none", "auto"],
                  "'auto': jax.distributed.initialize() (TPU pods, Slurm); see dq.distributed.")
flags.DEFINE_string("coordinator_address", None, "Explicit multi-process start: HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Explicit multi-process start: process count.")
flags.DEFINE_integer("process_id", None, "Explicit multi-process start: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dq import distributed, validate
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  validate.validate_config(FLAGS.config)
  import jax
  config = FLAGS.config
  if config.get("matmul_precision"):
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
  logging.info("JAX %s, %d devices (%s), process %d/%d", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count())
  if config.stage == "vae":
    from dq.train import vae_trainer as trainer
    modes = {"train": trainer.train_and_evaluate, "eval": trainer.evaluate}
  elif config.stage == "transformer":
    from dq.train import transformer_trainer as trainer
    modes = {"train": trainer.train_and_evaluate, "sample": trainer.sample,
             "encode": trainer.encode}
  elif config.stage == "fid":
    from dq.evaluation import fid_jobs as trainer
    modes = {"reference": trainer.reference, "stage1": trainer.stage1, "stage2": trainer.stage2}
  else:
    raise ValueError(f"config.stage={config.stage!r}: expected 'vae', 'transformer' or 'fid'")
  if config.mode not in modes:
    raise ValueError(f"config.mode={config.mode!r}: expected one of {sorted(modes)} for stage "
                     f"{config.stage!r}")
  modes[config.mode](config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
