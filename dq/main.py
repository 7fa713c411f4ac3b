"""Entry point: `python -m dq.main --config=configs/ffhq_vae.py[:arg] --workdir=DIR`.

Stage 1 (`config.stage='vae'`): modes train, eval. Stage 2 (`'transformer'`): modes train,
sample, encode (`--config.mode=sample`). FID jobs (`'fid'`): modes reference, stage1, stage2.

Parses flags, validates the config (`dq.validate`, before anything is built or compiled) and
dispatches on `config.stage` and `config.mode`; nothing else.

The console shows dq's own lines (devices, progress with ETA, metrics, checkpoints, results,
warnings); library INFO chatter (orbax, absl, jax backend probing, TensorFlow) is hidden, and a
known user error (a config file that is missing or does not parse, a config check, a locked or
incompatible workdir, a failed checkpoint save, a missing file) ends in one readable line.
`--verbose` shows both the library logs and the tracebacks.
"""
import logging
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, summaries and results.")
flags.DEFINE_enum("distributed", "none", ["none", "auto"],
                  "'auto': jax.distributed.initialize() (TPU pods, Slurm); see dq.distributed.")
flags.DEFINE_string("coordinator_address", None, "Explicit multi-process start: HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "Explicit multi-process start: process count.")
flags.DEFINE_integer("process_id", None, "Explicit multi-process start: this process's id.")
flags.DEFINE_bool("verbose", False, "Also show library INFO logs (orbax, absl, jax) and the "
                  "traceback of known user errors.")
flags.mark_flags_as_required(["config", "workdir"])

DQ_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigFileError(ValueError):
  """The --config file is missing or does not load."""


class QuietLibraries(logging.Filter):
  """Passes dq's records and library warnings; drops library INFO, jax's backend probing and
  orbax's records (dq reports the checkpoint failures it raises in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(DQ_DIR):
      return True
    if "orbax" in record.pathname or record.name.startswith("jax._src.xla_bridge"):
      return record.levelno >= logging.CRITICAL
    return record.levelno >= logging.WARNING


def quiet_libraries() -> None:
  from dq.train.writers import QUIET_ENV
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ[QUIET_ENV] = "1"
  quiet = QuietLibraries()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.verbose:
    quiet_libraries()
  config = FLAGS.config
  try:
    stage = config.get("stage")
  except OSError as e:  # config_flags defers a missing file's error to the first access
    raise ConfigFileError(f"--config={config_flags.get_config_filename(FLAGS['config'])}: "
                          "no such config file") from e
  del stage
  from dq import distributed
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  from dq.train.preemption import PreemptionWatch, StopRequested
  # A stop signal before the trainer takes over (imports, checks, start-up) or during a mode
  # without a train loop (eval, sample, encode, FID) ends the run here with a line, exit 0;
  # training installs its own handling (dq.train.workdir.TrainingRun).
  watch = PreemptionWatch()
  try:
    with watch, watch.phase(f"the {config.get('stage')} {config.get('mode')} job"):
      dispatch(config)
  except StopRequested as e:
    logging.warning("Stopped by %s during %s: it did not finish and nothing after it was run. "
                    "Rerun the same command to do it.", signal.Signals(e.signum).name, e.phase)


def dispatch(config) -> None:
  """Validates `config`, then runs its stage's mode on --workdir."""
  from dq import validate
  validate.validate_config(config)
  import jax
  if config.get("matmul_precision"):
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
  logging.info("JAX %s, %d devices (%s), process %d/%d", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count())
  if config.stage == "vae":
    from dq.train import vae_trainer as trainer
    modes = {"train": trainer.train_and_evaluate, "eval": trainer.evaluate}
  elif config.stage == "transformer":
    from dq.train import transformer_sample
    from dq.train import transformer_trainer as trainer
    modes = {"train": trainer.train_and_evaluate, "sample": transformer_sample.sample,
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


def user_error_message(error: BaseException) -> str | None:
  """The message of a known user error (no traceback needed), else None."""
  from dq import checkpoint
  from dq.train.workdir import WorkdirLocked
  from dq.validate import ConfigError
  known = (ConfigError, ConfigFileError, FileNotFoundError, WorkdirLocked,
           checkpoint.CheckpointSaveError, checkpoint.CheckpointMismatch,
           checkpoint.DataStateMissing, checkpoint.CheckpointsUnreadable)
  if isinstance(error, SyntaxError) and error.filename and error.filename.endswith(".py") \
      and not os.path.abspath(error.filename).startswith(DQ_DIR):
    line = (error.text or "").strip()
    return (f"the config file {error.filename} does not parse: line {error.lineno}: "
            f"{error.msg}{f': {line}' if line else ''}")
  if isinstance(error, known) or (isinstance(error, ValueError)
                                  and str(error).startswith("config.")):
    return str(error)
  return None


def run(argv: list[str] | None = None) -> None:
  """app.run(main), with known user errors ending in one line (exit 1) unless --verbose."""
  argv = list(sys.argv if argv is None else argv)
  verbose = any(arg in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
                for arg in argv[1:])
  try:
    app.run(main, argv=argv)
  except Exception as e:  # pylint: disable=broad-except
    message = None if verbose else user_error_message(e)
    if message is None:
      raise
    print(f"dq.main: error: {message} (--verbose shows the traceback)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
