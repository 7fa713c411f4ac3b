"""Preemption and exact resume.

Stage 1, real processes: a run gets SIGTERM mid-run (exits 0 with a checkpoint of that step), the
resumed run is SIGKILLed inside a checkpoint save (the previous checkpoint stays the latest), a
third run finishes; its final state equals an uninterrupted run's bitwise.
Stage 2, in process: a real SIGTERM to this process stops the trainer after the current step;
the resumed run ends bitwise equal to an uninterrupted one.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_util import subprocess_env, tiny_vae_flags
from dq.train import transformer_trainer as tt
from dq.checkpoint import restore_params_from

REPO = os.path.join(os.path.dirname(__file__), "..")
STEPS = 8
KILL_IN_SAVE_STEP = 6
OVERRIDES = tiny_vae_flags(STEPS, 2)
# Runs dq.main with two test-only patches: each logged step sleeps a little (so the test's
# SIGTERM lands mid-run), and with DQ_TEST_HANG_SAVE=N the save of step N writes its data, then
# hangs before orbax's finalize/rename (the test SIGKILLs it there).
DRIVER = r"""
import os, sys, time
import orbax.checkpoint as ocp
from dq.train import progress
hang_step, marker = os.environ.get("DQ_TEST_HANG_SAVE"), os.environ.get("DQ_TEST_MARKER")
original_finalize = ocp.StandardCheckpointHandler.finalize
def finalize(self, directory):
  if hang_step and os.path.basename(os.path.dirname(str(directory))).split(".")[0] == hang_step:
    open(marker, "w").close()
    time.sleep(600)
  return original_finalize(self, directory)
ocp.StandardCheckpointHandler.finalize = finalize
original_call = progress.Progress.__call__
def slow_call(self, step):
  time.sleep(0.3)
  return original_call(self, step)
progress.Progress.__call__ = slow_call
from absl import app
from dq import main
app.run(main.main)
"""


def _start(workdir, log, cache_dir, **env_extra):
  env = subprocess_env(2, cache_dir, **env_extra)
  return subprocess.Popen([sys.executable, "-c", DRIVER, f"--workdir={workdir}", *OVERRIDES],
                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)


def _read(path):
  with open(path) as f:
    return f.read()


def _checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _wait_for(predicate, proc, log_path, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, _read(log_path)[-3000:]
    assert time.time() < deadline, _read(log_path)[-3000:]
    time.sleep(0.05)


def _run(workdir, log_path, cache_dir, **env_extra):
  with open(log_path, "w") as log:
    proc = _start(workdir, log, cache_dir, **env_extra)
    assert proc.wait(timeout=600) == 0, _read(log_path)[-3000:]


def _assert_same_state(a_dir, b_dir):
  a, b = restore_params_from(str(a_dir)), restore_params_from(str(b_dir))
  assert int(a["step"]) == int(b["step"]) == STEPS
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_then_sigkill_in_save_then_resume_is_bitwise_exact(tmp_path):
  cache = str(tmp_path / "jax_cache")
  reference = tmp_path / "uninterrupted"
  _run(reference, tmp_path / "ref.log", cache)

  workdir = tmp_path / "interrupted"
  log_path = tmp_path / "run1.log"
  with open(log_path, "w") as log:
    proc = _start(workdir, log, cache)
    _wait_for(lambda: "step 3/8" in _read(log_path), proc, log_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, _read(log_path)[-3000:]
  text = _read(log_path)
  assert "Received SIGTERM" in text and "Rerun the same command to resume" in text
  stopped = _checkpoints(workdir)[-1]
  assert 3 <= stopped < KILL_IN_SAVE_STEP, (stopped, text[-2000:])
  assert f"step {stopped + 1}/8" not in text  # stopped right after the current step

  # Second run: resumes, then is killed with SIGKILL in the middle of the save of step 6.
  marker = str(tmp_path / "in_save")
  log_path = tmp_path / "run2.log"
  with open(log_path, "w") as log:
    proc = _start(workdir, log, cache, DQ_TEST_HANG_SAVE=str(KILL_IN_SAVE_STEP),
                  DQ_TEST_MARKER=marker)
    _wait_for(lambda: os.path.exists(marker), proc, log_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  assert f"Restored checkpoint at step {stopped}" in _read(log_path)
  leftovers = [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]
  assert any(n.startswith(f"{KILL_IN_SAVE_STEP}.") for n in leftovers), leftovers
  complete = _checkpoints(workdir)
  assert KILL_IN_SAVE_STEP not in complete and complete[-1] >= stopped

  _run(workdir, tmp_path / "run3.log", cache)
  resumed_from = complete[-1]  # the newest complete checkpoint, not the half-written one
  assert f"Restored checkpoint at step {resumed_from}" in _read(tmp_path / "run3.log")
  _assert_same_state(reference, workdir)


# --- stage 2, in process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_dir(tiny_stage1_dir):
  return tiny_stage1_dir


def _stage2_config(stage1_dir, steps):
  from stage2_util import tiny_config
  return tiny_config(stage1_dir, steps, checkpoint_every=100)


def test_stage2_sigterm_stops_after_the_step_and_resume_is_exact(stage1_dir, tmp_path,
                                                                   monkeypatch):
  full = tt.train_and_evaluate(_stage2_config(stage1_dir, 5), str(tmp_path / "full"))

  original_next = tt.TrainTokens.next

  def next_then_signal(self, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 2 is being prepared
    return original_next(self, step)

  monkeypatch.setattr(tt.TrainTokens, "next", next_then_signal)
  stopped = tt.train_and_evaluate(_stage2_config(stage1_dir, 5), str(tmp_path / "cut"))
  assert int(stopped.step) == 2
  assert _checkpoints(tmp_path / "cut") == [2]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
  monkeypatch.setattr(tt.TrainTokens, "next", original_next)

  resumed = tt.train_and_evaluate(_stage2_config(stage1_dir, 5), str(tmp_path / "cut"))
  assert int(resumed.step) == 5
  for a, b in zip(jax.tree.leaves(jax.device_get((full.params, full.opt_state))),
                  jax.tree.leaves(jax.device_get((resumed.params, resumed.opt_state)))):
    np.testing.assert_array_equal(a, b)
