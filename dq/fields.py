"""`FieldError` and the value checks the config sections' own dataclasses share.

A section's dataclass (`dq.models.grains.GrainTargets`, `dq.losses.budget.BudgetLoss`, ...)
checks its fields where the code reads them, so every entry point (dq.main, benchmarks,
notebooks, tests) gets the same check; `dq.validate` turns a FieldError into its failure line
`config.FIELD = VALUE: expectation`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any


class FieldError(ValueError):
  """A config value a section check refused: its dotted field, the value and what is expected
  (the message reads like `dq.validate`'s: `config.FIELD = VALUE: expectation`)."""

  def __init__(self, field: str, value: Any, expectation: str):
    self.field, self.value, self.expectation = field, value, expectation
    super().__init__(f"config.{field} = {value!r}: {expectation}")


def number(field: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
  """`value` as a finite float within [low, high] (None: unbounded; `low_open`: > low), else
  a FieldError naming `field` with the interval dq.validate uses."""
  try:
    result = None if isinstance(value, (bool, str)) else float(value)
  except (TypeError, ValueError):
    result = None
  ok = result is not None and math.isfinite(result)
  ok = ok and (low is None or (result > low if low_open else result >= low))
  ok = ok and (high is None or result <= high)
  if not ok:
    interval = (f"{'(' if low_open else '['}{low}, {high}]" if low is not None and high is not None
                else f"{'>' if low_open else '>='} {low}" if low is not None else f"<= {high}")
    raise FieldError(field, value, f"expected a number {interval}")
  return result


def integer(field: str, value: Any, minimum: int | None = None) -> int:
  """`value` as an int >= `minimum` (not a bool or a float), else a FieldError naming `field`."""
  is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not is_int or (minimum is not None and value < minimum):
    raise FieldError(field, value, "expected an int" + (f" >= {minimum}" if minimum is not None
                                                        else ""))
  return int(value)


def choice(field: str, value: Any, choices: tuple) -> Any:
  """`value` if it is one of `choices`, else a FieldError naming `field`."""
  if isinstance(value, bool) or value not in choices:
    raise FieldError(field, value, f"expected one of {tuple(choices)}")
  return value
