"""Checkpoint safety of the trainers (issue 18), stage 1 in process on a tiny config: a damaged
latest checkpoint falls back to an older one (kept, never deleted), a checkpoint without its
data-iterator state is an error unless allowed, and a failed asynchronous save stops the run at
the next step with the previous checkpoint still the latest."""
import errno
import json
import logging
import os
import shutil

import pytest

from dq import checkpoint as ckpt
from dq.train import vae_trainer
from test_train_vae import tiny_config


def _copy(run, tmp_path) -> str:
  path = str(tmp_path / "wd")
  shutil.copytree(run, path)
  return path


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.mark.parametrize("damage", ["empty_newer_folder", "state_missing", "truncated_array"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(vae_run_4_steps, tmp_path, caplog,
                                                          damage):
  workdir = _copy(vae_run_4_steps, tmp_path)
  root = os.path.join(workdir, "checkpoints")
  if damage == "empty_newer_folder":
    os.makedirs(os.path.join(root, "6"))
    bad, good, why = 6, 4, "is empty"
  elif damage == "state_missing":
    shutil.rmtree(os.path.join(root, "4", "state"))
    bad, good, why = 4, 2, "state item is missing"
  else:
    arrays = os.path.join(root, "4", "state", "ocdbt.process_0", "d")
    biggest = max(os.listdir(arrays), key=lambda n: os.path.getsize(os.path.join(arrays, n)))
    os.truncate(os.path.join(arrays, biggest), os.path.getsize(os.path.join(arrays, biggest)) // 2)
    bad, good, why = 4, 2, "Exception"
  files_before = sorted(os.path.relpath(os.path.join(d, f), os.path.join(root, str(bad)))
                        for d, _, fs in os.walk(os.path.join(root, str(bad))) for f in fs)
  with caplog.at_level(logging.WARNING):
    state = vae_trainer.setup(tiny_config(4, checkpoint_every=2), workdir)[4]
  assert int(state.step) == good
  messages = "\n".join(r.getMessage() for r in caplog.records)
  assert f"Checkpoint {bad} in {root} cannot be restored" in messages and why in messages
  moved = os.path.join(workdir, ckpt.DAMAGED_DIR, str(bad))
  assert f"moved, unchanged, to {moved}" in messages
  assert sorted(os.path.relpath(os.path.join(d, f), moved)
                for d, _, fs in os.walk(moved) for f in fs) == files_before
  assert bad not in _steps(workdir)
  if damage == "truncated_array":  # the resumed run saves step 4 again
    assert int(vae_trainer.train_and_evaluate(tiny_config(4, checkpoint_every=2),
                                              workdir).step) == 4
    assert _steps(workdir) == [2, 4]


def test_no_loadable_checkpoint_is_an_error_and_nothing_moves(tmp_path):
  workdir = tmp_path / "wd"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(RuntimeError, match="no checkpoint .* can be restored .*3: .* is empty"):
    vae_trainer.setup(tiny_config(4), str(workdir))
  assert _steps(str(workdir)) == [3]


def test_missing_data_state_is_an_error_unless_allowed(vae_run_4_steps, tmp_path, caplog):
  workdir = _copy(vae_run_4_steps, tmp_path)
  data = os.path.join(workdir, "checkpoints", "4", "data")
  shutil.rmtree(data)
  with pytest.raises(ckpt.DataStateMissing, match="allow_data_restart") as error:
    vae_trainer.setup(tiny_config(6), workdir)
  assert f"{data} is missing" in str(error.value)
  config = tiny_config(6, allow_data_restart=True)
  with caplog.at_level(logging.WARNING):
    assert int(vae_trainer.setup(config, workdir)[4].step) == 4
  assert any("data order restarts" in r.getMessage() for r in caplog.records)


def test_failed_async_save_stops_the_run_and_the_previous_checkpoint_stays(
    vae_run_4_steps, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  workdir = _copy(vae_run_4_steps, tmp_path)
  original = ocp.StandardCheckpointHandler.async_save

  async def full_disk_at_6(self, directory, *args, **kwargs):
    futures = await original(self, directory, *args, **kwargs)

    class NoSpace:
      def result(self, timeout=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    step = os.path.basename(os.path.dirname(str(directory))).split(".")[0]
    return [*(futures or []), NoSpace()] if step == "6" else futures

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk_at_6)
  config = tiny_config(12, checkpoint_every=2, async_checkpointing=True)
  with pytest.raises(ckpt.CheckpointSaveError) as error:
    vae_trainer.train_and_evaluate(config, workdir)
  path = os.path.join(os.path.abspath(workdir), "checkpoints", "6")
  assert str(error.value).startswith(f"checkpoint 6 could not be written to {path}: No space "
                                     "left on device (checkpoint 4 is still the latest")
  assert _steps(workdir) == [2, 4]
  logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert 7 <= max(logged) <= 8  # found at the next step, at the latest before the next save


def test_matches_abstract_checks_structure_and_shapes():
  import jax
  import numpy as np
  abstract = {"a": jax.ShapeDtypeStruct((2, 3), np.float32),
              "b": {"c": jax.ShapeDtypeStruct((4,), np.int32)}}
  good = {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4, np.int64)}}  # dtypes may differ
  assert ckpt.matches_abstract(good, abstract)
  assert not ckpt.matches_abstract({"a": np.zeros((3, 2)), "b": {"c": np.zeros(4)}}, abstract)
  assert not ckpt.matches_abstract({"a": np.zeros((2, 3)), "b": {"d": np.zeros(4)}}, abstract)
  assert not ckpt.matches_abstract({"a": np.zeros((2, 3))}, abstract)
