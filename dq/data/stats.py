"""Process-local counters of records read and records skipped (corrupt files), per dataset.

Sources call `note_seen` for every record they read and `note_skipped` for every record they
could not decode. Counters live in the process that reads: with grain worker processes
(`worker_count > 0`) the workers count, not the trainer's process; every batch carries the
records its process skipped since its previous batch (`take_new_skips`), which is how the
trainers count skips in either case.
"""
from __future__ import annotations

import dataclasses
import logging
import threading


@dataclasses.dataclass
class _DatasetCounts:
  seen: int = 0                   # Records read (every read, across epochs).
  skipped: int = 0                # Reads that failed (every read, across epochs).
  skipped_keys: set[str] = dataclasses.field(default_factory=set)  # Distinct bad records.


_LOCK = threading.Lock()
_COUNTS: dict[str, _DatasetCounts] = {}
_REPORTED = [0]  # distinct skipped records already handed out by `take_new_skips`


def note_seen(dataset: str, *, num_records: int, max_bad_fraction: float) -> None:
  """Counts one read of `dataset`; raises once too many of its reads failed.

  The check starts after `min(num_records, 64)` reads, so a few bad files at the start of a
  large dataset do not stop it, while a small dataset is judged once it was read in full.
  """
  with _LOCK:
    counts = _COUNTS.setdefault(dataset, _DatasetCounts())
    counts.seen += 1
    seen, skipped = counts.seen, counts.skipped
  if seen >= min(num_records, 64) and skipped > max_bad_fraction * seen:
    raise RuntimeError(
        f"dataset {dataset}: {skipped} of {seen} records read could not be decoded, above "
        f"max_bad_fraction={max_bad_fraction}; check the data (see the warnings above for "
        "the files)")


def note_skipped(dataset: str, key: str, reason: str) -> None:
  """Counts one failed read of record `key` (a path or index); logs each record once."""
  with _LOCK:
    counts = _COUNTS.setdefault(dataset, _DatasetCounts())
    counts.skipped += 1
    first_time = key not in counts.skipped_keys
    counts.skipped_keys.add(key)
  if first_time:
    logging.warning("dataset %s: skipping %s: %s", dataset, key, reason)


def skipped_counts() -> dict[str, int]:
  """Number of distinct records skipped so far, per dataset name."""
  with _LOCK:
    return {name: len(c.skipped_keys) for name, c in _COUNTS.items() if c.skipped_keys}


def read_counts() -> dict[str, tuple[int, int]]:
  """(reads, failed reads) so far per dataset name, counting every epoch."""
  with _LOCK:
    return {name: (c.seen, c.skipped) for name, c in _COUNTS.items()}


def take_new_skips() -> int:
  """Distinct records skipped in this process since the previous call.

  The pipeline attaches this to every batch (`skipped_records`), so the skips counted in grain
  worker processes reach the trainer, which sums them.
  """
  with _LOCK:
    total = sum(len(c.skipped_keys) for c in _COUNTS.values())
    new, _REPORTED[0] = total - _REPORTED[0], total
  return new


def reset() -> None:
  """Forgets all counts (tests, or a new run in the same process)."""
  with _LOCK:
    _COUNTS.clear()
    _REPORTED[0] = 0
