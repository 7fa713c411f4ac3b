"""Bad image files through the stage-1 trainer: undecodable files are skipped with a warning and
counted in the metrics, odd modes and sizes are converted, too many bad files stop the run."""
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from bad_images import make_bad_folder, rgb
from dq.data import stats
from dq import checkpoint as ckpt
from dq.train import vae_trainer
from stage1_util import tiny_model_config
from test_train_vae import tiny_config

NUM_STEPS = 2  # 2 x 8 valid images > the folder's 15 valid ones: every file is read
IMAGE_SIZE = 16


def folder_config(root: str, **data):
  """test_train_vae's tiny stage-1 config with a smaller model (16 px, 3 levels: coarse 4x4,
  fine 8x8) reading the folder `root`."""
  config = tiny_config(NUM_STEPS, checkpoint_every=NUM_STEPS)
  config.model = tiny_model_config()
  config.model.update(dict(resolution=IMAGE_SIZE, ch_mult=(1, 2, 2), dec_ch_mult=(1, 2)))
  config.data.image_size = IMAGE_SIZE
  config.data.name = "folder"
  config.data.folder.update(dict(train_path=root, eval_path=root))
  config.data.update(data)
  return config


class _SkipWarnings(logging.Handler):
  """Collects the data package's 'skipping PATH' warnings."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    if "skipping" in record.getMessage():
      self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("images"))
  valid, bad = make_bad_folder(root)
  workdir = str(tmp_path_factory.mktemp("run"))
  handler = _SkipWarnings()
  logging.getLogger().addHandler(handler)
  try:
    state = vae_trainer.train_and_evaluate(folder_config(root), workdir)
  finally:
    logging.getLogger().removeHandler(handler)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return dict(root=root, valid=valid, bad=bad, state=state, rows=rows,
              warnings=handler.messages, workdir=workdir)


def test_training_finishes_and_reports_skip_counts(bad_run):
  assert int(bad_run["state"].step) == NUM_STEPS
  rows = bad_run["rows"]
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(r["loss"]) for r in rows)
  counts = [r["data/skipped_records"] for r in rows]
  assert counts == sorted(counts), "a running count never decreases"
  assert counts[-1] == len(bad_run["bad"]) == 8


def test_skip_count_survives_a_resume(bad_run, tmp_path):
  # The checkpoint carries the counts; a resumed run (a new process: fresh data counters) goes
  # on from them instead of restarting at 0, and does not count the 8 files twice when its
  # second epoch finds them again.
  workdir = str(tmp_path / "run")
  shutil.copytree(bad_run["workdir"], workdir)
  manager = ckpt.make_manager(workdir, async_save=False)
  assert ckpt.restore_counters(manager, NUM_STEPS) == {"skipped_records": 8,
                                                       "nonfinite_skipped": 0}
  config = folder_config(bad_run["root"])
  config.train.num_steps = 2 * NUM_STEPS
  stats.reset()
  vae_trainer.train_and_evaluate(config, workdir)
  assert stats.skipped_counts()[f"folder:{bad_run['root']}:train"] == 8  # found again
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  resumed = [r["data/skipped_records"] for r in rows if r["step"] > NUM_STEPS]
  assert resumed == [8] * NUM_STEPS
  manager = ckpt.make_manager(workdir, async_save=False)
  assert ckpt.restore_counters(manager, 2 * NUM_STEPS) == {"skipped_records": 8,
                                                           "nonfinite_skipped": 0}


def test_exactly_the_undecodable_files_are_skipped(bad_run):
  skipped = set()
  for message in bad_run["warnings"]:
    path = message.split("skipping ", 1)[1].split(": ", 1)[0]
    skipped.add(os.path.basename(path))
  assert skipped == bad_run["bad"]
  assert not skipped & bad_run["valid"], "a convertible image was skipped"
  assert len(bad_run["warnings"]) == len(bad_run["bad"]), "one warning per file, not per read"
  name = f"folder:{bad_run['root']}:train"
  reads, failed = stats.read_counts()[name]
  assert reads >= len(bad_run["valid"]) + len(bad_run["bad"]) and 0 < failed < reads


def _write_mostly_bad_folder(root) -> None:
  from PIL import Image
  for name in ("a.png", "b.png"):
    Image.fromarray(rgb(40, 40)).save(root / name)
  (root / "zero.png").write_bytes(b"")
  (root / "text.jpg").write_bytes(b"text, not a JPEG")
  (root / "garbage.png").write_bytes(bytes(range(256)))
  (root / "truncated.png").write_bytes((root / "a.png").read_bytes()[:100])


def test_too_many_bad_files_is_a_clear_error(bad_run, tmp_path):
  # No read-ahead threads: the check fires at an exact read count.
  root = tmp_path / "mostly_bad"
  root.mkdir()
  _write_mostly_bad_folder(root)
  name = re.escape(f"folder:{root}:train")
  with pytest.raises(RuntimeError, match=(
      rf"dataset {name}: 4 of 6 records read could not be decoded, above "
      r"max_bad_fraction=0.5; check the data")):
    vae_trainer.train_and_evaluate(folder_config(str(root), prefetch_buffer=0),
                                   str(tmp_path / "run_a"))
  # The fraction is configurable: the seeded folder (8 bad of 23) trains at 0.5, not at 0.25.
  # A copy: read counts are kept per folder path for the whole process. With read-ahead
  # threads the counts at the check vary; the error comes with the first batch.
  copy = str(tmp_path / "seeded_copy")
  shutil.copytree(bad_run["root"], copy, symlinks=True)
  name = re.escape(f"folder:{copy}:train")
  with pytest.raises(RuntimeError, match=(
      rf"dataset {name}: \d+ of \d+ records read could not be decoded, "
      r"above max_bad_fraction=0.25")):
    vae_trainer.train_and_evaluate(folder_config(copy, max_bad_fraction=0.25),
                                   str(tmp_path / "run_b"))


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_carry_skip_counts_also_from_worker_processes(bad_run, tmp_path, workers):
  from dq.data import pipeline
  copy = str(tmp_path / "copy")  # read counts are per folder path and process
  shutil.copytree(bad_run["root"], copy, symlinks=True)
  config = folder_config(copy, worker_count=workers)
  stats.reset()
  dataset = pipeline.make_dataset(config.data, split="train", batch_size=4, seed=0,
                                  train=False, num_epochs=1, drop_remainder=False)
  batches = list(dataset)
  assert sum(int(b["skipped_records"]) for b in batches) == len(bad_run["bad"])
  assert sum(len(b["image"]) for b in batches) == len(bad_run["valid"])
  # With a worker process, the skips were counted there, not in this process.
  assert (sum(stats.skipped_counts().values()) == 0) == (workers > 0)
