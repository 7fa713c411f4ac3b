"""Stop requests: SIGTERM/SIGINT (one process) or JAX's preemption sync point (several).

A trainer asks `watch.should_stop(step)` once per step. When it says yes, the trainer saves a
checkpoint of that step (model, optimizer, RNG, data iterator), flushes its logs and returns, so
the process exits 0 and the same command resumes exactly where it stopped.

With several processes every one of them must stop at the same step (a save is collective), so
the decision comes from `multihost_utils.reached_preemption_sync_point`: the coordination
service that `jax.distributed.initialize` starts catches the scheduler's SIGTERM on any host and
agrees on a step with all of them. Signal handlers are then left to JAX.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
  """Context manager that turns SIGTERM/SIGINT into a stop request at the next step boundary.

  A second SIGINT while a stop is pending raises KeyboardInterrupt (an impatient Ctrl-C).
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "PreemptionWatch":
    multi = jax.process_count() > 1
    if not multi and threading.current_thread() is threading.main_thread():
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("Received %s: finishing the current step, saving a checkpoint, then exiting",
                    signal.Signals(signum).name)

  def should_stop(self, step: int) -> bool:
    if self.signal is not None:
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service (e.g. disabled in the jax config)
        return False
    return False
