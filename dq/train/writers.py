"""Metric writers: TensorBoard (clu's SummaryWriter) when TensorFlow is present, the console
(one line of scalars per log step) and metrics.jsonl.

Every writer also appends scalars to `metrics.jsonl` in the workdir, which tests and
benchmarks read. Only process 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Iterator, Mapping

import jax
import numpy as np


class JsonlWriter:
  """Appends one JSON line per `write_scalars` call; images go to PNG files."""

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._image_dir = os.path.join(workdir, "summaries")
    os.makedirs(workdir, exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_images(self, step: int, images: Mapping[str, Any]):
    from dq.summaries.png import save_png
    for name, image in images.items():
      image = np.asarray(image)
      image = image[0] if image.ndim == 4 else image
      save_png(os.path.join(self._image_dir, f"{name}_{int(step):07d}.png"), image)

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    with open(os.path.join(os.path.dirname(self._path), "hparams.json"), "w") as f:
      json.dump({k: str(v) for k, v in hparams.items()}, f, indent=1)

  def flush(self):
    """Nothing is buffered: every write goes straight to its file or the log."""

  def close(self):
    """No open handles to close."""


class ConsoleWriter:
  """Logs scalars as one line (the part of clu's LoggingWriter we need without TF)."""

  def write_scalars(self, step, scalars):
    text = ", ".join(f"{k}={float(np.asarray(v)):.5g}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", int(step), text)

  def write_images(self, step, images):
    del step, images

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    """Nothing is buffered: every write goes straight to its file or the log."""

  def close(self):
    """No open handles to close."""


class MultiWriter:

  def __init__(self, writers):
    self._writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)
    return call


def create_writer(workdir: str, tensorboard: bool = True):
  """TensorBoard (clu) + console + JSONL on process 0; a silent writer elsewhere."""
  if jax.process_index() != 0:
    return MultiWriter([])
  writers: list = [JsonlWriter(workdir)]
  if tensorboard:
    try:
      with _quiet_native_stderr(os.environ.get(QUIET_ENV) == "1"):
        from clu import metric_writers  # Imports TensorFlow.
      writers.append(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))
    except ImportError as e:
      logging.warning("clu metric writers unavailable (%s): console + metrics.jsonl only.", e)
  writers.append(ConsoleWriter())
  return MultiWriter(writers)


QUIET_ENV = "DQ_QUIET_LIBRARIES"  # "1" (set by dq.main without --verbose): hide import chatter


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool) -> Iterator[None]:
  """Sends file descriptor 2 to /dev/null while enabled: TensorFlow's C++ start-up lines
  (oneDNN, CPU features) ignore TF_CPP_MIN_LOG_LEVEL; Python errors still propagate."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
