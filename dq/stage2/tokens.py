"""Coarse-to-fine token sequences for the dual-grain DQ-Transformer.

One image becomes one left-packed sequence of static length `max_len`:

  [SOS] coarse tokens... [EOS] [SOS_f] fine tokens... [EOS] [PAD]...

Every token has a content id, a position id and a segment (0 coarse, 1 fine):

  token          content                 position           segment
  SOS            content_sos / class     coarse_pos_sos     0
  coarse token   code of the region      r * wc + c         0
  coarse EOS     content_eos             coarse_pos_eos     0
  SOS_f          content_sos             fine_pos_sos       1
  fine token     code of the cell        r * wf + c         1
  fine EOS       content_eos             fine_pos_eos       1
  PAD            content_pad             fine_pos_pad       1   (valid False)

Coarse tokens follow the coarse regions in row-major order and carry the top-left code of
their 2x2 block. Fine tokens cover every cell of every fine region, either row-first over the
fine grid (`fine_order='row'`, the official default) or region by region (`'region'`: regions
row-major, then the 4 cells of each block row-major).

Special ids (K = codebook size, as in the official release: 64/65/66 for K=64):
  content:  pad K, eos K+1, sos K+2; class SOS K+3+label for label in [0, num_classes),
            null class (classifier-free guidance) K+3+num_classes.
  coarse position: pad hc*wc, eos hc*wc+1, sos hc*wc+2.
  fine position:   pad hf*wf, eos hf*wf+1, sos hf*wf+2.

`pack_tokens` / `unpack_tokens` run in numpy on the host and validate their input;
`pack_tokens_jax` / `unpack_tokens_jax` are the same computation in jnp (jittable, layout and
fine_order static) without validation. Dual grain only (fine grid = 2x coarse grid).
The layout itself (`TokenLayout`, sizes and special ids) is `dq.stage2.layout`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dq.stage2.layout import FINE_ORDERS, TokenLayout

_SPECIAL, _COARSE, _FINE = 0, 1, 2


def _fine_cells_of_regions(layout: TokenLayout) -> np.ndarray:
  """Flat fine-cell indices of each coarse region's 2x2 block, row-major: [hc*wc, 4]."""
  hc, wc = layout.coarse_size
  wf = layout.fine_size[1]
  rows, cols = np.divmod(np.arange(hc * wc), wc)
  offsets = np.array([0, 1, wf, wf + 1])
  return (2 * rows * wf + 2 * cols)[:, None] + offsets[None, :]


def _region_of_fine_cells(layout: TokenLayout) -> np.ndarray:
  """Coarse region index of each flat fine cell: [hf*wf]."""
  hf, wf = layout.fine_size
  rows, cols = np.divmod(np.arange(hf * wf), wf)
  return (rows // 2) * layout.coarse_size[1] + cols // 2


@functools.lru_cache(maxsize=64)
def _candidates(layout: TokenLayout, fine_order: str) -> dict[str, np.ndarray]:
  """Every token an image could emit, in sequence order; pack keeps those that apply.

  Fields, each [hc*wc + hf*wf + 4]: kind (special/coarse/fine), code_index (flat fine cell
  whose code is the content), region (coarse region deciding inclusion), content (specials),
  position, segment.
  """
  if fine_order not in FINE_ORDERS:
    raise ValueError(f"fine_order must be one of {FINE_ORDERS}; got {fine_order!r}")
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  fine_cells = (np.arange(nf) if fine_order == "row"
                else _fine_cells_of_regions(layout).reshape(-1))
  coarse_cells = np.arange(nc)

  def special(content: int, position: int, segment: int) -> list[np.ndarray]:
    return [np.array([v]) for v in (_SPECIAL, 0, 0, content, position, segment)]

  parts = [
      special(layout.content_sos, layout.coarse_pos_sos, 0),
      [np.full(nc, _COARSE), _fine_cells_of_regions(layout)[:, 0], coarse_cells,
       np.zeros(nc), coarse_cells, np.zeros(nc)],
      special(layout.content_eos, layout.coarse_pos_eos, 0),
      special(layout.content_sos, layout.fine_pos_sos, 1),
      [np.full(nf, _FINE), fine_cells, _region_of_fine_cells(layout)[fine_cells],
       np.zeros(nf), fine_cells, np.ones(nf)],
      special(layout.content_eos, layout.fine_pos_eos, 1),
  ]
  names = ("kind", "code_index", "region", "content", "position", "segment")
  return {name: np.concatenate([p[i] for p in parts]).astype(np.int32)
          for i, name in enumerate(names)}


def _scatter(xp: Any, target: Any, rows: Any, cols: Any, values: Any) -> Any:
  """target[rows, cols] = values for numpy or jnp arrays (last write wins)."""
  if xp is np:
    target = target.copy()
    target[rows, cols] = values
    return target
  return target.at[rows, cols].set(values)


def _pack(xp: Any, codes_flat: Any, grain_flat: Any, sos_content: Any, layout: TokenLayout,
          fine_order: str) -> tuple[dict[str, Any], Any]:
  """Shared numpy/jnp packing; returns the packed dict and per-image lengths [B]."""
  table = _candidates(layout, fine_order)
  batch, max_len = codes_flat.shape[0], layout.max_len
  kind = table["kind"][None, :]  # [1, N]
  grain_at = grain_flat[:, table["region"]]  # [B, N]
  include = ((kind == _SPECIAL) | ((kind == _COARSE) & (grain_at == 0))
             | ((kind == _FINE) & (grain_at == 1)))  # [B, N]
  content = xp.where(kind == _SPECIAL, table["content"][None, :],
                     codes_flat[:, table["code_index"]])  # [B, N]
  content = xp.where(np.arange(kind.shape[1])[None, :] == 0, sos_content[:, None], content)
  lengths = xp.sum(include, axis=1)  # [B]
  dest = xp.where(include, xp.cumsum(include, axis=1) - 1, max_len)
  dest = xp.minimum(dest, max_len)  # overflow and dropped tokens land in a spare column
  rows = xp.broadcast_to(xp.arange(batch)[:, None], dest.shape)

  def fill(value: int, values: Any, dtype: Any) -> Any:
    out = xp.full((batch, max_len + 1), value, dtype=dtype)
    return _scatter(xp, out, rows, dest, values)[:, :max_len]

  segment = xp.broadcast_to(table["segment"][None, :], dest.shape)
  position = xp.broadcast_to(table["position"][None, :], dest.shape)
  packed = {
      "content": fill(layout.content_pad, content.astype(xp.int32), xp.int32),
      "position": fill(layout.fine_pos_pad, position, xp.int32),
      "segment": fill(1, segment, xp.int32),
      "valid": fill(False, xp.ones(dest.shape, dtype=bool), bool),
  }
  return packed, lengths


def _sos_content(layout: TokenLayout, labels: Any, batch: int, xp: Any) -> Any:
  """SOS content id per image [B]: class SOS when the layout is class-conditional."""
  if labels is None:
    return xp.full((batch,), layout.content_sos, dtype=xp.int32)
  return (xp.asarray(labels) + layout.codebook_size + 3).astype(xp.int32)


def _check_int_array(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array; got dtype {array.dtype}")
  if array.shape != shape:
    raise ValueError(f"{name} has shape {array.shape}; expected {shape}")


def _check_pack_inputs(codes: np.ndarray, grain: np.ndarray, layout: TokenLayout,
                       labels: Optional[np.ndarray]) -> None:
  """Raises ValueError naming the first problem in pack_tokens inputs."""
  if codes.ndim != 3:
    raise ValueError(f"codes must be [B, hf, wf]; got shape {codes.shape}")
  batch = codes.shape[0]
  hf, wf = layout.fine_size
  hc, wc = layout.coarse_size
  _check_int_array("codes", codes, (batch, hf, wf))
  _check_int_array("grain", grain, (batch, hc, wc))
  if codes.size and (codes.min() < 0 or codes.max() >= layout.codebook_size):
    raise ValueError(f"codes must lie in [0, {layout.codebook_size}); got range "
                     f"[{codes.min()}, {codes.max()}]")
  if not np.isin(grain, (0, 1)).all():
    raise ValueError(f"grain must hold 0 (coarse) or 1 (fine); got values {np.unique(grain)}")
  blocks = codes.reshape(batch, hc, 2, wc, 2)
  constant = np.all(blocks == blocks[:, :, :1, :, :1], axis=(2, 4))  # [B, hc, wc]
  bad = np.argwhere(~constant & (grain == 0))
  if bad.size:
    b, r, c = bad[0]
    raise ValueError(f"codes of coarse region (image {b}, row {r}, col {c}) are not constant "
                     f"over its 2x2 block: {blocks[b, r, :, c, :].tolist()}")
  if layout.num_classes == 0:
    if labels is not None:
      raise ValueError("labels given but TokenLayout.num_classes == 0 (unconditional layout)")
    return
  if labels is None:
    raise ValueError(f"TokenLayout has num_classes={layout.num_classes}: pass labels "
                     f"(use {layout.num_classes} for the null class)")
  _check_int_array("labels", labels, (batch,))
  if labels.size and (labels.min() < 0 or labels.max() > layout.num_classes):
    raise ValueError(f"labels must lie in [0, {layout.num_classes}] ({layout.num_classes} = "
                     f"null class); got range [{labels.min()}, {labels.max()}]")


def pack_tokens(codes: np.ndarray, grain: np.ndarray, layout: TokenLayout,
                labels: Optional[np.ndarray] = None,
                fine_order: str = "row") -> dict[str, np.ndarray]:
  """Packs code maps into static-shape token sequences (numpy, validated).

  Args:
    codes: [B, hf, wf] code indices, constant over each coarse region's 2x2 block.
    grain: [B, hc, wc] 0 (coarse) / 1 (fine) per region.
    layout: the TokenLayout.
    labels: [B] class labels for a class-conditional layout (num_classes = null class).
    fine_order: 'row' (row-first over the fine grid) or 'region'.

  Returns:
    content, position, segment (int32) and valid (bool), each [B, max_len].
  """
  codes, grain = np.asarray(codes), np.asarray(grain)
  labels = None if labels is None else np.asarray(labels)
  _check_pack_inputs(codes, grain, layout, labels)
  batch = codes.shape[0]
  packed, lengths = _pack(np, codes.reshape(batch, -1).astype(np.int32),
                          grain.reshape(batch, -1).astype(np.int32),
                          _sos_content(layout, labels, batch, np), layout, fine_order)
  too_long = np.flatnonzero(lengths > layout.max_len)
  if too_long.size:
    b = too_long[0]
    raise ValueError(f"image {b} needs {lengths[b]} tokens but TokenLayout.max_len is "
                     f"{layout.max_len}")
  return packed


@functools.partial(jax.jit, static_argnames=("layout", "fine_order"))
def pack_tokens_jax(codes: jax.Array, grain: jax.Array, layout: TokenLayout,
                    labels: Optional[jax.Array] = None,
                    fine_order: str = "row") -> dict[str, jax.Array]:
  """jnp version of `pack_tokens` without validation; tokens past max_len are dropped."""
  batch = codes.shape[0]
  packed, _ = _pack(jnp, codes.reshape(batch, -1).astype(jnp.int32),
                    grain.reshape(batch, -1).astype(jnp.int32),
                    _sos_content(layout, labels, batch, jnp), layout, fine_order)
  return packed


def _unpack(xp: Any, packed: dict[str, Any], layout: TokenLayout) -> tuple[Any, Any, Any, Any]:
  """Shared numpy/jnp unpacking: flat codes [B, nf], grain [B, nc] and the token masks."""
  content, position = packed["content"], packed["position"]
  segment, valid = packed["segment"], packed["valid"]
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  batch = content.shape[0]
  is_coarse = valid & (segment == 0) & (position < nc)  # [B, L]
  is_fine = valid & (segment == 1) & (position < nf)  # [B, L]
  rows = xp.broadcast_to(xp.arange(batch)[:, None], content.shape)
  region_cells = xp.asarray(_fine_cells_of_regions(layout))  # [nc, 4]
  block_cells = region_cells[xp.clip(position, 0, nc - 1)]  # [B, L, 4]
  codes = xp.zeros((batch, nf + 1), dtype=xp.int32)
  for k in range(4):
    codes = _scatter(xp, codes, rows, xp.where(is_coarse, block_cells[..., k], nf), content)
  codes = _scatter(xp, codes, rows, xp.where(is_fine, position, nf), content)
  cell_regions = xp.asarray(_region_of_fine_cells(layout))  # [nf]
  fine_region = cell_regions[xp.clip(position, 0, nf - 1)]  # [B, L]
  grain = xp.zeros((batch, nc + 1), dtype=xp.int32)
  grain = _scatter(xp, grain, rows, xp.where(is_fine, fine_region, nc), 1)
  return codes[:, :nf], grain[:, :nc], is_coarse, is_fine


def _check_unpacked(packed: dict[str, np.ndarray], layout: TokenLayout, is_coarse: np.ndarray,
                    is_fine: np.ndarray) -> None:
  """Raises ValueError unless every region is coded exactly once (coarse, or all 4 cells)."""
  content, position = packed["content"], packed["position"]
  real = is_coarse | is_fine
  if np.any(real & ((content < 0) | (content >= layout.codebook_size))):
    b, t = np.argwhere(real & ((content < 0) | (content >= layout.codebook_size)))[0]
    raise ValueError(f"token {t} of image {b} has content {content[b, t]}, not a code in "
                     f"[0, {layout.codebook_size})")
  batch, nc, nf = content.shape[0], layout.num_coarse_cells, layout.num_fine_cells
  rows = np.broadcast_to(np.arange(batch)[:, None], content.shape)
  coarse_count = np.zeros((batch, nc), dtype=np.int64)
  np.add.at(coarse_count, (rows[is_coarse], position[is_coarse]), 1)
  cell_count = np.zeros((batch, nf), dtype=np.int64)
  np.add.at(cell_count, (rows[is_fine], position[is_fine]), 1)
  if cell_count.max(initial=0) > 1:
    b, cell = np.argwhere(cell_count > 1)[0]
    raise ValueError(f"fine cell {cell} of image {b} is coded {cell_count[b, cell]} times")
  fine_count = cell_count[:, _fine_cells_of_regions(layout)].sum(axis=2)  # [B, nc]
  ok = ((coarse_count == 1) & (fine_count == 0)) | ((coarse_count == 0) & (fine_count == 4))
  if not ok.all():
    b, region = np.argwhere(~ok)[0]
    raise ValueError(f"region {region} of image {b} has {coarse_count[b, region]} coarse and "
                     f"{fine_count[b, region]} fine tokens; expected 1 coarse or 4 fine")


def unpack_tokens(packed: dict[str, np.ndarray],
                  layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
  """Inverts `pack_tokens` (either fine order): codes [B, hf, wf], grain [B, hc, wc] int32."""
  missing = {"content", "position", "segment", "valid"} - set(packed)
  if missing:
    raise ValueError(f"packed tokens lack fields {sorted(missing)}")
  packed = {name: np.asarray(value) for name, value in packed.items()}
  shapes = {name: packed[name].shape for name in ("content", "position", "segment", "valid")}
  shape = shapes["content"]
  if len(shape) != 2 or any(s != shape for s in shapes.values()):
    raise ValueError(f"packed fields must share one [B, L] shape; got {shapes}")
  codes, grain, is_coarse, is_fine = _unpack(np, packed, layout)
  _check_unpacked(packed, layout, is_coarse, is_fine)
  batch = shape[0]
  return codes.reshape(batch, *layout.fine_size), grain.reshape(batch, *layout.coarse_size)


@functools.partial(jax.jit, static_argnames=("layout",))
def unpack_tokens_jax(packed: dict[str, jax.Array],
                      layout: TokenLayout) -> tuple[jax.Array, jax.Array]:
  """jnp version of `unpack_tokens` without validation (regions with no fine token: grain 0)."""
  codes, grain, _, _ = _unpack(jnp, packed, layout)
  batch = codes.shape[0]
  return codes.reshape(batch, *layout.fine_size), grain.reshape(batch, *layout.coarse_size)


def official_permuter_order(codes: np.ndarray, grain: np.ndarray, layout: TokenLayout,
                            fine_order: str = "row") -> dict[str, np.ndarray]:
  """The official `DualGrainSeperatePermuter` output: per-grain lists ending with eos.

  Returns coarse_content/coarse_position/coarse_segment [B, Lc] and fine_content/
  fine_position/fine_segment [B, Lf], right-padded (content pad, position pad) to the batch
  maximum; segments are 0 / 1 everywhere, pads included.
  """
  packed = pack_tokens(codes, grain, layout, fine_order=fine_order)
  valid, segment, position = packed["valid"], packed["segment"], packed["position"]
  out = {}
  for name, seg, sos, pos_pad in (("coarse", 0, layout.coarse_pos_sos, layout.coarse_pos_pad),
                                  ("fine", 1, layout.fine_pos_sos, layout.fine_pos_pad)):
    keep = valid & (segment == seg) & (position != sos)  # [B, L]
    width = int(keep.sum(axis=1).max())
    content = np.full((len(keep), width), layout.content_pad, dtype=np.int32)
    positions = np.full((len(keep), width), pos_pad, dtype=np.int32)
    for b, mask in enumerate(keep):
      content[b, :mask.sum()] = packed["content"][b, mask]
      positions[b, :mask.sum()] = position[b, mask]
    out[f"{name}_content"] = content
    out[f"{name}_position"] = positions
    out[f"{name}_segment"] = np.full((len(keep), width), seg, dtype=np.int32)
  return out
