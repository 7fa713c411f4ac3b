"""Locating pretrained weight files: an explicit path, an environment variable, or the file an
installed package ships. Nothing is downloaded; a missing file raises with instructions."""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Callable, Optional


def installed_package_file(package: str, relative: str) -> Optional[pathlib.Path]:
  """`<package dir>/<relative>` of an installed package, found without importing it, or None."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    candidate = pathlib.Path(location) / relative
    if candidate.is_file():
      return candidate
  return None


def locate_weights(path: str | os.PathLike | None, *, what: str, env: str,
                   installed: Callable[[], Optional[pathlib.Path]], package: str,
                   missing_help: str) -> tuple[pathlib.Path, str]:
  """(weights file, where it came from): `path`, else $`env`, else `installed()` (the file
  `package` ships). FileNotFoundError naming the origin and `missing_help` otherwise."""
  origin = "path argument"
  if path is None and os.environ.get(env):
    path, origin = os.environ[env], f"${env}"
  if path is None:
    path, origin = installed(), f"installed {package} package"
  if path is None:
    raise FileNotFoundError(missing_help)
  source = pathlib.Path(path)
  if not source.is_file():
    raise FileNotFoundError(f"{what} weights file {str(source)!r} (from {origin}) does not "
                            f"exist.\n{missing_help}")
  return source, origin
