"""Token packing: round trips, the official permuter order, specials, masks and errors."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fixture_path
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import (official_permuter_order, pack_tokens, pack_tokens_jax,
                              unpack_tokens, unpack_tokens_jax)


def random_maps(seed: int, batch: int, coarse: tuple[int, int], codebook_size: int,
                fine_ratio: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Random grain [B, hc, wc] and codes [B, hf, wf] constant on coarse blocks."""
  rng = np.random.default_rng(seed)
  hc, wc = coarse
  grain = (rng.random((batch, hc, wc)) < fine_ratio).astype(np.int64)
  fine_codes = rng.integers(0, codebook_size, (batch, 2 * hc, 2 * wc))
  block_codes = np.repeat(np.repeat(rng.integers(0, codebook_size, (batch, hc, wc)), 2, 1), 2, 2)
  coarse_up = np.repeat(np.repeat(grain, 2, 1), 2, 2)
  return np.where(coarse_up == 1, fine_codes, block_codes), grain


@pytest.fixture(scope="module")
def stackgpt():
  return dict(np.load(fixture_path("official_stackgpt_small.npz")))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), hc=st.integers(1, 5), wc=st.integers(1, 5),
       batch=st.integers(1, 4), ratio=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       fine_order=st.sampled_from(["row", "region"]))
def test_round_trip_numpy(seed, hc, wc, batch, ratio, fine_order):
  layout = TokenLayout((hc, wc), (2 * hc, 2 * wc), codebook_size=7)
  codes, grain = random_maps(seed, batch, (hc, wc), 7, ratio)
  packed = pack_tokens(codes, grain, layout, fine_order=fine_order)
  assert all(v.shape == (batch, layout.max_len) for v in packed.values())
  out_codes, out_grain = unpack_tokens(packed, layout)
  np.testing.assert_array_equal(out_codes, codes)
  np.testing.assert_array_equal(out_grain, grain)


@pytest.mark.parametrize("fine_order", ["row", "region"])
@pytest.mark.parametrize("coarse", [(2, 2), (4, 4), (3, 5)])
def test_jax_matches_numpy_and_round_trips(fine_order, coarse):
  layout = TokenLayout(coarse, (2 * coarse[0], 2 * coarse[1]), codebook_size=16)
  codes, grain = random_maps(3, 5, coarse, 16)
  grain[0] = 0
  grain[1] = 1
  codes[0] = np.repeat(np.repeat(codes[0, ::2, ::2], 2, 0), 2, 1)
  packed = pack_tokens(codes, grain, layout, fine_order=fine_order)
  packed_jax = pack_tokens_jax(jnp.asarray(codes), jnp.asarray(grain), layout,
                               fine_order=fine_order)
  for name in packed:
    np.testing.assert_array_equal(np.asarray(packed_jax[name]), packed[name], err_msg=name)
  out_codes, out_grain = unpack_tokens_jax(packed_jax, layout)
  np.testing.assert_array_equal(np.asarray(out_codes), codes)
  np.testing.assert_array_equal(np.asarray(out_grain), grain)


def test_official_permuter_order(stackgpt):
  layout = TokenLayout(4, 8, codebook_size=64)
  order = official_permuter_order(stackgpt["codes"], stackgpt["grain"], layout)
  for name in ("coarse_content", "coarse_position", "coarse_segment", "fine_content",
               "fine_position", "fine_segment"):
    np.testing.assert_array_equal(order[name], stackgpt[f"perm/{name}"], err_msg=name)
  codes, grain = unpack_tokens(pack_tokens(stackgpt["codes"], stackgpt["grain"], layout), layout)
  np.testing.assert_array_equal(codes, stackgpt["forward_back"])
  np.testing.assert_array_equal(grain, stackgpt["grain"])


def test_packed_sequence_matches_official_inputs(stackgpt):
  """The packed sequence is the official sos-prefixed coarse and fine inputs without pads."""
  layout = TokenLayout(4, 8, codebook_size=64)
  packed = pack_tokens(stackgpt["codes"], stackgpt["grain"], layout)
  for b in range(3):
    parts = {}
    for field, official in (("content", "content"), ("position", "position"), ("segment", "seg")):
      coarse, fine = stackgpt[f"in/coarse_{official}"][b], stackgpt[f"in/fine_{official}"][b]
      coarse = coarse[stackgpt["in/coarse_position"][b] != 16]
      fine = fine[stackgpt["in/fine_position"][b] != 64]
      parts[field] = np.concatenate([coarse, fine])
    n = len(parts["content"])
    assert packed["valid"][b].sum() == n and packed["valid"][b, :n].all()
    for field, expected in parts.items():
      np.testing.assert_array_equal(packed[field][b, :n], expected, err_msg=f"{field} image {b}")


def test_specials_layout_and_valid_mask():
  layout = TokenLayout(2, 4, codebook_size=10)
  assert (layout.content_pad, layout.content_eos, layout.content_sos) == (10, 11, 12)
  assert (layout.coarse_pos_pad, layout.coarse_pos_eos, layout.coarse_pos_sos) == (4, 5, 6)
  assert (layout.fine_pos_pad, layout.fine_pos_eos, layout.fine_pos_sos) == (16, 17, 18)
  assert layout.max_len == 20 and layout.content_vocab_size == 13
  grain = np.array([[[0, 1], [0, 0]]])
  codes = np.zeros((1, 4, 4), dtype=np.int64)
  codes[0, :2, 2:] = [[1, 2], [3, 4]]
  packed = pack_tokens(codes, grain, layout)
  n = layout.sequence_length(1)
  assert n == 11
  np.testing.assert_array_equal(packed["content"][0],
                                [12, 0, 0, 0, 11, 12, 1, 2, 3, 4, 11] + [10] * 9)
  np.testing.assert_array_equal(packed["position"][0],
                                [6, 0, 2, 3, 5, 18, 2, 3, 6, 7, 17] + [16] * 9)
  np.testing.assert_array_equal(packed["segment"][0], [0] * 5 + [1] * 15)
  np.testing.assert_array_equal(packed["valid"][0], [True] * n + [False] * (20 - n))
  region_first = pack_tokens(codes, grain, layout, fine_order="region")
  np.testing.assert_array_equal(region_first["position"][0, 6:10], [2, 3, 6, 7])


def test_region_first_order_differs_from_row_first():
  layout = TokenLayout(2, 4, codebook_size=20)
  codes = np.arange(16).reshape(1, 4, 4)
  grain = np.ones((1, 2, 2), dtype=np.int64)
  row = pack_tokens(codes, grain, layout)["position"][0, 3:19]
  region = pack_tokens(codes, grain, layout, fine_order="region")["position"][0, 3:19]
  np.testing.assert_array_equal(row, np.arange(16))
  np.testing.assert_array_equal(region, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])


def test_class_sos_ids():
  layout = TokenLayout(2, 4, codebook_size=10, num_classes=5)
  assert layout.class_sos(0) == 13 and layout.class_sos(4) == 17
  assert layout.null_class_sos == 18 and layout.content_vocab_size == 19
  codes, grain = random_maps(0, 3, (2, 2), 10)
  packed = pack_tokens(codes, grain, layout, labels=np.array([0, 4, 5]))
  np.testing.assert_array_equal(packed["content"][:, 0], [13, 17, 18])
  fine_sos = np.argmax(packed["position"] == layout.fine_pos_sos, axis=1)
  np.testing.assert_array_equal(packed["content"][np.arange(3), fine_sos], [12, 12, 12])
  jax_packed = pack_tokens_jax(jnp.asarray(codes), jnp.asarray(grain), layout,
                               labels=jnp.array([0, 4, 5]))
  np.testing.assert_array_equal(np.asarray(jax_packed["content"]), packed["content"])
  out_codes, _ = unpack_tokens(packed, layout)
  np.testing.assert_array_equal(out_codes, codes)


def test_errors():
  layout = TokenLayout(2, 4, codebook_size=10)
  codes, grain = random_maps(0, 2, (2, 2), 10, fine_ratio=0.0)
  with pytest.raises(ValueError, match="dual grain"):
    TokenLayout(2, 5, codebook_size=10)
  with pytest.raises(ValueError, match="max_len"):
    TokenLayout(2, 4, codebook_size=10, max_len=7)
  with pytest.raises(ValueError, match="codes has shape"):
    pack_tokens(codes[:, :2], grain, layout)
  with pytest.raises(ValueError, match="grain has shape"):
    pack_tokens(codes, grain[:1], layout)
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 10\)"):
    pack_tokens(codes + 10, grain, layout)
  with pytest.raises(ValueError, match="grain must hold"):
    pack_tokens(codes, grain + 2, layout)
  with pytest.raises(ValueError, match="integer"):
    pack_tokens(codes.astype(np.float32), grain, layout)
  with pytest.raises(ValueError, match="fine_order"):
    pack_tokens(codes, grain, layout, fine_order="column")
  bad = codes.copy()
  bad[0, 0, 0], bad[0, 0, 1] = 1, 2
  with pytest.raises(ValueError, match="not constant"):
    pack_tokens(bad, grain, layout)
  with pytest.raises(ValueError, match="labels given"):
    pack_tokens(codes, grain, layout, labels=np.array([0, 1]))
  conditional = TokenLayout(2, 4, codebook_size=10, num_classes=3)
  with pytest.raises(ValueError, match="pass labels"):
    pack_tokens(codes, grain, conditional)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
    pack_tokens(codes, grain, conditional, labels=np.array([0, 4]))
  short = TokenLayout(2, 4, codebook_size=10, max_len=10)
  with pytest.raises(ValueError, match="needs 14 tokens"):
    pack_tokens(codes, np.array([[[1, 1], [0, 0]]] * 2), short)


def test_unpack_rejects_inconsistent_sequences():
  layout = TokenLayout(2, 4, codebook_size=10)
  codes, _ = random_maps(1, 1, (2, 2), 10, fine_ratio=0.0)
  packed = pack_tokens(codes, np.array([[[0, 1], [0, 0]]]), layout)
  dropped = {k: v.copy() for k, v in packed.items()}
  dropped["valid"][0, 1] = False
  with pytest.raises(ValueError, match="expected 1 coarse or 4 fine"):
    unpack_tokens(dropped, layout)
  special = {k: v.copy() for k, v in packed.items()}
  special["content"][0, 1] = layout.content_eos
  with pytest.raises(ValueError, match="not a code"):
    unpack_tokens(special, layout)
  with pytest.raises(ValueError, match="lack fields"):
    unpack_tokens({"content": packed["content"]}, layout)
