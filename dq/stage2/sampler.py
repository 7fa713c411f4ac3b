"""KV-cached coarse-to-fine sampler for the StackedTransformer.

One jitted `lax.while_loop` generates a batch of packed sequences (the `pack_tokens` layout).
Each iteration feeds token t through the position stack (one cached step), picks position t + 1
under the legal-move mask, feeds the chosen position through the content stack (one cached
step) and picks content t + 1 under the content mask. Per-sample done flags turn finished
sequences into padding; the loop stops when every sample is done.

Legal moves (vectorised over the batch, `legal_positions` / `legal_contents`):
- coarse stage (after SOS or a coarse token): any unused coarse cell, or the coarse EOS (only
  while the rest still fits in `max_len`);
- after the coarse EOS: the fine SOS (forced);
- fine stage: only fine cells of regions not coded coarse, each once; the fine EOS only when
  all are covered. With `fixed_fine_positions` the next uncovered cell in `fine_order` is forced
  and only contents are sampled;
- after the fine EOS: padding;
- content: a code (never a special id) for real cells, the matching special id otherwise.

Classifier-free guidance runs the conditional and the null-class sequence as one 2B batch and
mixes logits as `u + s * (c - u)` before masking.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dq.stage2 import tokens as tok
from dq.stage2.layout import FINE_ORDERS, TokenLayout
from dq.stage2.sampler_checks import (check_checkpoint_matches_layout, check_labels,
                                      check_sampling_fits)
from dq.stage2.transformer import StackedTransformer, init_cache

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Sampling settings; temperature 0 means greedy, top_k 0 and top_p 1.0 mean off."""
  position_temperature: float = 1.0
  position_top_k: int = 0
  position_top_p: float = 1.0
  content_temperature: float = 1.0
  content_top_k: int = 0
  content_top_p: float = 1.0
  guidance_scale: float = 1.0
  fixed_fine_positions: bool = False
  fine_order: str = "row"

  def __post_init__(self):
    for stream in ("position", "content"):
      temperature = getattr(self, f"{stream}_temperature")
      top_k, top_p = getattr(self, f"{stream}_top_k"), getattr(self, f"{stream}_top_p")
      if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"sample.{stream}_temperature must be a finite value >= 0; got "
                         f"{temperature}")
      if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"sample.{stream}_top_k must be an int >= 0 (0 = off); got {top_k}")
      if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample.{stream}_top_p must lie in (0, 1] (1 = off); got {top_p}")
    if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
      raise ValueError(f"sample.guidance_scale must be a finite value >= 0 (1 = no guidance); "
                       f"got {self.guidance_scale}")
    if self.fine_order not in FINE_ORDERS:
      raise ValueError(f"sample.fine_order must be one of {FINE_ORDERS}; got "
                       f"{self.fine_order!r}")


def sampling_config_from(cfg: Any) -> SamplingConfig:
  """Reads the SamplingConfig fields present in a config section (e.g. `config.sample`)."""
  fields = {f.name: cfg[f.name] for f in dataclasses.fields(SamplingConfig) if f.name in cfg}
  return SamplingConfig(**fields)


def filter_logits(logits: jax.Array, legal: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Masks illegal ids to -inf, then applies temperature, top-k and top-p (nucleus).

  Non-finite logits never make an illegal id come out: NaN counts as -inf, +inf as the
  largest float32, and a row whose legal ids all have -inf (or NaN) logits falls back to a
  uniform choice among its legal ids.

  Args:
    logits: [B, N] float; legal: [B, N] bool with at least one True per row.
    temperature, top_k, top_p: static settings (temperature 0: keep only the argmax; top_k 0
      or >= N: off; top_p 1: off).

  Returns:
    [B, N] logits to sample from (illegal and filtered ids are -inf).
  """
  logits = logits.astype(jnp.float32)
  if temperature != 0:
    logits = logits / temperature
  logits = jnp.nan_to_num(logits, nan=NEG_INF, posinf=jnp.finfo(jnp.float32).max,
                          neginf=NEG_INF)
  logits = jnp.where(legal, logits, NEG_INF)
  no_choice = ~jnp.any(logits > NEG_INF, axis=-1, keepdims=True)  # [B, 1]
  logits = jnp.where(no_choice & legal, 0.0, logits)
  if temperature == 0:
    best = jnp.argmax(logits, axis=-1)
    return jnp.where(jnp.arange(logits.shape[-1]) == best[:, None], 0.0, NEG_INF)
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits >= kth, logits, NEG_INF)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # [B, N]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better ids
    keep_sorted = mass_before < top_p  # the best id always stays
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, NEG_INF)
  return logits


def sample_ids(rng: jax.Array, logits: jax.Array, legal: jax.Array, temperature: float,
               top_k: int, top_p: float) -> jax.Array:
  """One id per row [B] from `filter_logits` output (Gumbel-max)."""
  filtered = filter_logits(logits, legal, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def guide(logits: jax.Array, scale: float, guided: bool) -> jax.Array:
  """[2B, N] (conditional rows then null-class rows) -> [B, N] guided logits; [B, N] as is."""
  if not guided:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


@flax.struct.dataclass
class SamplerState:
  """Loop state: sequences so far, coverage bookkeeping, per-sample done flags, caches."""
  index: jax.Array        # [] int32: the last written token's index t
  content: jax.Array      # [B, L] int32
  position: jax.Array     # [B, L] int32
  segment: jax.Array      # [B, L] int32
  valid: jax.Array        # [B, L] bool
  coarse_used: jax.Array  # [B, nc] bool
  fine_used: jax.Array    # [B, nf] bool
  done: jax.Array         # [B] bool: the fine EOS has been written
  length: jax.Array       # [B] int32: tokens written up to and including the fine EOS
  cache: Any              # StackedTransformer KV caches (None for the reference sampler)


@dataclasses.dataclass(frozen=True)
class _Tables:
  """Constant index tables of a layout (numpy, turned into constants under jit)."""
  region_of_fine: np.ndarray  # [nf] coarse region of each fine cell
  fine_rank: np.ndarray       # [nf] rank of each fine cell in fine_order


def _tables(layout: TokenLayout, fine_order: str) -> _Tables:
  if fine_order not in FINE_ORDERS:
    raise ValueError(f"fine_order must be one of {FINE_ORDERS}; got {fine_order!r}")
  order = (np.arange(layout.num_fine_cells) if fine_order == "row"
           else tok._fine_cells_of_regions(layout).reshape(-1))
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  return _Tables(tok._region_of_fine_cells(layout).astype(np.int32), rank.astype(np.int32))


def legal_positions(layout: TokenLayout, state: SamplerState, fixed_fine: bool,
                    fine_order: str = "row") -> tuple[jax.Array, jax.Array]:
  """Legal next positions [B, P] (P = fine position vocab) and the next segment [B].

  Works on the token at `state.index` and the coverage so far; exactly one id is legal when
  the next token is forced (fine SOS, padding, a full grid's EOS, fixed fine positions).
  Every row has at least one legal id, whatever the state holds: ids are coarse cells or the
  coarse EOS when the next segment is 0, fine cells or a fine special id when it is 1.

  Raises:
    ValueError: `fine_order` is not one of `dq.stage2.layout.FINE_ORDERS`.
  """
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  tables = _tables(layout, fine_order)
  size = layout.fine_position_vocab_size
  ids = jnp.arange(size)[None, :]  # [1, P]
  t = state.index
  position_t = jax.lax.dynamic_index_in_dim(state.position, t, axis=1, keepdims=False)  # [B]
  segment_t = jax.lax.dynamic_index_in_dim(state.segment, t, axis=1, keepdims=False)
  coarse_eos = (segment_t == 0) & (position_t == layout.coarse_pos_eos)
  in_coarse = (segment_t == 0) & ~coarse_eos
  in_fine = (segment_t == 1) & ~state.done
  used = jnp.sum(state.coarse_used, axis=1)  # [B]

  eos_fits = 4 * nc + 4 - 3 * used <= layout.max_len  # the all-fine remainder fits
  coarse_legal = (jnp.pad(~state.coarse_used, ((0, 0), (0, size - nc)))
                  | ((ids == layout.coarse_pos_eos) & eos_fits[:, None]))
  open_cells = ~state.fine_used & ~state.coarse_used[:, tables.region_of_fine]  # [B, nf]
  if fixed_fine:
    first = jnp.argmin(jnp.where(open_cells, tables.fine_rank, nf), axis=1)  # [B]
    open_cells = open_cells & (jnp.arange(nf)[None, :] == first[:, None])
  all_covered = ~jnp.any(open_cells, axis=1)  # [B]
  fine_legal = (jnp.pad(open_cells, ((0, 0), (0, size - nf)))
                | ((ids == layout.fine_pos_eos) & all_covered[:, None]))

  legal = jnp.where(in_coarse[:, None], coarse_legal,
                    jnp.where(coarse_eos[:, None], ids == layout.fine_pos_sos,
                              jnp.where(in_fine[:, None], fine_legal, ids == layout.fine_pos_pad)))
  next_segment = jnp.where(in_coarse, 0, 1).astype(jnp.int32)
  return legal, next_segment


def legal_contents(layout: TokenLayout, next_position: jax.Array,
                   next_segment: jax.Array) -> jax.Array:
  """Legal next contents [B, V]: a code for real cells, the matching special id otherwise."""
  ids = jnp.arange(layout.content_vocab_size)[None, :]  # [1, V]
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  real = jnp.where(next_segment == 0, next_position < nc, next_position < nf)  # [B]
  eos = jnp.where(next_segment == 0, next_position == layout.coarse_pos_eos,
                  next_position == layout.fine_pos_eos)
  sos = (next_segment == 1) & (next_position == layout.fine_pos_sos)
  special = jnp.where(eos, layout.content_eos,
                      jnp.where(sos, layout.content_sos, layout.content_pad))  # [B]
  return jnp.where(real[:, None], ids < layout.codebook_size, ids == special[:, None])


def initial_state(layout: TokenLayout, labels: Optional[jax.Array], batch: int,
                  cache: Any) -> SamplerState:
  """Sequences holding only the SOS token (class SOS when `labels` is given)."""
  shape = (batch, layout.max_len)
  sos = (jnp.full((batch,), layout.content_sos, jnp.int32) if labels is None
         else labels.astype(jnp.int32) + layout.codebook_size + 3)
  content = jnp.full(shape, layout.content_pad, jnp.int32).at[:, 0].set(sos)
  position = jnp.full(shape, layout.fine_pos_pad, jnp.int32).at[:, 0].set(layout.coarse_pos_sos)
  segment = jnp.ones(shape, jnp.int32).at[:, 0].set(0)
  return SamplerState(
      index=jnp.zeros((), jnp.int32), content=content, position=position, segment=segment,
      valid=jnp.zeros(shape, bool).at[:, 0].set(True),
      coarse_used=jnp.zeros((batch, layout.num_coarse_cells), bool),
      fine_used=jnp.zeros((batch, layout.num_fine_cells), bool),
      done=jnp.zeros((batch,), bool), length=jnp.zeros((batch,), jnp.int32), cache=cache)


def write_token(layout: TokenLayout, state: SamplerState, position: jax.Array,
                segment: jax.Array, content: jax.Array, cache: Any) -> SamplerState:
  """Appends token t + 1 to every sequence and updates coverage and done flags."""
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  t = state.index + 1
  live = ~state.done  # this token is real (not padding) for these samples
  put = lambda array, value: jax.lax.dynamic_update_index_in_dim(array, value, t, axis=1)
  coarse_cell = live & (segment == 0) & (position < nc)
  fine_cell = live & (segment == 1) & (position < nf)
  finished = live & (segment == 1) & (position == layout.fine_pos_eos)
  return SamplerState(
      index=t, content=put(state.content, content), position=put(state.position, position),
      segment=put(state.segment, segment), valid=put(state.valid, live),
      coarse_used=state.coarse_used | (jax.nn.one_hot(position, nc, dtype=bool)
                                       & coarse_cell[:, None]),
      fine_used=state.fine_used | (jax.nn.one_hot(position, nf, dtype=bool) & fine_cell[:, None]),
      done=state.done | finished, length=jnp.where(finished, t + 1, state.length), cache=cache)


# Logit providers: (params, state, inputs) -> (position logits, hidden/aux, cache) and
# (params, state, aux, next_position, next_segment) -> (content logits, cache); rows are [2B]
# under guidance (conditional first), [B] otherwise.
PositionFn = Callable[[Any, SamplerState, dict], tuple[jax.Array, Any, Any]]
ContentFn = Callable[[Any, SamplerState, Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _branch_inputs(layout: TokenLayout, state: SamplerState, guided: bool) -> dict:
  """Token t of every row; the null-class rows differ only in their SOS content."""
  take = lambda a: jax.lax.dynamic_index_in_dim(a, state.index, axis=1, keepdims=False)
  content, position, segment = take(state.content), take(state.position), take(state.segment)
  if guided:
    null = jnp.where(state.index == 0, layout.null_class_sos, content)
    content = jnp.concatenate([content, null])
    position, segment = jnp.tile(position, 2), jnp.tile(segment, 2)
  return {"content": content, "position": position, "segment": segment}


def sampling_step(layout: TokenLayout, config: SamplingConfig, guided: bool,
                  position_fn: PositionFn, content_fn: ContentFn, params: Any,
                  rng: jax.Array, state: SamplerState) -> SamplerState:
  """One loop iteration: token t -> position t + 1 -> content t + 1."""
  step_rng = jax.random.fold_in(rng, state.index)
  position_rng, content_rng = jax.random.split(step_rng)
  inputs = _branch_inputs(layout, state, guided)
  position_logits, aux, cache = position_fn(params, state, inputs)
  legal, next_segment = legal_positions(layout, state, config.fixed_fine_positions,
                                        config.fine_order)
  next_position = sample_ids(position_rng, guide(position_logits, config.guidance_scale, guided),
                             legal, config.position_temperature, config.position_top_k,
                             config.position_top_p)
  branch = lambda x: jnp.tile(x, 2) if guided else x
  content_logits, cache = content_fn(params, state, aux, branch(next_position),
                                     branch(next_segment), cache)
  next_content = sample_ids(content_rng, guide(content_logits, config.guidance_scale, guided),
                            legal_contents(layout, next_position, next_segment),
                            config.content_temperature, config.content_top_k,
                            config.content_top_p)
  return write_token(layout, state, next_position, next_segment, next_content, cache)


def run_sampling(layout: TokenLayout, config: SamplingConfig, position_fn: PositionFn,
                 content_fn: ContentFn, params: Any, rng: jax.Array,
                 labels: Optional[jax.Array], batch: int, cache: Any,
                 loop: str = "while") -> dict[str, jax.Array]:
  """Runs `sampling_step` until every sample is done (or `max_len` is reached).

  `loop='while'` uses `lax.while_loop` (jittable); `'python'` a Python loop (reference).
  Returns the packed sequences (content, position, segment, valid [B, L]) and length [B].
  """
  guided = labels is not None and config.guidance_scale != 1.0
  state = initial_state(layout, labels, batch, cache)
  step = lambda s: sampling_step(layout, config, guided, position_fn, content_fn, params, rng, s)
  more = lambda s: (s.index < layout.max_len - 1) & ~jnp.all(s.done)
  if loop == "while":
    state = jax.lax.while_loop(more, step, state)
  else:
    while bool(more(state)):
      state = step(state)
  return {"content": state.content, "position": state.position, "segment": state.segment,
          "valid": state.valid, "length": state.length}


def make_sampler(model: StackedTransformer, layout: TokenLayout,
                 config: SamplingConfig = SamplingConfig()) -> Callable[..., dict[str, jax.Array]]:
  """KV-cached sampler: `sampler(params, rng, labels_or_batch_size)` -> packed dict + length.

  `labels_or_batch_size`: int32 labels [B] for a class-conditional layout, an int B >= 1 for
  an unconditional one. `params` is the model's params tree (not {'params': ...}).

  Raises:
    ValueError: the model was built for another layout, the settings do not fit it
      (`check_sampling_fits`); when called: labels (`check_labels`), batch size or params
      (`check_checkpoint_matches_layout`) do not fit.
  """
  if model.block_size < layout.max_len - 1:
    raise ValueError(f"model block_size={model.block_size} < max_len - 1 = "
                     f"{layout.max_len - 1} of the token layout")
  sizes = {"vocab_size": layout.content_vocab_size,
           "coarse_position_size": layout.coarse_position_vocab_size,
           "fine_position_size": layout.fine_position_vocab_size}
  for field, size in sizes.items():
    if getattr(model, field) != size:
      raise ValueError(f"model {field}={getattr(model, field)} but the token layout needs "
                       f"{size}; build the model with build_transformer(config, layout)")
  check_sampling_fits(layout, config)

  def position_fn(params, state, inputs):
    hidden, logits, cache = model.apply(
        {"params": params}, inputs["content"], inputs["position"], inputs["segment"],
        state.index, state.cache["position"], method="position_step")
    return logits, hidden, {**state.cache, "position": cache}

  def content_fn(params, state, hidden, next_position, next_segment, cache):
    logits, content_cache = model.apply({"params": params}, hidden, next_position, next_segment,
                                        state.index, cache["content"], method="content_step")
    return logits, {**cache, "content": content_cache}

  @jax.jit
  def run(params, rng, labels):
    batch = labels.shape[0]
    conditional = layout.num_classes > 0
    guided = conditional and config.guidance_scale != 1.0
    cache = init_cache(model, 2 * batch if guided else batch, layout.max_len - 1)
    return run_sampling(layout, config, position_fn, content_fn, params, rng,
                        labels if conditional else None, batch, cache)

  def sampler(params, rng, labels_or_batch_size):
    check_checkpoint_matches_layout(params, layout, block_size=model.block_size)
    if isinstance(labels_or_batch_size, (int, np.integer)):
      check_labels(layout, None)
      if labels_or_batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {labels_or_batch_size}")
      return run(params, rng, jnp.zeros((int(labels_or_batch_size),), jnp.int32))
    try:
      labels = np.asarray(labels_or_batch_size)
    except jax.errors.TracerArrayConversionError:
      labels = None  # traced inside an outer jit: checked by the caller
    if labels is not None:
      check_labels(layout, labels)
    return run(params, rng, jnp.asarray(labels_or_batch_size, jnp.int32))

  return sampler
