"""Property tests: arbitrary token arrays, sampler states and sampler settings never crash
undocumentedly and never index out of range; the legal-move masks follow their rules exactly."""
import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dq.stage2 import sampler as smp
from dq.stage2.layout import FINE_ORDERS, TokenLayout
from dq.stage2.tokens import (_fine_cells_of_regions, _region_of_fine_cells, unpack_tokens,
                              unpack_tokens_jax)
from test_sampler import _check_legal, _params

LAYOUT = TokenLayout(coarse_size=2, fine_size=4, codebook_size=5, num_classes=2)


@st.composite
def token_arrays(draw):
  batch = draw(st.integers(1, 3))
  length = draw(st.integers(1, LAYOUT.max_len + 3))
  ints = lambda lo, hi: draw(st.lists(st.integers(lo, hi), min_size=batch * length,
                                      max_size=batch * length))
  shape = (batch, length)
  return {"content": np.array(ints(-3, 20), np.int32).reshape(shape),
          "position": np.array(ints(-3, 25), np.int32).reshape(shape),
          "segment": np.array(ints(-1, 2), np.int32).reshape(shape),
          "valid": np.array(draw(st.lists(st.booleans(), min_size=batch * length,
                                          max_size=batch * length))).reshape(shape)}


@settings(max_examples=150, deadline=None)
@given(token_arrays())
def test_unpack_arbitrary_tokens_returns_in_range_or_raises_value_error(packed):
  try:
    codes, grain = unpack_tokens(packed, LAYOUT)
  except ValueError:
    pass  # the documented error for sequences that do not code every region once
  else:
    assert codes.shape == (len(packed["content"]),) + LAYOUT.fine_size
    assert codes.min() >= 0 and codes.max() < LAYOUT.codebook_size
    assert set(np.unique(grain)) <= {0, 1}
  codes, grain = unpack_tokens_jax({k: jax.numpy.asarray(v) for k, v in packed.items()}, LAYOUT)
  assert codes.shape == (len(packed["content"]),) + LAYOUT.fine_size
  assert set(np.unique(np.asarray(grain))) <= {0, 1}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]), top_k=st.integers(0, 12),
       top_p=st.floats(0.05, 1.0), guidance=st.sampled_from([0.0, 1.0, 2.5]),
       fixed=st.booleans(), order=st.sampled_from(["row", "region"]),
       extra=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_random_sampler_settings_always_give_legal_sequences(temperature, top_k, top_p, guidance,
                                                             fixed, order, extra, seed):
  layout = dataclasses.replace(LAYOUT, max_len=LAYOUT.num_coarse_cells + 4 + extra)
  model, params = _params(layout, seed=1)
  config = smp.SamplingConfig(position_temperature=temperature, content_temperature=1.0,
                              position_top_k=top_k, content_top_p=top_p,
                              guidance_scale=guidance, fixed_fine_positions=fixed,
                              fine_order=order)
  out = smp.make_sampler(model, layout, config)(params, jax.random.PRNGKey(seed),
                                                np.array([0, 1, 2], np.int32))
  _check_legal(layout, out)


# Legal-move masks on random partial sequences and arbitrary sampler states.
MASK_LAYOUTS = (
    TokenLayout(coarse_size=1, fine_size=2, codebook_size=1),
    TokenLayout(coarse_size=(1, 2), fine_size=(2, 4), codebook_size=3, num_classes=2),
    dataclasses.replace(LAYOUT, max_len=LAYOUT.num_coarse_cells + 4 + 3 * 2),  # <= 2 fine
)
MASK_BATCH = 4
_legal_positions = jax.jit(smp.legal_positions, static_argnums=(0, 2, 3))
_legal_contents = jax.jit(smp.legal_contents, static_argnums=0)
_write_token = jax.jit(smp.write_token, static_argnums=0)
_SETTINGS = dict(temperature=st.sampled_from([0.0, 0.7, 1.0, 2.5]),
                 top_k=st.sampled_from([0, 1, 2, 3, 7, 1000]), top_p=st.floats(0.01, 1.0))


def _expected_positions(layout: TokenLayout, state: smp.SamplerState, fixed: bool,
                        fine_order: str) -> list[set[int]]:
  """The legal next positions of each row, per the rules in the sampler's docstring."""
  nc, nf = layout.num_coarse_cells, layout.num_fine_cells
  order = (np.arange(nf) if fine_order == "row" else _fine_cells_of_regions(layout).reshape(-1))
  region = _region_of_fine_cells(layout)
  t = int(state.index)
  position, segment = np.asarray(state.position)[:, t], np.asarray(state.segment)[:, t]
  coarse_used, fine_used = np.asarray(state.coarse_used), np.asarray(state.fine_used)
  expected = []
  for b, done in enumerate(np.asarray(state.done)):
    if segment[b] == 0 and position[b] == layout.coarse_pos_eos:
      expected.append({layout.fine_pos_sos})
    elif segment[b] == 0:
      ids = set(np.flatnonzero(~coarse_used[b]).tolist())
      if layout.sequence_length(nc - int(coarse_used[b].sum())) <= layout.max_len:
        ids.add(layout.coarse_pos_eos)
      expected.append(ids)
    elif segment[b] == 1 and not done:
      open_cells = [c for c in order if not fine_used[b, c] and not coarse_used[b, region[c]]]
      if fixed:
        open_cells = open_cells[:1]
      expected.append(set(open_cells) if open_cells else {layout.fine_pos_eos})
    else:
      expected.append({layout.fine_pos_pad})
  return expected


def _check_position_mask(layout: TokenLayout, state: smp.SamplerState, legal, next_segment,
                         fixed: bool, fine_order: str) -> None:
  legal, next_segment = np.asarray(legal), np.asarray(next_segment)
  assert legal.shape == (MASK_BATCH, layout.fine_position_vocab_size) and legal.dtype == bool
  assert next_segment.shape == (MASK_BATCH,) and next_segment.dtype == np.int32
  assert set(next_segment.tolist()) <= {0, 1}
  assert legal.any(axis=1).all(), "a row without a legal position"
  expected = _expected_positions(layout, state, fixed, fine_order)
  for b in range(MASK_BATCH):
    ids = set(np.flatnonzero(legal[b]).tolist())
    if next_segment[b] == 0:  # coarse cells or the coarse EOS: inside the coarse vocabulary
      assert ids <= set(range(layout.num_coarse_cells)) | {layout.coarse_pos_eos}
      assert max(ids) < layout.coarse_position_vocab_size
    else:
      assert ids <= set(range(layout.num_fine_cells)) | {
          layout.fine_pos_eos, layout.fine_pos_sos, layout.fine_pos_pad}
    assert ids == expected[b], (b, ids, expected[b])


def _check_content_mask(layout: TokenLayout, legal, position, segment) -> None:
  legal, position, segment = np.asarray(legal), np.asarray(position), np.asarray(segment)
  assert legal.shape == (len(position), layout.content_vocab_size) and legal.dtype == bool
  for b in range(len(position)):
    ids = set(np.flatnonzero(legal[b]).tolist())
    cells = layout.num_coarse_cells if segment[b] == 0 else layout.num_fine_cells
    if position[b] < cells:  # a real cell: any code, never a special or class id
      assert ids == set(range(layout.codebook_size))
    elif position[b] == (layout.coarse_pos_eos if segment[b] == 0 else layout.fine_pos_eos):
      assert ids == {layout.content_eos}
    elif segment[b] == 1 and position[b] == layout.fine_pos_sos:
      assert ids == {layout.content_sos}
    else:
      assert ids == {layout.content_pad}


def _random_logits(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """Logits with random scales and some -inf, NaN and +inf entries (whole rows at times)."""
  logits = rng.normal(size=shape) * rng.choice([0.1, 1.0, 30.0])
  for value in (-np.inf, np.nan, np.inf):
    logits[rng.random(shape) < rng.choice([0.0, 0.2, 0.9])] = value
    logits[rng.random(shape[0]) < 0.1] = value
  return logits.astype(np.float32)


def _sample_and_check(rng: np.random.Generator, legal, temperature: float, top_k: int,
                      top_p: float) -> jax.Array:
  """Samples one id per row from random logits under `legal`; asserts the id is legal and,
  when some legal id has a usable logit (not -inf or NaN), that the id has one too."""
  legal = np.asarray(legal)
  logits = _random_logits(rng, legal.shape)
  ids = smp.sample_ids(jax.random.PRNGKey(int(rng.integers(2**31))), jax.numpy.asarray(logits),
                       jax.numpy.asarray(legal), temperature, top_k, top_p)
  ids = np.asarray(ids)
  assert ids.shape == (len(legal),) and ids.dtype == np.int32
  rows = np.arange(len(legal))
  assert legal[rows, ids].all(), "sampled an illegal id"
  usable = legal & (logits > -np.inf)  # NaN compares False
  chosen = logits[rows, ids]
  assert not np.any(usable.any(axis=1) & ~(chosen > -np.inf)), "sampled an unusable logit"
  return jax.numpy.asarray(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), layout=st.sampled_from(MASK_LAYOUTS), fixed=st.booleans(),
       fine_order=st.sampled_from(FINE_ORDERS), illegal_rate=st.sampled_from([0.0, 0.2, 1.0]),
       seed=st.integers(0, 2**32 - 1), **_SETTINGS)
def test_legal_move_masks_on_random_partial_sequences(data, layout, fixed, fine_order,
                                                      illegal_rate, seed, temperature, top_k,
                                                      top_p):
  """Random walks: each step takes the sampled legal move, or (at `illegal_rate`) random
  out-of-rule token ids; the masks must stay exact, in range and never empty."""
  rng = np.random.default_rng(seed)
  labels = (None if layout.num_classes == 0 else
            jax.numpy.asarray(rng.integers(0, layout.num_classes + 1, MASK_BATCH), jax.numpy.int32))
  state = smp.initial_state(layout, labels, MASK_BATCH, None)
  steps = data.draw(st.integers(0, layout.max_len - 1), label="steps")
  for _ in range(steps):
    legal, next_segment = _legal_positions(layout, state, fixed, fine_order)
    _check_position_mask(layout, state, legal, next_segment, fixed, fine_order)
    position = _sample_and_check(rng, legal, temperature, top_k, top_p)
    content_legal = _legal_contents(layout, position, next_segment)
    _check_content_mask(layout, content_legal, position, next_segment)
    content = _sample_and_check(rng, content_legal, temperature, top_k, top_p)
    if rng.random() < illegal_rate:
      position = rng.integers(-2, layout.fine_position_vocab_size + 3, MASK_BATCH)
      next_segment = rng.integers(-1, 3, MASK_BATCH)
      content = rng.integers(-2, layout.content_vocab_size + 3, MASK_BATCH)
    to_int32 = lambda x: jax.numpy.asarray(x, jax.numpy.int32)
    state = _write_token(layout, state, to_int32(position), to_int32(next_segment),
                         to_int32(content), None)
  legal, next_segment = _legal_positions(layout, state, fixed, fine_order)
  _check_position_mask(layout, state, legal, next_segment, fixed, fine_order)


def _int32_values(rng: np.random.Generator, shape: tuple[int, ...], near: int) -> np.ndarray:
  """int32 values: half near the layout's ids [-3, near + 3], half anywhere in int32."""
  info = np.iinfo(np.int32)
  small = rng.integers(-3, near + 4, shape)
  anywhere = rng.integers(info.min, info.max, shape, endpoint=True)
  return np.where(rng.random(shape) < 0.5, small, anywhere).astype(np.int32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(MASK_LAYOUTS), fixed=st.booleans(),
       fine_order=st.sampled_from(FINE_ORDERS), seed=st.integers(0, 2**32 - 1), **_SETTINGS)
def test_legal_move_masks_on_arbitrary_states(layout, fixed, fine_order, seed, temperature,
                                              top_k, top_p):
  """SamplerState arrays filled with any int32 / bool values: masks exact, in range, never
  empty; legal_contents of any int32 (position, segment) in range with exactly the rule's ids."""
  rng = np.random.default_rng(seed)
  shape, near = (MASK_BATCH, layout.max_len), layout.fine_position_vocab_size
  bools = lambda *s: jax.numpy.asarray(rng.random(s) < rng.random())
  state = smp.SamplerState(
      index=jax.numpy.asarray(rng.integers(0, layout.max_len), jax.numpy.int32),
      content=jax.numpy.asarray(_int32_values(rng, shape, layout.content_vocab_size)),
      position=jax.numpy.asarray(_int32_values(rng, shape, near)),
      segment=jax.numpy.asarray(np.where(rng.random(shape) < 0.8, rng.integers(0, 2, shape),
                                         _int32_values(rng, shape, 2)).astype(np.int32)),
      valid=bools(*shape), coarse_used=bools(MASK_BATCH, layout.num_coarse_cells),
      fine_used=bools(MASK_BATCH, layout.num_fine_cells), done=bools(MASK_BATCH),
      length=jax.numpy.asarray(_int32_values(rng, (MASK_BATCH,), layout.max_len)), cache=None)
  legal, next_segment = _legal_positions(layout, state, fixed, fine_order)
  _check_position_mask(layout, state, legal, next_segment, fixed, fine_order)
  _sample_and_check(rng, legal, temperature, top_k, top_p)
  position = jax.numpy.asarray(_int32_values(rng, (MASK_BATCH,), near))
  segment = jax.numpy.asarray(_int32_values(rng, (MASK_BATCH,), 2))
  content_legal = _legal_contents(layout, position, segment)
  assert np.asarray(content_legal).any(axis=1).all()
  _check_content_mask(layout, content_legal, position, segment)
  _sample_and_check(rng, content_legal, temperature, top_k, top_p)


def test_unknown_fine_order_is_the_documented_value_error():
  state = smp.initial_state(LAYOUT, None, 2, None)
  with pytest.raises(ValueError, match=r"fine_order must be one of \('row', 'region'\); got "
                                       r"'column'"):
    smp.legal_positions(LAYOUT, state, False, "column")
