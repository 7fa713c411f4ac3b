"""KV-cached sampler: equality with a naive full-recompute reference, legal moves, filters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.stage2 import sampler as smp
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import _fine_cells_of_regions, unpack_tokens
from dq.stage2.transformer import StackedTransformer

LAYOUT = TokenLayout(coarse_size=3, fine_size=6, codebook_size=8, num_classes=3)
UNCOND = dataclasses.replace(LAYOUT, num_classes=0)


def _model(layout: TokenLayout) -> StackedTransformer:
  return StackedTransformer(
      vocab_size=layout.content_vocab_size, coarse_position_size=layout.coarse_position_vocab_size,
      fine_position_size=layout.fine_position_vocab_size, segment_size=2,
      block_size=layout.max_len - 1, position_layers=1, content_layers=2, n_head=2, n_embd=32)


def _params(layout: TokenLayout, seed: int = 0):
  model = _model(layout)
  dummy = jnp.zeros((1, layout.max_len), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), dummy, dummy, dummy,
                      method="forward_packed")["params"]
  # pos_emb starts at zero; give it values so absolute positions matter in the comparison.
  params["pos_emb"] = 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                              params["pos_emb"].shape)
  return model, params


def naive_sample(model, layout, config, params, rng, labels=None, batch=None):
  """Reference: recomputes the whole sequence with `forward_packed` for every logit."""
  guided = labels is not None and config.guidance_scale != 1.0

  def sequences(state):
    content, position, segment = state.content, state.position, state.segment
    if guided:
      content = jnp.concatenate([content, content.at[:, 0].set(layout.null_class_sos)])
      position, segment = jnp.tile(position, (2, 1)), jnp.tile(segment, (2, 1))
    return content, position, segment

  def position_fn(params, state, inputs):
    content, position, segment = sequences(state)
    np.testing.assert_array_equal(content[:, state.index], inputs["content"])
    logits, _ = model.apply({"params": params}, content, position, segment,
                            method="forward_packed")
    return logits[:, state.index], None, None

  def content_fn(params, state, aux, next_position, next_segment, cache):
    content, position, segment = sequences(state)
    position = position.at[:, state.index + 1].set(next_position)
    segment = segment.at[:, state.index + 1].set(next_segment)
    _, logits = model.apply({"params": params}, content, position, segment,
                            method="forward_packed")
    return logits[:, state.index], None

  batch = batch if labels is None else len(labels)
  return smp.run_sampling(layout, config, position_fn, content_fn, params, rng,
                          None if labels is None else jnp.asarray(labels), batch, None,
                          loop="python")


def _check_legal(layout: TokenLayout, out: dict) -> tuple[np.ndarray, np.ndarray]:
  """Asserts the sampled sequences obey every legal-move rule; returns (codes, grain)."""
  out = {k: np.asarray(v) for k, v in out.items()}
  valid, length = out["valid"], out["length"]
  assert (length > 0).all(), "every sample must reach its fine EOS"
  np.testing.assert_array_equal(valid, np.arange(layout.max_len)[None] < length[:, None])
  for b in range(len(valid)):
    seq = {k: out[k][b, :length[b]] for k in ("content", "position", "segment")}
    coarse = seq["segment"] == 0
    n_coarse = int(coarse.sum())
    # [SOS] coarse... [EOS] [SOS_f] fine... [EOS]
    assert seq["position"][0] == layout.coarse_pos_sos
    assert seq["position"][n_coarse - 1] == layout.coarse_pos_eos
    assert seq["content"][n_coarse - 1] == layout.content_eos
    assert seq["position"][n_coarse] == layout.fine_pos_sos
    assert seq["content"][n_coarse] == layout.content_sos
    assert seq["position"][-1] == layout.fine_pos_eos and seq["content"][-1] == layout.content_eos
    assert not np.any(seq["segment"][n_coarse:] == 0)
    cells = np.r_[seq["position"][1:n_coarse - 1], seq["position"][n_coarse + 1:-1]]
    codes = np.r_[seq["content"][1:n_coarse - 1], seq["content"][n_coarse + 1:-1]]
    assert (codes < layout.codebook_size).all() and (codes >= 0).all(), "special id as content"
    coarse_cells = seq["position"][1:n_coarse - 1]
    fine_cells = seq["position"][n_coarse + 1:-1]
    assert len(set(coarse_cells)) == len(coarse_cells), "repeated coarse position"
    assert len(set(fine_cells)) == len(fine_cells), "repeated fine position"
    assert len(cells) == length[b] - 4
  pad = ~valid
  assert (out["content"][pad] == layout.content_pad).all()
  assert (out["position"][pad] == layout.fine_pos_pad).all()
  # unpack_tokens validates that every region is coded once: coarse, or all 4 fine cells.
  return unpack_tokens(out, layout)


CASES = {
    "unconditional": (UNCOND, smp.SamplingConfig(), None),
    "guided_filtered": (LAYOUT, smp.SamplingConfig(
        guidance_scale=3.0, content_top_k=5, position_top_p=0.9, content_temperature=0.8,
        position_temperature=1.3), [0, 2, 1, 3]),
    "fixed_region_order": (LAYOUT, smp.SamplingConfig(
        fixed_fine_positions=True, fine_order="region", content_top_p=0.7), [1, 1, 0, 2]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_sampler_equals_full_recompute(case):
  layout, config, labels = CASES[case]
  model, params = _params(layout)
  rng = jax.random.PRNGKey(7)
  sampler = smp.make_sampler(model, layout, config)
  cached = sampler(params, rng, 4 if labels is None else np.array(labels, np.int32))
  reference = naive_sample(model, layout, config, params, rng,
                           labels=None if labels is None else np.array(labels, np.int32),
                           batch=4)
  for name in ("content", "position", "segment", "valid", "length"):
    np.testing.assert_array_equal(cached[name], reference[name], err_msg=name)
  _check_legal(layout, cached)


def test_many_samples_obey_masks_and_vary():
  model, params = _params(UNCOND, seed=3)
  out = smp.make_sampler(model, UNCOND)(params, jax.random.PRNGKey(0), 48)
  codes, grain = _check_legal(UNCOND, out)
  ratios = grain.reshape(48, -1).mean(axis=1)
  assert len(np.unique(ratios)) > 3, "fine ratios should vary between samples"
  assert len(np.unique(codes.reshape(48, -1), axis=0)) == 48


def test_fixed_fine_positions_follow_fine_order():
  model, params = _params(UNCOND, seed=4)
  for fine_order in ("row", "region"):
    config = smp.SamplingConfig(fixed_fine_positions=True, fine_order=fine_order)
    out = jax.device_get(smp.make_sampler(model, UNCOND, config)(
        params, jax.random.PRNGKey(1), 16))
    _check_legal(UNCOND, out)
    order = (np.arange(UNCOND.num_fine_cells) if fine_order == "row"
             else _fine_cells_of_regions(UNCOND).reshape(-1))
    rank = np.argsort(order)
    for b in range(16):
      fine = (out["segment"][b] == 1) & out["valid"][b] & (
          out["position"][b] < UNCOND.num_fine_cells)
      assert np.all(np.diff(rank[out["position"][b][fine]]) > 0)


def test_short_max_len_is_respected():
  layout = dataclasses.replace(UNCOND, max_len=UNCOND.num_coarse_cells + 3 * 2 + 4)  # <= 2 fine
  model, params = _params(layout, seed=5)
  out = smp.make_sampler(model, layout)(params, jax.random.PRNGKey(2), 32)
  _, grain = _check_legal(layout, out)
  assert grain.reshape(32, -1).sum(axis=1).max() <= 2
  assert np.asarray(out["length"]).max() <= layout.max_len


def test_class_conditional_sos_and_greedy_determinism():
  model, params = _params(LAYOUT, seed=6)
  config = smp.SamplingConfig(position_temperature=0.0, content_temperature=0.0)
  sampler = smp.make_sampler(model, LAYOUT, config)
  labels = np.array([0, 1, 2, 3], np.int32)
  first = sampler(params, jax.random.PRNGKey(0), labels)
  second = sampler(params, jax.random.PRNGKey(99), labels)
  np.testing.assert_array_equal(first["content"][:, 0], labels + LAYOUT.codebook_size + 3)
  np.testing.assert_array_equal(first["content"], second["content"])  # greedy ignores the rng
  _check_legal(LAYOUT, first)


def _numpy_filter(logits, legal, temperature, top_k, top_p):
  out = np.where(legal, logits, -np.inf) / temperature
  for row in out:
    if top_k:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind="stable")
      probs = np.exp(row[order] - row[order][0])
      probs /= probs.sum()
      drop = (np.cumsum(probs) - probs) >= top_p
      row[order[drop]] = -np.inf
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0),
                                                     (2.0, 0, 0.6), (1.0, 4, 0.8)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 11)).astype(np.float32)
  legal = rng.random((5, 11)) < 0.7
  legal[:, 0] = True
  got = np.asarray(smp.filter_logits(jnp.asarray(logits), jnp.asarray(legal), temperature,
                                     top_k, top_p))
  expected = _numpy_filter(logits, legal, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
  np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)


def test_sample_ids_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  legal = jnp.array([[True, True, True, False]])
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = jax.vmap(lambda k: smp.sample_ids(k, logits, legal, 1.0, 0, 0.85))(keys)[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=4) / 4000
  # top-p 0.85 keeps {0.5, 0.3, 0.15} -> renormalised over the legal ids; id 3 illegal.
  np.testing.assert_allclose(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)


def test_guide_mixes_conditional_and_null_rows():
  cond, uncond = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, -1.0]])
  np.testing.assert_allclose(smp.guide(jnp.concatenate([cond, uncond]), 3.0, True),
                             uncond + 3.0 * (cond - uncond))
  np.testing.assert_allclose(smp.guide(cond, 3.0, False), cond)


def test_bad_inputs_raise_clear_errors():
  model, params = _params(LAYOUT)
  sampler = smp.make_sampler(model, LAYOUT)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
    sampler(params, jax.random.PRNGKey(0), np.array([0, 4], np.int32))
  with pytest.raises(ValueError, match="class-conditional"):
    sampler(params, jax.random.PRNGKey(0), 4)
  with pytest.raises(ValueError, match="top_p must lie in"):
    smp.SamplingConfig(content_top_p=0.0)
  with pytest.raises(ValueError, match="top_k must be an int"):
    smp.SamplingConfig(position_top_k=-1)
  with pytest.raises(ValueError, match="guidance_scale"):
    smp.SamplingConfig(guidance_scale=float("nan"))
  with pytest.raises(ValueError, match="block_size"):
    smp.make_sampler(_model(LAYOUT).clone(block_size=10), LAYOUT)
