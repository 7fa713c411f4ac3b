"""A real two-process stage-1 run (CPU, coordinator on localhost): trains, checkpoints, is killed,
resumes, and ends with the parameters of a one-process run over the same global batches."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from cli_util import subprocess_env, tiny_vae_flags
from dq.checkpoint import restore_params_from

REPO = os.path.join(os.path.dirname(__file__), "..")
CACHE_DIR = tempfile.mkdtemp(prefix="dq_multiprocess_cache_")  # the resumed pair reuses it
STEPS = 6
OVERRIDES = tiny_vae_flags(
    STEPS, 2, "--config.optim.eps=0.001")  # eps: Adam's first updates ~linear in the gradient
# The one-process run and the two processes reduce gradients in a different order (in-process
# all-reduce vs gloo), so parameters agree to float32 rounding, not bitwise.
RTOL, ATOL = 1e-4, 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, devices, extra=(), log=None):
  env = subprocess_env(devices, CACHE_DIR)
  return subprocess.Popen(
      [sys.executable, "-m", "dq.main", f"--workdir={workdir}", *OVERRIDES, *extra], cwd=REPO,
      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _start_pair(workdir, logs):
  port = _free_port()
  return [_start(workdir, 4, [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                              f"--process_id={i}"], logs[i]) for i in range(2)]


def _wait(procs, timeout=600):
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1, deadline - time.time()))
  return [p.returncode for p in procs]


def _checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _read_log(path):
  with open(path) as f:
    return f.read()[-3000:]


def test_two_process_run_killed_and_resumed_matches_one_process(tmp_path):
  reference = tmp_path / "one_process"
  with open(tmp_path / "ref.log", "w") as log:
    assert _wait([_start(reference, 8, log=log)]) == [0], _read_log(tmp_path / "ref.log")

  workdir = tmp_path / "two_process"
  logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
  procs = _start_pair(workdir, logs)
  deadline = time.time() + 600
  while not _checkpoints(workdir) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), [_read_log(tmp_path / f"p{i}.log")
                                                  for i in range(2)]
    time.sleep(0.05)
  for p in procs:  # killed without warning, mid-run
    os.killpg(p.pid, signal.SIGKILL)
  _wait(procs)
  saved = _checkpoints(workdir)
  assert saved and saved[-1] < STEPS, f"the run should be killed before its end; saw {saved}"

  procs = _start_pair(workdir, logs)
  codes = _wait(procs)
  for log in logs:
    log.close()
  assert codes == [0, 0], [_read_log(tmp_path / f"p{i}.log") for i in range(2)]
  assert f"Restored checkpoint at step {saved[-1]}" in open(tmp_path / "p0.log").read()
  assert _checkpoints(workdir)[-1] == STEPS

  got, expected = restore_params_from(str(workdir)), restore_params_from(str(reference))
  assert int(got["step"]) == int(expected["step"]) == STEPS
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(
      (got["params"], got["codebook"])), jax.tree.leaves((expected["params"],
                                                           expected["codebook"]))):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
  # Only process 0 writes logs: one metrics row per step, none duplicated.
  rows = open(workdir / "metrics.jsonl").read().splitlines()
  steps = [int(r.split('"step": ')[1].split(",")[0].split("}")[0]) for r in rows]
  assert sorted(set(steps)) == list(range(1, STEPS + 1))
