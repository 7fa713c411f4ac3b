"""Host-side checks of the sampler's inputs, before anything compiles: labels, sampling
settings and a checkpoint's layout-sized axes against a token layout."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from dq.stage2.layout import TokenLayout


def check_labels(layout: TokenLayout, labels: Optional[np.ndarray]) -> None:
  """Raises ValueError for labels that do not fit the layout (host-side, before compiling)."""
  if layout.num_classes == 0:
    if labels is not None:
      raise ValueError("labels given, but the model is unconditional (num_classes == 0); pass "
                       "a batch size instead")
    return
  if labels is None:
    raise ValueError(f"the model is class-conditional ({layout.num_classes} classes): pass "
                     "labels [B]")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or not labels.size:
    raise ValueError(f"labels must be a non-empty 1-D integer array; got {labels.dtype} "
                     f"{labels.shape}")
  if labels.min() < 0 or labels.max() > layout.num_classes:
    raise ValueError(f"labels must lie in [0, {layout.num_classes}] ({layout.num_classes} = "
                     f"null class); got range [{labels.min()}, {labels.max()}]")


def _content_vocab_text(layout: TokenLayout) -> str:
  classes = f" + {layout.num_classes + 1} class ids" if layout.num_classes else ""
  return f"codebook_size={layout.codebook_size} + 3 special ids{classes}"


def check_sampling_fits(layout: TokenLayout, config: Any) -> None:
  """Raises ValueError for settings (a `sampler.SamplingConfig`) that do not fit the model:
  guidance on an unconditional model, a top-k above the size of its vocabulary."""
  if layout.num_classes == 0 and config.guidance_scale != 1.0:
    raise ValueError(f"sample.guidance_scale={config.guidance_scale} needs a class-conditional "
                     "model, and this one is unconditional (num_classes=0); set it to 1.0 (no "
                     "guidance)")
  vocabularies = {
      "position": (layout.fine_position_vocab_size,
                   f"{layout.num_fine_cells} fine cells + 3 special ids"),
      "content": (layout.content_vocab_size, _content_vocab_text(layout))}
  for stream, (size, parts) in vocabularies.items():
    top_k = getattr(config, f"{stream}_top_k")
    if top_k > size:
      raise ValueError(f"sample.{stream}_top_k={top_k} exceeds the {stream} vocabulary of the "
                       f"model ({size} ids: {parts}); use 0 (off) or at most {size}")


def _leaf_shape(params: Any, *keys: str) -> Optional[tuple[int, ...]]:
  node = params
  for key in keys:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return tuple(np.shape(node))


def check_checkpoint_matches_layout(params: Any, layout: TokenLayout,
                                    source: str = "the transformer params tree",
                                    block_size: Optional[int] = None) -> None:
  """Raises ValueError unless the layout-sized axes of a StackedTransformer params tree fit
  `layout`: content vocabulary (codebook, specials, classes), coarse and fine position
  vocabularies (grid cells + 3) and the sequence length (`block_size`, default max_len - 1).

  Names what the checkpoint was trained for next to what the stage-1 model and config give,
  so a stage-2 checkpoint paired with another DQ-VAE (`config.stage1.path`) is recognised.
  Widths and depths are not checked here. `source` starts the message (e.g. 'checkpoint DIR').
  """
  if isinstance(params, Mapping) and "params" in params and "content_emb" not in params:
    raise ValueError(f"{source}: pass the params tree itself, not {{'params': ...}}")
  block_size = layout.max_len - 1 if block_size is None else block_size
  grid = lambda cells, size, name: f"{cells} cells of the {size[0]}x{size[1]} {name} grid"
  expected = {
      ("content_emb", "embedding"): (
          layout.content_vocab_size, "content vocabulary", _content_vocab_text(layout)),
      ("content_coarse_pos_emb", "embedding"): (
          layout.coarse_position_vocab_size, "coarse positions",
          f"{grid(layout.num_coarse_cells, layout.coarse_size, 'coarse')} + 3 special ids"),
      ("content_fine_pos_emb", "embedding"): (
          layout.fine_position_vocab_size, "fine positions",
          f"{grid(layout.num_fine_cells, layout.fine_size, 'fine')} + 3 special ids"),
  }
  problems = []
  for keys, (size, name, parts) in expected.items():
    shape = _leaf_shape(params, *keys)
    if shape is None:
      raise ValueError(f"{source} has no {'/'.join(keys)}: not a DQ-Transformer params tree")
    if shape[0] != size:
      problems.append(f"{name}: checkpoint {shape[0]} ids, expected {size} ({parts})")
  pos_shape = _leaf_shape(params, "pos_emb")
  if pos_shape is None:
    raise ValueError(f"{source} has no pos_emb: not a DQ-Transformer params tree")
  if pos_shape[1] != block_size:
    problems.append(f"sequence length: checkpoint {pos_shape[1] + 1} tokens, expected "
                    f"{block_size + 1} (tokens.max_len={layout.max_len})")
  if problems:
    raise ValueError(
        f"{source} does not fit the token layout (trained for another one): "
        f"{'; '.join(problems)}. "
        "config.stage1.path must be the DQ-VAE the transformer was trained with (same "
        "codebook size and grids), with the same classes (config.class_conditional, data) "
        "and config.tokens.max_len")
