"""Stop requests: SIGTERM/SIGINT (one process) or JAX's preemption sync point (several).

A trainer asks `watch.should_stop(step)` once per step. When it says yes, the trainer saves a
checkpoint of that step (model, optimizer, RNG, data iterator), flushes its logs and returns, so
the process exits 0 and the same command resumes exactly where it stopped.

With several processes every one of them must stop at the same step (a save is collective), so
the decision comes from `multihost_utils.reached_preemption_sync_point`: the coordination
service that `jax.distributed.initialize` starts catches the scheduler's SIGTERM on any host and
agrees on a step with all of them. Signal handlers are then left to JAX.

Outside the train loop (setup, the final evaluation) there is no step to finish: inside
`watch.phase(name)` a stop signal raises `StopRequested` at once, and the trainer reports what
was skipped and exits 0 (see `dq.train.workdir.TrainingRun`).

Why not orbax's helper: `CheckpointManager.reached_preemption(step)` (orbax-checkpoint 0.12) is
`multihost_utils.reached_preemption_sync_point` with a RuntimeError (preemption service off)
read as "no": the multi-process branch here, nothing more. It has no single-process signal
handling and no stop outside the train loop, which are most of what this module does.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

import jax

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
  """A stop signal arrived during `phase` (outside the train loop)."""

  def __init__(self, signum: int, phase: str):
    self.signum, self.phase = signum, phase
    super().__init__(f"{signal.Signals(signum).name} during {phase}")


class PreemptionWatch:
  """Context manager that turns SIGTERM/SIGINT into a stop request at the next step boundary,
  or, inside `phase(name)`, into StopRequested at once.

  A second SIGINT while a stop is pending raises KeyboardInterrupt (an impatient Ctrl-C).
  Entering it again while its handlers are installed does nothing (the trainers install one
  watch for the whole run and hand it to the train loop).
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, object] = {}
    self._phase: Optional[str] = None
    self._depth = 0

  def __enter__(self) -> "PreemptionWatch":
    self._depth += 1
    multi = jax.process_count() > 1
    if (self._depth == 1 and not multi
        and threading.current_thread() is threading.main_thread()):
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Within it a stop signal (or one that arrived before) raises StopRequested."""
    previous, self._phase = self._phase, name
    try:
      if self.signal is not None:
        raise StopRequested(self.signal, name)
      yield
    finally:
      self._phase = previous

  def __exit__(self, *exc) -> None:
    self._depth -= 1
    if self._depth:
      return
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    if self._phase is not None:
      raise StopRequested(signum, self._phase)
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
