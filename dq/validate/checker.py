"""`Checker` (the config, its base config and the failures so far), `ConfigError`, the base
config of each stage and the small helpers every rule module uses."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from dq import run_files

STAGE_MODES = {"vae": ("train", "eval"), "transformer": ("train", "sample", "encode"),
               "fid": ("reference", "stage1", "stage2")}
MAX_SHOWN = 120                             # characters of a non-string value shown


class ConfigError(ValueError):
  """Every failed rule, one line each: `config.FIELD = VALUE: expectation`."""

  def __init__(self, failures: Sequence[str]):
    self.failures = tuple(failures)
    super().__init__("\n".join(self.failures))


def base_config(stage: str) -> ml_collections.ConfigDict:
  """The config with every field and its default for `stage` ('vae', 'transformer', 'fid')."""
  if stage == "vae":
    from dq.configs import vae_base_config
    return vae_base_config()
  if stage == "transformer":
    from dq.configs import transformer_base_config
    return transformer_base_config()
  if stage == "fid":
    from dq.configs import fid_base_config
    return fid_base_config()
  raise ValueError(f"stage {stage!r}: expected one of {sorted(STAGE_MODES)}")


# --- helpers -----------------------------------------------------------------------------------


def is_section(value: Any) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def one_line(text: str) -> str:
  return " ".join(text.split())


def show(value: Any) -> str:
  """One-line repr; strings (paths) in full, other values cut at MAX_SHOWN characters."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  text = one_line(repr(value))
  if isinstance(value, str) or len(text) <= MAX_SHOWN:
    return text
  return text[:MAX_SHOWN - 3] + "..."


def _interval(low: Optional[float], high: Optional[float], low_open: bool,
              high_open: bool) -> str:
  if low is not None and high is not None:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low}"
  return f"{'<' if high_open else '<='} {high}"


def is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_remote(path: str) -> bool:
  return "://" in path


def plain(value: Any) -> Any:
  """JSON-comparable form: ConfigDicts to dicts, lists to tuples (recursively)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(plain(v) for v in value)
  return value


def read_json(path: str) -> dict:
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
  return data


def run_config_path(path: str) -> Optional[str]:
  """config.json of a run given its workdir, `WORKDIR/checkpoints` or `.../checkpoints/N`."""
  return run_files.run_config_path(os.path.abspath(path))


class Checker:
  """The config, its stage's base config (defaults of fields the config lacks) and the
  failures found so far."""

  def __init__(self, config: Any, base: ml_collections.ConfigDict):
    self.config, self.base = config, base
    self.failures: list[str] = []

  def fail(self, field: str, value: Any, expectation: str) -> None:
    self.failures.append(f"config.{field} = {show(value)}: {one_line(expectation)}")

  def get(self, field: str, default: Any = None) -> Any:
    """The value at dotted `field` in the config, else in the base config, else `default`."""
    for root in (self.config, self.base):
      node, found = root, True
      for key in field.split("."):
        if is_section(node) and key in node:
          node = node[key]
        else:
          found = False
          break
      if found:
        return node
    return default

  def integer(self, field: str, minimum: Optional[int] = None) -> Optional[int]:
    """The int at `field`, or None after a failure (not an int, or below `minimum`)."""
    value = self.get(field)
    if not is_int(value) or (minimum is not None and value < minimum):
      self.fail(field, value, "expected an int" + (f" >= {minimum}" if minimum is not None
                                                  else ""))
      return None
    return int(value)

  def number(self, field: str, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False, high_open: bool = False) -> Optional[float]:
    """The finite number at `field` within the bounds, or None after a failure."""
    value = self.get(field)
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and math.isfinite(value))
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      self.fail(field, value, f"expected a number {_interval(low, high, low_open, high_open)}")
      return None
    return float(value)

  def choice(self, field: str, choices: Sequence[Any]) -> Optional[Any]:
    value = self.get(field)
    if isinstance(value, bool) or value not in choices:
      self.fail(field, value, f"expected one of {tuple(choices)}")
      return None
    return value

  def boolean(self, field: str) -> Optional[bool]:
    value = self.get(field)
    if not isinstance(value, (bool, np.bool_)):
      self.fail(field, value, "expected True or False")
      return None
    return bool(value)

  def existing(self, field: str, kind: str, what: str) -> Optional[str]:
    """The path at `field` when set and present (`kind`: 'file', 'dir' or 'any'); a failure
    when it is set but missing. Remote (`scheme://`) paths are not checked."""
    value = self.get(field)
    if value in ("", None):
      return None
    if not isinstance(value, str):
      self.fail(field, value, f"expected a path to {what}")
      return None
    if is_remote(value):
      return value
    present = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[kind](value)
    if not present:
      noun = {"file": "file", "dir": "folder", "any": "path"}[kind]
      self.fail(field, value, f"expected an existing {noun} ({what}); it does not exist")
      return None
    return value
