"""Property tests: arbitrary token arrays and sampler settings never crash undocumentedly and
never index out of range."""
import dataclasses

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from dq.stage2 import sampler as smp
from dq.stage2.tokens import TokenLayout, unpack_tokens, unpack_tokens_jax
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
