"""What a training run owns in its workdir, shared by both trainers (`TrainingRun`):

- an exclusive lock (`WORKDIR/run.lock`, process 0, for the run's life): a second trainer on
  the same workdir is refused at once, naming the holder (host, pid, start time). The lock is
  an `flock`, which the kernel releases on any exit, `kill -9` included; a lock file left by a
  holder that is gone is taken over with a warning;
- the config record: before anything is built, the new config is compared with the run's
  `config.json` (`dq.validate.resume`: fields that change shapes or meaning are refused in one
  message, the others are logged); `config.json` is rewritten only after the restore has
  succeeded, the earlier version kept as `config.<step>.json`;
- stop signals outside the train loop: during setup or the final evaluation SIGTERM/SIGINT
  stops the run at once with a line saying what was skipped, and the process exits 0.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, Iterator, Optional

import jax

from dq.train.preemption import PreemptionWatch, StopRequested
from dq.run_files import WORKDIR_CONFIG
from dq.validate.checker import ConfigError
from dq.validate.resume import check_resume

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


class WorkdirLock:
  """Exclusive lock on a workdir: `acquire()` or WorkdirLocked naming the holder; `release()`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      previous = self._read(fd)
      if not self._flock(fd, previous):
        raise WorkdirLocked(
            f"{os.path.dirname(self.path)} is in use by another trainer ({_describe(previous)}; "
            f"lock file {self.path}). Wait for it to finish, stop it, or use another --workdir")
      if previous:
        logging.warning("Taking over the lock of %s: its holder (%s) is no longer running "
                        "(it ended without releasing it, e.g. killed)",
                        os.path.dirname(self.path), _describe(previous))
      me = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def _flock(self, fd: int, previous: dict) -> bool:
    """True when this process now holds the lock. Without flock support (some network file
    systems) the file's holder decides: free unless a live process on this host holds it."""
    import fcntl
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
    if not previous:
      return True
    if previous.get("host") != socket.gethostname():
      return False  # cannot tell whether a process on another host is alive
    return not _pid_alive(int(previous.get("pid", 0) or 0))

  @staticmethod
  def _read(fd: int) -> dict:
    data = os.pread(fd, 4096, 0)
    try:
      holder = json.loads(data.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
      return {"host": "?", "pid": "?", "started": f"unreadable lock file ({len(data)} bytes)"}
    return holder if isinstance(holder, dict) else {}

  def release(self) -> None:
    if self._fd is None:
      return
    import fcntl
    try:
      os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None


def read_saved_config(workdir: str) -> Optional[dict]:
  """The run's config.json, None when there is none; ConfigError when it is not JSON."""
  path = os.path.join(workdir, WORKDIR_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ConfigError([f"{path} is not a readable config ({e}): the run in {workdir} cannot be "
                       "checked against this config; restore that file (an earlier version may "
                       "be kept as config.<step>.json) or use another --workdir"]) from e
  return saved if isinstance(saved, dict) else {}


def latest_checkpoint_folder(workdir: str) -> Optional[int]:
  """The highest `checkpoints/<step>` folder (complete or not), or None."""
  root = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return max(steps) if steps else None


def record_config(config: Any, workdir: str, step: int) -> None:
  """Writes WORKDIR/config.json (process 0) once the run has resumed at `step` (0: a new
  run); an earlier, different config.json is kept as config.<step>.json."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, WORKDIR_CONFIG)
  text = config.to_json_best_effort(indent=1)
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
    kept, index = os.path.join(workdir, f"config.{step}.json"), 1
    while os.path.exists(kept):
      kept, index = os.path.join(workdir, f"config.{step}.{index}.json"), index + 1
    os.replace(path, kept)
    logging.info("Kept the previous config as %s", kept)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class TrainingRun:
  """Context manager around a trainer's `train` mode: lock (process 0), config check, and one
  stop-signal watch for the whole run. A stop outside the train loop (in `phase`) ends the
  `with` block quietly after a line saying what was skipped; `stopped` then names the phase.

    with TrainingRun(config, workdir) as run:
      with run.phase("setup"): ...; run.record_config(start)
      with TrainLoop(..., watch=run.watch) as loop: ...
      with run.phase("the final evaluation", skipped="..."): ...
  """

  def __init__(self, config: Any, workdir: str):
    self.config, self.workdir = config, workdir
    self.watch = PreemptionWatch()
    self.lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    self.stopped: Optional[str] = None
    self._skipped = ""

  def __enter__(self) -> "TrainingRun":
    self._acquire()
    try:
      allowed = check_resume(read_saved_config(self.workdir), self.config, self.workdir,
                             latest_checkpoint_folder(self.workdir))
      if allowed:
        logging.warning("Resuming with changed settings (allowed on resume): %s",
                        "; ".join(allowed))
      self.watch.__enter__()
    except BaseException:
      self._release()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self.watch.__exit__(exc_type, exc, tb)
    self._release()
    if isinstance(exc, StopRequested):
      self.stopped = exc.phase
      logging.warning("Stopped by %s during %s: %s. Rerunning the same command continues "
                      "from there.", signal.Signals(exc.signum).name, exc.phase,
                      self._skipped or "nothing after it was run")
      return True
    return False

  def _acquire(self) -> None:
    """Process 0 takes the lock; with several processes all of them learn whether it did, so
    that none goes on into collective setup alone."""
    error = None
    if self.lock is not None:
      try:
        self.lock.acquire()
      except WorkdirLocked as e:
        error, self.lock = e, None
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not int(ok) and error is None:
        error = WorkdirLocked(f"{self.workdir} is in use by another trainer (process 0 could "
                              "not take its lock; see its log)")
    if error is not None:
      raise error

  def _release(self) -> None:
    if self.lock is not None:
      self.lock.release()

  @contextlib.contextmanager
  def phase(self, name: str, skipped: str = "") -> Iterator[None]:
    """A stop signal within raises StopRequested at once; `skipped` says what that skips."""
    self._skipped = skipped
    with self.watch.phase(name):
      yield

  def record_config(self, step: int) -> None:
    record_config(self.config, self.workdir, step)
