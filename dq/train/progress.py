"""A progress line (step, steps/s, ETA) that needs no TensorFlow."""
from __future__ import annotations

import logging
import time


class Progress:
  """Call once per step; logs every `every` steps and returns steps/s when it does."""

  def __init__(self, total_steps: int, start_step: int, every: int = 10):
    self.total, self.every = total_steps, max(1, every)
    self._t0, self._s0 = time.perf_counter(), start_step
    self._t_last, self._s_last = self._t0, start_step

  def __call__(self, step: int) -> float | None:
    if step % self.every and step != self.total:
      return None
    now = time.perf_counter()
    rate = (step - self._s_last) / max(now - self._t_last, 1e-9)
    self._t_last, self._s_last = now, step
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info("step %d/%d (%.1f%%), %.2f steps/s, ETA %dm%02ds", step, self.total,
                 100.0 * step / self.total, rate, eta // 60, eta % 60)
    return rate
