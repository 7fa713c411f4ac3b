"""Coarse-to-fine generation as pictures: the partial images along a packed token sequence.

A packed sequence is generated left to right, so its prefixes are exactly the sampler's
intermediate states. `prefix_states` cuts a sequence after the coarse stage (coarse EOS and
fine SOS included, no fine token) and after `fraction` of its fine tokens, for each fraction,
and returns the code map and the cells known at each cut:
- a coarse token fills its region's 2x2 block of fine cells;
- a fine token fills its one cell;
- a cell of a fine region whose token has not been generated is *unknown*. Such a region has
  no coarse code to fall back on (it is coded fine instead of coarse), so nothing is shown for
  it: `make_partial_decode_fn` feeds the decoder the **mean codebook vector** there (a neutral
  latent, so the decoded neighbours are not pulled towards an arbitrary code), and the
  pictures (`dq.summaries.strips.generation_strip` / `strip_animation`) paint the unknown
  cells neutral grey with dark diagonal hatching.
The last stage (fraction 1) is the finished sample, equal to the plain decode of its codes.

`progressive_frames` runs the whole chain for a batch: packed -> states -> decoded frames,
and `generation_strip` returns the picture. Dual grain only (the TokenLayout's grids).
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dq.summaries import images as pictures
from dq.summaries import strips
from dq.stage2 import tokens as tok
from dq.stage2.layout import TokenLayout

DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
PACKED_FIELDS = ("content", "position", "segment", "valid")


def stage_captions(fractions: Sequence[float]) -> list[str]:
  """'coarse' for fraction 0, else 'fine NN%'."""
  return ["coarse" if f == 0 else f"fine {round(100 * f)}%" for f in fractions]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
  values = np.asarray(fractions, np.float64)
  if values.ndim != 1 or values.size == 0 or values.min() < 0 or values.max() > 1:
    raise ValueError(f"fractions must be a non-empty list of values in [0, 1]; got "
                     f"{list(fractions)}")
  return values


def _as_packed(packed: Mapping[str, np.ndarray], layout: TokenLayout) -> dict:
  missing = [name for name in PACKED_FIELDS if name not in packed]
  if missing:
    raise ValueError(f"packed tokens lack fields {missing}; expected {list(PACKED_FIELDS)}")
  arrays = {name: np.asarray(packed[name]) for name in PACKED_FIELDS}
  shape = arrays["content"].shape
  if len(shape) != 2 or any(a.shape != shape for a in arrays.values()):
    raise ValueError(f"packed fields must share one [B, L] shape; got "
                     f"{ {k: v.shape for k, v in arrays.items()} }")
  # A finished sequence must hold a legal image (every region coded once).
  tok.unpack_tokens(arrays, layout)
  return arrays


def prefix_states(packed: Mapping[str, np.ndarray], layout: TokenLayout,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, np.ndarray]:
  """Code maps and known cells after the coarse stage and at fractions of the fine stage.

  Args:
    packed: content/position/segment/valid [B, L] of finished sequences (sampler output or
      `pack_tokens`); extra fields (e.g. `length`) are ignored.
    layout: their TokenLayout.
    fractions: per stage, the fraction of the image's fine tokens generated (0: coarse only;
      `round(fraction * fine tokens)` of them, in sequence order).

  Returns:
    codes int32 [B, S, hf, wf] (0 in unknown cells), known bool [B, S, hf, wf],
    prefix_length int32 [B, S] (tokens generated, specials included) and
    num_codes int32 [B, S] (code tokens generated).
  """
  values = _check_fractions(fractions)
  packed = _as_packed(packed, layout)
  content, position, segment, valid = (packed[k] for k in PACKED_FIELDS)
  batch, length = content.shape
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  is_coarse = valid & (segment == 0) & (position < nc)  # [B, L]
  is_fine = valid & (segment == 1) & (position < nf)  # [B, L]
  fine_total = is_fine.sum(axis=1)  # [B]
  # Index just past the fine SOS: the coarse stage plus both specials between the stages.
  fine_sos = valid & (segment == 1) & (position == layout.fine_pos_sos)
  coarse_end = np.argmax(fine_sos, axis=1) + 1  # [B]
  fine_rank = np.cumsum(is_fine, axis=1)  # [B, L] fine tokens up to and including t
  region_cells = tok._fine_cells_of_regions(layout)  # [nc, 4]

  codes = np.zeros((batch, values.size, nf), np.int32)
  known = np.zeros((batch, values.size, nf), bool)
  prefix = np.zeros((batch, values.size), np.int32)
  num_codes = np.zeros((batch, values.size), np.int32)
  for b in range(batch):
    coarse_t = np.flatnonzero(is_coarse[b])
    for k in range(4):
      codes[b, :, region_cells[position[b, coarse_t], k]] = content[b, coarse_t][:, None]
      known[b, :, region_cells[position[b, coarse_t], k]] = True
    for s, fraction in enumerate(values):
      generated = int(np.round(fraction * fine_total[b]))
      fine_t = np.flatnonzero(is_fine[b] & (fine_rank[b] <= generated))
      codes[b, s, position[b, fine_t]] = content[b, fine_t]
      known[b, s, position[b, fine_t]] = True
      last = fine_t[-1] + 1 if generated else coarse_end[b]
      if generated == fine_total[b]:
        last = int(valid[b].sum())  # through the fine EOS
      prefix[b, s] = last
      num_codes[b, s] = coarse_t.size + generated
  shape = (batch, values.size, *layout.fine_size)
  return {"codes": codes.reshape(shape), "known": known.reshape(shape),
          "prefix_length": prefix, "num_codes": num_codes}


@functools.partial(jax.jit, static_argnums=0)
def _decode_partial(model, variables: dict, codes: jax.Array, known: jax.Array) -> jax.Array:
  def decode(module, codes, known):
    embedding = module.quantize.embedding.value  # [K, D]
    quant = module.quantize.lookup(codes)  # [N, hf, wf, D]
    quant = jnp.where(known[..., None], quant, jnp.mean(embedding, axis=0))
    return module.decoder(module.post_quant_conv(quant), False)

  images = model.apply(variables, codes.astype(jnp.int32), known, method=decode)
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def make_partial_decode_fn(stage1) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """fn(codes int [N, hf, wf], known bool [N, hf, wf]) -> float32 [N, H, W, 3] in [-1, 1].

  Unknown cells get the mean codebook vector as latent; with every cell known this is the
  stage-1 decode. `stage1` is a `dq.tokenizer.Stage1`.
  """
  model, variables = stage1.model, stage1.variables

  def decode(codes: np.ndarray, known: np.ndarray) -> np.ndarray:
    return np.asarray(_decode_partial(model, variables, jnp.asarray(codes),
                                      jnp.asarray(known, bool)))

  return decode


def progressive_frames(packed: Mapping[str, np.ndarray], layout: TokenLayout,
                       decode_partial: Callable[[np.ndarray, np.ndarray], np.ndarray],
                       fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       max_images: Optional[int] = None) -> dict:
  """Decoded partial images of the first `max_images` sequences at every stage.

  Returns `prefix_states` plus images uint8 [B, S, H, W, 3] (raw decodes; unknown cells are
  marked when drawn) and captions (S strings).
  """
  packed = {k: np.asarray(packed[k])[:max_images] for k in PACKED_FIELDS if k in packed}
  states = prefix_states(packed, layout, fractions)
  batch, stages = states["codes"].shape[:2]
  flat = lambda a: a.reshape(batch * stages, *a.shape[2:])
  images = decode_partial(flat(states["codes"]), flat(states["known"]))  # [B*S, H, W, 3]
  images = pictures.to_uint8(images).reshape(batch, stages, *images.shape[1:])
  return {**states, "images": images, "captions": stage_captions(fractions)}


def generation_strip(packed: Mapping[str, np.ndarray], layout: TokenLayout,
                     decode_partial: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     max_images: int = 4, captions: bool = True, scale: int = 1) -> np.ndarray:
  """uint8 strip: one row per sequence (at most `max_images`), one column per stage, captions
  ('coarse', 'fine 25%', ...) on top, frames magnified `scale` times; see
  `dq.summaries.strips.generation_strip`."""
  frames = progressive_frames(packed, layout, decode_partial, fractions, max_images)
  return strips.generation_strip(frames["images"], frames["known"],
                              frames["captions"] if captions else None, scale=scale)
