"""Workdir safety of the trainers (issue 18), stage 1 in process on a tiny config: a resume with
a changed config, two trainers on one workdir, and stop signals outside the train loop."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from dq.train import vae_trainer
from dq.train import workdir as workdir_lib
from dq.validate.resume import ResumeConfigError
from test_train_vae import tiny_config

REPO = os.path.join(os.path.dirname(__file__), "..")


def _copy(run, tmp_path) -> str:
  path = str(tmp_path / "wd")
  shutil.copytree(run, path)
  return path


def _read(path, mode="r"):
  with open(path, mode) as f:
    return f.read()


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _no_build(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the trainer started building")
  monkeypatch.setattr(vae_trainer, "setup", fail)
  monkeypatch.setattr(vae_trainer, "make_perceptual", fail)


def test_resume_refuses_shape_fields_in_one_message_before_building(vae_run_4_steps,
                                                                     tmp_path, monkeypatch):
  workdir = _copy(vae_run_4_steps, tmp_path)
  before = _read(os.path.join(workdir, "config.json"), "rb")
  config = tiny_config(6, checkpoint_every=2, batch_size=16)
  config.model.ch, config.model.codebook_size = 32, 64
  config.model.router.kind = "entropy"
  _no_build(monkeypatch)
  with pytest.raises(ResumeConfigError) as error:
    vae_trainer.train_and_evaluate(config, workdir)
  text = str(error.value)
  assert "checkpoint 4" in text
  for line in ("model.ch: 16 -> 32", "model.codebook_size: 32 -> 64",
               "model.router.kind: 'feature' -> 'entropy'"):
    assert line in text, text
  assert "batch_size" not in text and "num_steps" not in text  # allowed changes
  assert _read(os.path.join(workdir, "config.json"), "rb") == before
  assert not [n for n in os.listdir(workdir) if n.startswith("config.") and n != "config.json"]
  assert _read(os.path.join(workdir, workdir_lib.LOCK_FILE)) == ""  # released


def test_stage1_command_on_a_stage2_workdir_is_refused(tmp_path, monkeypatch):
  workdir = tmp_path / "stage2"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  saved = json.dumps({"stage": "transformer", "model": {"n_embd": 64}})
  (workdir / "config.json").write_text(saved)
  _no_build(monkeypatch)
  with pytest.raises(ResumeConfigError, match="stage: 'transformer' -> 'vae'") as error:
    vae_trainer.train_and_evaluate(tiny_config(2), str(workdir))
  assert len(str(error.value).splitlines()) == 3  # the header, one field, the advice
  assert (workdir / "config.json").read_text() == saved
  (workdir / "config.json").write_text('{"stage": "va')  # cut short
  from dq.validate import ConfigError
  with pytest.raises(ConfigError, match="config.json is not a readable config"):
    vae_trainer.train_and_evaluate(tiny_config(2), str(workdir))
  assert (workdir / "config.json").read_text() == '{"stage": "va'


def test_allowed_changes_resume_and_the_old_config_is_kept(vae_run_4_steps, tmp_path,
                                                           caplog):
  workdir = _copy(vae_run_4_steps, tmp_path)
  before = _read(os.path.join(workdir, "config.json"))
  config = tiny_config(5, checkpoint_every=2, log_every=5)
  config.optim.lr = 2e-3
  config.model.router.warmup_steps = 7  # a router-training field: allowed
  with caplog.at_level(logging.WARNING):
    state = vae_trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 5
  changes = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
  assert len(changes) == 1
  for line in ("optim.lr: 0.001 -> 0.002", "train.num_steps: 4 -> 5",
               "train.log_every: 1 -> 5", "model.router.warmup_steps: 300 -> 7"):
    assert line in changes[0], changes[0]
  assert _read(os.path.join(workdir, "config.4.json")) == before
  assert json.loads(_read(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 5


HOLDER = r"""
import sys, time
from dq.train.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_trainer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, monkeypatch,
                                                                  caplog):
  workdir = str(tmp_path / "wd")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert holder.stdout.readline().strip() == "locked"
    _no_build(monkeypatch)
    with pytest.raises(workdir_lib.WorkdirLocked) as error:
      vae_trainer.train_and_evaluate(tiny_config(2), workdir)
    text = str(error.value)
    assert f"pid {holder.pid}" in text and f"host {socket.gethostname()}" in text, text
    assert "started 20" in text  # the holder's start time
    assert not os.path.exists(os.path.join(workdir, "config.json"))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lock = workdir_lib.WorkdirLock(workdir)  # the killed holder's record is still in the file
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert any(f"pid {holder.pid}" in r.getMessage() and "no longer running" in r.getMessage()
             for r in caplog.records)
  lock.release()
  assert _read(lock.path) == ""


def _signal_self_then(original):
  def call(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
  return call


def test_sigterm_during_setup_stops_cleanly(vae_run_4_steps, tmp_path, monkeypatch,
                                            caplog):
  workdir = _copy(vae_run_4_steps, tmp_path)
  before = _read(os.path.join(workdir, "config.json"))
  monkeypatch.setattr(vae_trainer, "build_model", _signal_self_then(vae_trainer.build_model))
  config = tiny_config(6, checkpoint_every=2)
  with caplog.at_level(logging.WARNING):
    assert vae_trainer.train_and_evaluate(config, workdir) is None
  assert any("Stopped by SIGTERM during setup: nothing was trained or saved" in r.getMessage()
             for r in caplog.records)
  assert _steps(workdir) == [2, 4] and _read(os.path.join(workdir, "config.json")) == before
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_during_final_eval_skips_it_and_the_rerun_evaluates(vae_run_4_steps,
                                                                    tmp_path, monkeypatch,
                                                                    caplog):
  from dq.evaluation import vae_eval
  workdir = _copy(vae_run_4_steps, tmp_path)
  config = tiny_config(4, checkpoint_every=2)
  config.eval.update(dict(at_end=True, lpips=False))
  original = vae_eval.evaluate_vae
  monkeypatch.setattr(vae_eval, "evaluate_vae", _signal_self_then(original))
  with caplog.at_level(logging.WARNING):
    assert vae_trainer.train_and_evaluate(config, workdir) is None
  assert any("during the final evaluation: the final evaluation was skipped (the checkpoint of "
             "step 4 is saved" in r.getMessage() for r in caplog.records)
  assert not os.path.isdir(os.path.join(workdir, "eval"))
  monkeypatch.setattr(vae_eval, "evaluate_vae", original)
  assert int(vae_trainer.train_and_evaluate(config, workdir).step) == 4
  assert os.listdir(os.path.join(workdir, "eval"))


STOP_IN_CHECKS = r"""
import os, signal
from dq import validate
def validate_then_stop(config):
  os.kill(os.getpid(), signal.SIGTERM)
validate.validate_config = validate_then_stop
from dq import main
main.run()
"""


def test_sigterm_before_the_trainer_takes_over_exits_0(tmp_path):
  """A real process stopped while dq.main checks the config (before any trainer code)."""
  from cli_util import subprocess_env, tiny_vae_flags
  result = subprocess.run([sys.executable, "-c", STOP_IN_CHECKS,
                           f"--workdir={tmp_path / 'wd'}", *tiny_vae_flags(2, 1)], cwd=REPO,
                          env=subprocess_env(1, str(tmp_path / "cache")), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Stopped by SIGTERM during the vae train job: it did not finish" in result.stderr
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")
