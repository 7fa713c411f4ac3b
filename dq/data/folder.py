"""Image folders: recursive scan, class labels from subfolders, tolerant decoding.

Files are found recursively by extension (case-insensitive; hidden files and folders, whose
names start with '.', are ignored) and sorted by path, so record `i` is the same file on every
host. A file that does not decode is skipped: its record comes out with `valid=False`, it is
counted in `dq.data.stats` and logged once.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from dq.data import decode

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def scan_image_files(root: str | os.PathLike) -> list[str]:
  """Sorted paths of all image files under `root`; raises if there are none."""
  root = os.fspath(root)
  if not os.path.exists(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist")
  if not os.path.isdir(root):
    raise NotADirectoryError(f"image folder {root!r} is a file, not a folder")
  paths = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    paths.extend(os.path.join(folder, f) for f in files
                 if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"image folder {root!r} has no image files (searched recursively for "
                     f"{', '.join(IMAGE_EXTENSIONS)})")
  return sorted(paths)


def _top_folder(root: str, path: str) -> str | None:
  """Name of the first folder below `root` on `path`, or None for a file directly in root."""
  parts = os.path.relpath(path, root).split(os.sep)
  return parts[0] if len(parts) > 1 else None


def index_folder(root: str | os.PathLike, *, labels_from_subfolders: bool,
                 class_names: Sequence[str] | None = None) -> tuple[list[str], list[int],
                                                                    list[str]]:
  """(paths, labels, class names) of the images under `root`.

  With `labels_from_subfolders`, the label of a file is the index of its top-level folder in
  `class_names` (default: the sorted names of the top-level folders that hold images; pass the
  train folder's names when indexing an eval folder). Otherwise every label is 0.
  """
  root = os.fspath(root)
  paths = scan_image_files(root)
  if not labels_from_subfolders:
    return paths, [0] * len(paths), []
  tops = [_top_folder(root, p) for p in paths]
  loose = [p for p, top in zip(paths, tops) if top is None]
  if loose:
    raise ValueError(f"labels_from_subfolders=True but {len(loose)} image(s) sit directly in "
                     f"{root!r} outside any class folder, e.g. {loose[0]!r}")
  names = sorted(set(tops)) if class_names is None else list(class_names)
  label_of = {name: i for i, name in enumerate(names)}
  unknown = sorted(set(tops) - set(label_of))
  if unknown:
    raise ValueError(f"class folder(s) {unknown[:5]} of {root!r} are not among the "
                     f"{len(names)} training classes")
  return paths, [label_of[t] for t in tops], names


def hold_out_tail(paths: Sequence[str], labels: Sequence[int], fraction: float,
                  split: str) -> tuple[list[str], list[int]]:
  """Train or eval part of a folder without its own eval folder.

  Eval is the last ceil(fraction * n) files (in path order) of every label with n >= 2 files,
  so each class is represented; train is everything else.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"folder eval_fraction must be in (0, 1), got {fraction}")
  by_label: dict[int, list[int]] = {}
  for i, label in enumerate(labels):
    by_label.setdefault(label, []).append(i)
  held_out = set()
  for members in by_label.values():
    if len(members) >= 2:
      held_out.update(members[len(members) - math.ceil(fraction * len(members)):])
  if not held_out:
    raise ValueError(f"cannot hold out eval images from {len(paths)} file(s); set "
                     "data.folder.eval_path to an eval folder")
  keep = [i for i in range(len(paths)) if (i in held_out) == (split == "eval")]
  return [paths[i] for i in keep], [labels[i] for i in keep]


class FolderSource:
  """Random-access source of raw records decoded from image files."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], *, name: str,
               min_size: int = 0, max_bad_fraction: float = 0.5):
    if len(paths) != len(labels):
      raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
    if not paths:
      raise ValueError(f"{name}: no image files")
    self.paths, self.labels = list(paths), list(labels)
    self.name, self.min_size, self.max_bad_fraction = name, min_size, max_bad_fraction

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    path = self.paths[index]
    image = decode.guarded_read(
        self.name, path, lambda: decode.decode_image(path, min_size=self.min_size),
        num_records=len(self.paths), max_bad_fraction=self.max_bad_fraction)
    if image is None:
      return decode.invalid_record(index)
    return decode.make_record(image, self.labels[index], index)

  def __repr__(self) -> str:
    return f"FolderSource({self.name!r}, {len(self.paths)} files)"


def build_folder_source(split: str, *, train_path: str, eval_path: str, eval_fraction: float,
                        labels_from_subfolders: bool, min_size: int = 0,
                        max_bad_fraction: float = 0.5) -> tuple[FolderSource, list[str]]:
  """The split's source and the class names (empty without subfolder labels).

  Eval reads `eval_path` when given (labels by the train folder's class names), else a
  held-out tail of `train_path` (`hold_out_tail`), which train then leaves out.
  """
  if not train_path:
    raise ValueError("data.folder.train_path is empty; set it to the image folder")
  if split == "eval" and eval_path:
    classes = (index_folder(train_path, labels_from_subfolders=True)[2]
               if labels_from_subfolders else [])
    paths, labels, _ = index_folder(eval_path, labels_from_subfolders=labels_from_subfolders,
                                    class_names=classes or None)
    root = eval_path
  else:
    paths, labels, classes = index_folder(train_path,
                                          labels_from_subfolders=labels_from_subfolders)
    if not eval_path:
      paths, labels = hold_out_tail(paths, labels, eval_fraction, split)
    root = train_path
  source = FolderSource(paths, labels, name=f"folder:{root}:{split}", min_size=min_size,
                        max_bad_fraction=max_bad_fraction)
  return source, classes
