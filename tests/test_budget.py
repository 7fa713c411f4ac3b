"""Budget loss: hand computations, the official fixture values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.losses.budget import budget_loss, budget_loss_triple, fine_ratio, grain_ratio


def one_hot_gate(grain, num_grains):
  return np.eye(num_grains, dtype=np.float32)[np.asarray(grain)]


def test_dual_ratio_and_loss_by_hand():
  # 2 images on a 2x2 grid: 1 and 3 fine regions -> s = (3*1+1*4, 1*1+3*4) = (7, 13).
  grain = np.array([[[0, 1], [0, 0]], [[1, 1], [0, 1]]])
  gate = one_hot_gate(grain, 2)
  ratio = ((7 + 13) / 2 - 4) / (4 * 3)  # 0.5
  np.testing.assert_allclose(fine_ratio(gate), ratio)
  np.testing.assert_allclose(budget_loss(gate, 0.25, gamma=10.0, calculate_all=False),
                             10.0 * (ratio - 0.25) ** 2, rtol=1e-6)
  np.testing.assert_allclose(budget_loss(gate, 0.25, gamma=10.0, calculate_all=True),
                             2 * 10.0 * (ratio - 0.25) ** 2, rtol=1e-6)
  np.testing.assert_allclose(budget_loss(gate, 0.5), 0.0, atol=1e-7)


def test_matches_official_fixture(official_dqvae):
  gate = official_dqvae["budget_gate_onehot"].transpose(0, 2, 3, 1)  # [B, h, w, 2]
  np.testing.assert_allclose(budget_loss(gate, 0.5, 10.0, calculate_all=True),
                             official_dqvae["budget_loss_all"], rtol=1e-6)
  np.testing.assert_allclose(budget_loss(gate, 0.5, 10.0, calculate_all=False),
                             official_dqvae["budget_loss_main"], rtol=1e-6)
  np.testing.assert_allclose(fine_ratio(gate), (official_dqvae["grain"] == 1).mean())


def test_triple_by_hand():
  grain = np.array([[[0, 1], [2, 2]], [[1, 1], [0, 2]]])  # median 3/8, fine 3/8
  gate = one_hot_gate(grain, 3)
  np.testing.assert_allclose(grain_ratio(gate, 1), 3 / 8)
  np.testing.assert_allclose(fine_ratio(gate), 3 / 8)
  np.testing.assert_allclose(budget_loss_triple(gate, 0.25, 0.5, gamma=4.0),
                             4.0 * ((3 / 8 - 0.25) ** 2 + (3 / 8 - 0.5) ** 2), rtol=1e-6)


def test_gradient_pushes_ratio_towards_target():
  gate = jnp.asarray(one_hot_gate(np.ones((1, 2, 2), int), 2))  # all fine, ratio 1
  grad = jax.grad(lambda g: budget_loss(g, 0.5))(gate)
  # Official cost weights: d/d fine = 4 * d/d coarse, so moving gate mass from fine to coarse
  # (the direction a softmax gate moves in) lowers the loss.
  assert np.all(grad[..., 0] > 0)
  np.testing.assert_allclose(grad[..., 1], 4 * grad[..., 0], rtol=1e-6)
  assert np.all(grad[..., 0] - grad[..., 1] < 0)


def test_rejects_bad_gates():
  with pytest.raises(ValueError, match=r"\[B, h, w, G\]"):
    fine_ratio(np.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match="expected 2"):
    budget_loss(np.zeros((1, 2, 2, 3)), 0.5)
  with pytest.raises(ValueError, match="expected 3"):
    budget_loss_triple(np.zeros((1, 2, 2, 2)), 0.2, 0.3)
