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
  np.testing.assert_allclose(budget_loss_triple(gate, 0.25, 0.5, gamma=4.0, form="fractions"),
                             4.0 * ((3 / 8 - 0.25) ** 2 + (3 / 8 - 0.5) ** 2), rtol=1e-6)


def official_triple_by_hand(gate, t_median, t_fine, gamma):
  """The official BudgetConstraint_NormedSeperateRatioMSE_TripleGrain, written out in float64:
  per image s_m = sum(g0 + 4 g1 + g2), s_f = sum(g0 + g1 + 16 g2) over the n coarse regions."""
  gate = np.asarray(gate, np.float64)
  n = gate.shape[1] * gate.shape[2]
  s_m = (gate[..., 0] + 4 * gate[..., 1] + gate[..., 2]).sum(axis=(1, 2))
  s_f = (gate[..., 0] + gate[..., 1] + 16 * gate[..., 2]).sum(axis=(1, 2))
  r_m = (s_m.mean() - n) / (4 * n - n)
  r_f = (s_f.mean() - n) / (16 * n - n)
  return gamma * (r_f - t_fine) ** 2 + (r_m - t_median) ** 2


def soft_gate(seed, shape=(2, 2, 3, 3)):
  logits = np.random.RandomState(seed).randn(*shape).astype(np.float32) * 2
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


@pytest.mark.parametrize("gate_kind", ["one_hot", "soft"])
def test_triple_official_is_the_default_and_matches_hand_computation(gate_kind):
  if gate_kind == "one_hot":
    grain = np.array([[[0, 1], [2, 2]], [[1, 1], [0, 2]]])  # 3 median, 3 fine of 8
    gate = one_hot_gate(grain, 3)
    # s_m = (1+4+1+1, 4+4+1+1) = (7, 10), s_f = (1+1+16+16, 1+1+1+16) = (34, 19), n = 4.
    r_m, r_f = (8.5 - 4) / 12, (26.5 - 4) / 60
    np.testing.assert_allclose(official_triple_by_hand(gate, 0.3, 0.2, 10.0),
                               10.0 * (r_f - 0.2) ** 2 + (r_m - 0.3) ** 2, rtol=1e-12)
  else:
    gate = soft_gate(0)
  differences = []
  for t_m, t_f, gamma in ((0.3, 0.3, 10.0), (0.1, 0.6, 4.0)):
    want = official_triple_by_hand(gate, t_m, t_f, gamma)
    np.testing.assert_allclose(budget_loss_triple(gate, t_m, t_f, gamma=gamma), want, rtol=2e-6)
    np.testing.assert_allclose(budget_loss_triple(gate, t_m, t_f, gamma=gamma, form="official"),
                               want, rtol=2e-6)
    differences.append(abs(float(budget_loss_triple(gate, t_m, t_f, gamma, form="fractions"))
                           - want))
  assert max(differences) > 1e-3  # the earlier plain-fraction form is another loss


@pytest.mark.parametrize("seed", [1, 2])
def test_triple_official_gradient_matches_hand_derivative(seed):
  gate = soft_gate(seed)
  t_m, t_f, gamma = 0.3, 0.25, 10.0
  b, h, w, _ = gate.shape
  n = h * w
  g = gate.astype(np.float64)
  r_m = ((g[..., 0] + 4 * g[..., 1] + g[..., 2]).sum(axis=(1, 2)).mean() - n) / (3 * n)
  r_f = ((g[..., 0] + g[..., 1] + 16 * g[..., 2]).sum(axis=(1, 2)).mean() - n) / (15 * n)
  # dL/dg_c = 2 gamma (r_f - t_f) * c_f[c] / (15 n B) + 2 (r_m - t_m) * c_m[c] / (3 n B).
  cost_m, cost_f = np.array([1.0, 4.0, 1.0]), np.array([1.0, 1.0, 16.0])
  want = (2 * gamma * (r_f - t_f) * cost_f / (15 * n * b)
          + 2 * (r_m - t_m) * cost_m / (3 * n * b))
  grad = jax.grad(lambda x: budget_loss_triple(x, t_m, t_f, gamma))(jnp.asarray(gate))
  np.testing.assert_allclose(grad, np.broadcast_to(want, gate.shape), rtol=1e-5, atol=1e-9)
  # The coarse channel gets a gradient of its own (it is in both cost-weighted sums).
  assert np.all(np.abs(grad[..., 0]) > 0)
  with pytest.raises(ValueError, match="official"):
    budget_loss_triple(gate, t_m, t_f, gamma, form="plain")


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
