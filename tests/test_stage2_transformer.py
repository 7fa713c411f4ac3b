"""StackedTransformer: parity with the official StackGPT fixture, causality, shapes, conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_path

from dq.official.transformer import convert_stackgpt_state_dict
from dq.stage2.losses import stackgpt_losses
from dq.stage2.transformer import StackedTransformer, causal_attention

INPUT_NAMES = ("coarse_content", "fine_content", "coarse_position", "fine_position",
               "coarse_seg", "fine_seg")


@pytest.fixture(scope="module")
def official():
  return dict(np.load(fixture_path("official_stackgpt_small.npz")))


def _official_model() -> StackedTransformer:
  return StackedTransformer(vocab_size=67, coarse_position_size=19, fine_position_size=67,
                            segment_size=2, block_size=128, position_layers=2, content_layers=3,
                            n_head=4, n_embd=64, dropout=0.0)


def _inputs(official):
  return [jnp.asarray(official[f"in/{name}"], dtype=jnp.int32) for name in INPUT_NAMES]


def _state_dict(official):
  return {k[len("sd/"):]: v for k, v in official.items() if k.startswith("sd/")}


def test_official_parity(official):
  params = convert_stackgpt_state_dict(_state_dict(official))
  model = _official_model()
  with jax.default_matmul_precision("highest"):
    position_logits, content_logits = model.apply({"params": params}, *_inputs(official))
    losses = stackgpt_losses(position_logits, content_logits,
                             jnp.asarray(official["content_target"]),
                             jnp.asarray(official["coarse_position_target"]),
                             jnp.asarray(official["fine_position_target"]),
                             content_pad=64, coarse_position_pad=16, fine_position_pad=64)
  np.testing.assert_allclose(position_logits, official["position_logits"], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(content_logits, official["content_logits"], atol=1e-4, rtol=1e-4)
  for name in ("content_loss", "coarse_position_loss", "fine_position_loss", "position_loss"):
    np.testing.assert_allclose(losses[name], official[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_converted_tree_matches_init(official):
  converted = convert_stackgpt_state_dict(
      {"transformer." + k: v for k, v in _state_dict(official).items()})
  initialised = _official_model().init(jax.random.PRNGKey(0), *_inputs(official))["params"]
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  assert shapes(converted) == shapes(jax.tree_util.tree_map(np.asarray, initialised))


def test_conversion_rejects_unknown_and_bad_keys(official):
  state_dict = _state_dict(official)
  with pytest.raises(ValueError, match="unknown StackGPT state_dict key 'extra.weight'"):
    convert_stackgpt_state_dict({**state_dict, "extra.weight": np.zeros(3)})
  with pytest.raises(ValueError, match="no bias"):
    convert_stackgpt_state_dict({**state_dict, "position_head.1.bias": np.zeros(67)})
  with pytest.raises(ValueError, match="pos_emb"):
    convert_stackgpt_state_dict({**state_dict, "pos_emb": np.zeros((128, 64))})


def test_causality_and_shapes():
  model = StackedTransformer(vocab_size=11, coarse_position_size=7, fine_position_size=9,
                             segment_size=2, block_size=16, position_layers=1,
                             content_layers=2, n_head=2, n_embd=16, dropout=0.0)
  rng = np.random.default_rng(0)
  coarse = [rng.integers(0, n, (2, 5)) for n in (11, 7)] + [np.zeros((2, 5), np.int64)]
  fine = [rng.integers(0, n, (2, 6)) for n in (11, 9)] + [np.ones((2, 6), np.int64)]
  inputs = [coarse[0], fine[0], coarse[1], fine[1], coarse[2], fine[2]]
  params = model.init(jax.random.PRNGKey(1), *inputs)
  position_logits, content_logits = model.apply(params, *inputs)
  assert position_logits.shape == (2, 10, 9)
  assert content_logits.shape == (2, 10, 11)

  content_changed = [np.array(x) for x in inputs]
  content_changed[1][:, 3] = (content_changed[1][:, 3] + 1) % 11  # joint step 5 + 3 = 8
  new_position, new_content = model.apply(params, *content_changed)
  np.testing.assert_allclose(new_position[:, :8], position_logits[:, :8], atol=1e-6)
  np.testing.assert_allclose(new_content[:, :8], content_logits[:, :8], atol=1e-6)
  assert not np.allclose(new_position[:, 8], position_logits[:, 8])
  assert not np.allclose(new_content[:, 8], content_logits[:, 8])

  # fine_position[4] is the position-stream input of step 9 and the next position of step 8.
  position_changed = [np.array(x) for x in inputs]
  position_changed[3][:, 4] = (position_changed[3][:, 4] + 1) % 9
  new_position, new_content = model.apply(params, *position_changed)
  np.testing.assert_allclose(new_position[:, :9], position_logits[:, :9], atol=1e-6)
  np.testing.assert_allclose(new_content[:, :8], content_logits[:, :8], atol=1e-6)
  assert not np.allclose(new_position[:, 9], position_logits[:, 9])
  assert not np.allclose(new_content[:, 8], content_logits[:, 8])


def test_causal_attention_matches_numpy():
  rng = np.random.default_rng(2)
  query, key, value = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  scores = np.einsum("bqhd,bkhd->bhqk", query, key) / 2.0
  scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", weights, value)
  np.testing.assert_allclose(causal_attention(query, key, value), expected, atol=1e-5)


def test_losses_ignore_pads_and_reject_bad_shapes():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 5)), jnp.float32)
  content_target = jnp.array([[1, 4, 2, 4]])
  losses = stackgpt_losses(logits, logits, content_target, jnp.array([[0, 4]]),
                           jnp.array([[3, 4]]), content_pad=4, coarse_position_pad=4,
                           fine_position_pad=4)
  log_probs = np.asarray(jax.nn.log_softmax(logits))[0]
  np.testing.assert_allclose(losses["content_loss"], -(log_probs[0, 1] + log_probs[2, 2]) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(losses["coarse_position_loss"], -log_probs[0, 0], rtol=1e-5)
  np.testing.assert_allclose(losses["fine_position_loss"], -log_probs[2, 3], rtol=1e-5)
  np.testing.assert_allclose(losses["position_loss"],
                             -(log_probs[0, 0] + log_probs[2, 3]) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="must equal T=4"):
    stackgpt_losses(logits, logits, content_target, jnp.array([[0]]), jnp.array([[3, 4]]),
                    content_pad=4, coarse_position_pad=4, fine_position_pad=4)


def test_rejects_sequence_longer_than_block_size(official):
  model = _official_model().clone(block_size=32)
  with pytest.raises(ValueError, match="joint sequence length 68 exceeds block_size=32"):
    model.init(jax.random.PRNGKey(0), *_inputs(official))


def _equal_count_batch(seed: int = 0):
  """Codes/grain (4x4 coarse, 8x8 fine, K=64) where every image has 5 fine regions."""
  rng = np.random.default_rng(seed)
  grain = np.zeros((3, 16), np.int64)
  for row in grain:
    row[rng.choice(16, 5, replace=False)] = 1
  grain = grain.reshape(3, 4, 4)
  codes = rng.integers(0, 64, (3, 8, 8))
  coarse_codes = np.repeat(np.repeat(codes[:, ::2, ::2], 2, 1), 2, 2)
  codes = np.where(np.repeat(np.repeat(grain, 2, 1), 2, 2) == 1, codes, coarse_codes)
  return codes, grain


def test_packed_forward_and_losses_match_official_assembly(official):
  """Without pads between the coarse and fine parts, both assemblies are the same sequence."""
  from dq.stage2.layout import TokenLayout
  from dq.stage2.losses import packed_losses
  from dq.stage2.tokens import official_permuter_order, pack_tokens
  layout = TokenLayout(coarse_size=4, fine_size=8, codebook_size=64)
  codes, grain = _equal_count_batch()
  perm = official_permuter_order(codes, grain, layout)
  inputs = [np.concatenate([np.full((3, 1), sos), perm[name]], axis=1) for name, sos in (
      ("coarse_content", 66), ("fine_content", 66), ("coarse_position", 18),
      ("fine_position", 66), ("coarse_segment", 0), ("fine_segment", 1))]
  packed = pack_tokens(codes, grain, layout)
  length = inputs[0].shape[1] + inputs[1].shape[1]
  assert packed["valid"][:, :length].all() and not packed["valid"][:, length:].any()
  model = _official_model()
  params = {"params": convert_stackgpt_state_dict(_state_dict(official))}
  position_logits, content_logits = model.apply(params, *[jnp.asarray(x) for x in inputs])
  packed_position, packed_content = model.apply(
      params, *(jnp.asarray(packed[k][:, :length]) for k in ("content", "position", "segment")),
      method="forward_packed")
  np.testing.assert_allclose(packed_position, position_logits, atol=1e-5)
  np.testing.assert_allclose(packed_content, content_logits, atol=1e-5)

  content = np.concatenate([inputs[0], inputs[1]], axis=1)
  reference = stackgpt_losses(position_logits, content_logits, jnp.asarray(content[:, 1:]),
                              jnp.asarray(inputs[2][:, 1:]), jnp.asarray(inputs[3]),
                              content_pad=64, coarse_position_pad=16, fine_position_pad=64)
  full_position, full_content = model.apply(
      params, *(jnp.asarray(packed[k]) for k in ("content", "position", "segment")),
      method="forward_packed")
  losses = packed_losses(full_position, full_content, {k: jnp.asarray(v) for k, v in
                                                       packed.items()})
  for name, value in reference.items():
    np.testing.assert_allclose(losses[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_attention_implementations_agree(implementation):
  rng = np.random.default_rng(4)
  query, key, value = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
  plain = causal_attention(query, key, value)
  np.testing.assert_allclose(causal_attention(query, key, value, implementation), plain,
                             atol=1e-5)
  with pytest.raises(ValueError, match="attention implementation"):
    causal_attention(query, key, value, "flash")


def test_remat_keeps_parameters_values_and_gradients(official):
  """`remat=True` recomputes block activations in the backward pass: the same parameter tree
  (official weights load unchanged), logits, loss gradients and dropout; the KV-cached steps
  (not rematerialised) still work."""
  from dq.stage2.transformer import init_cache
  params = {"params": convert_stackgpt_state_dict(_state_dict(official))}
  inputs = _inputs(official)
  plain = _official_model().clone(dropout=0.1)
  remat = plain.clone(remat=True)
  initialised = jax.eval_shape(remat.init, jax.random.PRNGKey(0), *inputs)["params"]
  assert jax.tree.structure(initialised) == jax.tree.structure(params["params"])

  def loss(model, p):
    position, content = model.apply({"params": p}, *inputs, deterministic=False,
                                    rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.mean(position**2) + jnp.mean(jnp.sin(content))

  values = {}
  for name, model in (("plain", plain), ("remat", remat)):
    values[name] = jax.jit(jax.value_and_grad(lambda p, m=model: loss(m, p)))(params["params"])
  np.testing.assert_allclose(values["remat"][0], values["plain"][0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(values["remat"][1]), jax.tree.leaves(values["plain"][1])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The backward pass recomputes the blocks behind optimisation barriers (one per block).
  barriers = {name: jax.jit(jax.grad(lambda p, m=model: loss(m, p))).lower(
      params["params"]).as_text().count("optimization_barrier") for name, model in
              (("plain", plain), ("remat", remat))}
  assert barriers["plain"] == 0 and barriers["remat"] >= 5, barriers
  token = [jnp.full((2,), value, jnp.int32) for value in (66, 18, 0)]
  steps = [model.apply(params, *token, jnp.int32(0), init_cache(model, 2, 4)["position"],
                       method="position_step") for model in (plain, remat)]
  for got, want in zip(jax.tree.leaves(steps[1]), jax.tree.leaves(steps[0])):
    np.testing.assert_allclose(got, want, rtol=1e-6)
