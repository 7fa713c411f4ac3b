"""EMA vector quantizer: lookup, loss, EMA and restart math vs numpy and the official fixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.models.quantizer import EMAVectorQuantizer, nearest_codes

K, D = 16, 4


def np_nearest(z, embedding):
  d = ((z[:, None, :].astype(np.float64) - embedding[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(1)


def np_ema(z, codes, cluster_size, embed_sum, decay=0.99, eps=1e-5):
  """EMA step without restarts, float64."""
  k = cluster_size.shape[0]
  counts = np.bincount(codes, minlength=k).astype(np.float64)
  sums = np.zeros(embed_sum.shape)
  np.add.at(sums, codes, z.astype(np.float64))
  cs = decay * cluster_size + (1 - decay) * counts
  es = decay * embed_sum + (1 - decay) * sums
  return cs, es


def np_normalize(cs, es, eps=1e-5):
  n = cs.sum()
  return es / (n * (cs + eps) / (n + cs.shape[0] * eps))[:, None]


def make_state(seed=0):
  rng = np.random.RandomState(seed)
  embedding = rng.randn(K, D).astype(np.float32)
  cluster_size = rng.uniform(0.5, 4, K).astype(np.float32)
  return {"embedding": embedding, "cluster_size": cluster_size,
          "embed_sum": (embedding * cluster_size[:, None]).astype(np.float32)}


def apply_quantizer(quantizer, state, z, mask, train, rngs=None):
  """Returns ((quant, codes, aux), new codebook state)."""
  fn = jax.jit(lambda s, z, m, r: quantizer.apply({"codebook": s}, z, m, train,
                                                  mutable=["codebook"], rngs=r))
  outputs, new = fn(state, z, mask, rngs or {})
  return outputs, new["codebook"]


def test_nearest_codes_first_minimum():
  embedding = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  z = jnp.asarray([[0.9, 0.1], [0.1, 0.8], [0.5, 0.5]])
  np.testing.assert_array_equal(nearest_codes(z, embedding), [0, 1, 0])


def test_eval_lookup_loss_and_statistics():
  state = make_state()
  rng = np.random.RandomState(1)
  z = rng.randn(2, 3, 3, D).astype(np.float32)
  mask = rng.choice([0.25, 1.0], size=(2, 3, 3)).astype(np.float32)
  quantizer = EMAVectorQuantizer(K, D)
  (quant, codes, aux), new_state = apply_quantizer(quantizer, state, z, mask, False)
  embedding = state["embedding"]
  ref_codes = np_nearest(z.reshape(-1, D), embedding).reshape(2, 3, 3)
  np.testing.assert_array_equal(codes, ref_codes)
  assert codes.dtype == jnp.int32
  np.testing.assert_array_equal(quant, embedding[ref_codes])
  sq = ((embedding[ref_codes] - z) ** 2 * mask[..., None]).mean()
  np.testing.assert_allclose(aux["codebook_loss"], 1.25 * sq, rtol=1e-6)
  counts = np.bincount(ref_codes.reshape(-1), minlength=K)
  p = counts / counts.sum()
  np.testing.assert_allclose(aux["perplexity"], np.exp(-(p * np.log(p + 1e-10)).sum()), rtol=1e-5)
  np.testing.assert_allclose(aux["usage"], (counts > 0).mean())
  np.testing.assert_allclose(aux["dead_fraction"], (state["cluster_size"] < 1).mean())
  for name, value in new_state.items():  # eval never updates
    np.testing.assert_array_equal(value, state[name])


def test_straight_through_gradient_is_commitment_plus_identity():
  state = make_state()
  z = np.random.RandomState(2).randn(1, 2, 2, D).astype(np.float32)
  mask = np.ones((1, 2, 2), np.float32)
  quantizer = EMAVectorQuantizer(K, D, beta=0.25)

  def loss(z):
    (quant, _, aux), _ = quantizer.apply({"codebook": state}, z, mask, False,
                                         mutable=["codebook"])
    return jnp.sum(quant) + aux["codebook_loss"]

  grad = jax.jit(jax.grad(loss))(z)
  q = state["embedding"][np_nearest(z.reshape(-1, D), state["embedding"])]
  expected = 1.0 + 0.25 * 2 * (z.reshape(-1, D) - q) / z.size
  np.testing.assert_allclose(grad.reshape(-1, D), expected, rtol=1e-5)


def test_train_update_without_restart_matches_numpy():
  state = make_state(3)
  z = np.random.RandomState(4).randn(2, 4, 4, D).astype(np.float32)
  mask = np.full((2, 4, 4), 0.25, np.float32)
  quantizer = EMAVectorQuantizer(K, D, restart_unused_codes=False)
  (quant, codes, aux), new = apply_quantizer(quantizer, state, z, mask, True)
  old = state
  np.testing.assert_array_equal(quant, old["embedding"][codes])  # pre-update codebook
  cs, es = np_ema(z.reshape(-1, D), np.asarray(codes).reshape(-1), old["cluster_size"],
                  old["embed_sum"])
  got = new
  np.testing.assert_allclose(got["cluster_size"], cs, rtol=1e-6)
  np.testing.assert_allclose(got["embed_sum"], es, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["embedding"], np_normalize(cs, es), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["dead_fraction"], (cs < 1).mean())


@pytest.mark.parametrize("num_vectors", [8, 64])  # fewer / more vectors than codes
def test_train_update_with_restart(num_vectors):
  state = make_state(5)
  state["cluster_size"][:5] = 0.3  # dead whatever the batch assigns (<= 64 * 0.01 added)
  state["cluster_size"][5:] = 3.0
  z = np.random.RandomState(6).randn(1, 1, num_vectors, D).astype(np.float32)
  mask = np.ones((1, 1, num_vectors), np.float32)
  quantizer = EMAVectorQuantizer(K, D, restart_unused_codes=True)
  (_, codes, aux), new = apply_quantizer(quantizer, state, z, mask, True,
                                         {"codebook": jax.random.PRNGKey(7)})
  cs, es = np_ema(z.reshape(-1, D), np.asarray(codes).reshape(-1),
                  state["cluster_size"], state["embed_sum"])
  dead = cs < 1
  assert dead.sum() >= 5
  np.testing.assert_allclose(aux["dead_fraction"], dead.mean())  # measured before the restart
  got = new
  np.testing.assert_allclose(got["cluster_size"], np.where(dead, 1.0, cs), rtol=1e-6)
  np.testing.assert_allclose(got["embed_sum"][~dead], es[~dead], rtol=1e-5, atol=1e-6)
  restarted = np.asarray(got["embed_sum"])[dead]
  flat = z.reshape(-1, D)
  diff = restarted[:, None, :] - flat[None]  # [dead, N, D]
  source = np.abs(diff).max(-1).argmin(1)
  noise = restarted - flat[source]
  bound = 0.01 / np.sqrt(D) if num_vectors < K else 1e-7
  assert np.all(noise >= -1e-7) and np.all(noise <= bound + 1e-7)
  if num_vectors >= K:
    assert len(set(source.tolist())) == len(source)  # a permutation: distinct vectors
  np.testing.assert_allclose(got["embedding"],
                             np_normalize(np.asarray(got["cluster_size"], np.float64),
                                          np.asarray(got["embed_sum"], np.float64)),
                             rtol=1e-5, atol=1e-6)


def test_restart_needs_codebook_rng():
  state = make_state()
  quantizer = EMAVectorQuantizer(K, D, restart_unused_codes=True)
  z = jnp.zeros((1, 2, 2, D))
  with pytest.raises(ValueError, match="'codebook' rng"):
    quantizer.apply({"codebook": state}, z, jnp.ones((1, 2, 2)), True, mutable=["codebook"])


def test_train_without_mutable_codebook_does_not_update():
  state = make_state()
  quantizer = EMAVectorQuantizer(K, D)
  z = np.random.RandomState(8).randn(1, 2, 2, D).astype(np.float32)
  quant, codes, _ = jax.jit(lambda s, z: quantizer.apply({"codebook": s}, z, jnp.ones((1, 2, 2)),
                                                           True))(state, z)
  np.testing.assert_array_equal(quant, state["embedding"][codes])


def test_init_state_is_self_consistent():
  quantizer = EMAVectorQuantizer(K, D)
  z = jnp.zeros((1, 2, 2, D))
  variables = jax.jit(quantizer.init, static_argnums=3)(jax.random.PRNGKey(0), z,
                                                        jnp.ones((1, 2, 2)), True)
  assert "params" not in variables
  cb = variables["codebook"]
  assert np.all(np.abs(cb["embedding"]) <= 1.0 / K)
  np.testing.assert_array_equal(cb["cluster_size"], np.ones(K))
  np.testing.assert_allclose(np_normalize(np.asarray(cb["cluster_size"], np.float64),
                                          np.asarray(cb["embed_sum"], np.float64)),
                             cb["embedding"], rtol=1e-6)


def test_rejects_bad_shapes():
  quantizer = EMAVectorQuantizer(K, D)
  with pytest.raises(ValueError, match="embed_dim"):
    quantizer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, D + 1)), jnp.ones((1, 2, 2)))
  with pytest.raises(ValueError, match="weight_mask"):
    quantizer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, D)), jnp.ones((1, 2)))


def test_official_fixture_train_step(official_dqvae):
  f = official_dqvae
  k = f["sd/quantize.codebook.cluster_size_ema"].shape[0]
  state = {"embedding": f["sd/quantize.codebook.weight"][:-1],
           "cluster_size": f["sd/quantize.codebook.cluster_size_ema"],
           "embed_sum": f["sd/quantize.codebook.embed_ema"]}
  z = f["z"].transpose(0, 2, 3, 1)
  mask = f["codebook_mask"][:, 0]
  quantizer = EMAVectorQuantizer(k, z.shape[-1], restart_unused_codes=False)
  (quant, codes, aux), new = apply_quantizer(quantizer, state, z, mask, True)
  np.testing.assert_array_equal(codes, f["codes"])
  np.testing.assert_allclose(quant, f["vq_train_quant"].transpose(0, 2, 3, 1), atol=1e-6)
  np.testing.assert_allclose(aux["codebook_loss"], f["vq_train_loss"], rtol=1e-5)
  got = new
  np.testing.assert_allclose(got["cluster_size"], f["vq_train_after/codebook.cluster_size_ema"],
                             rtol=1e-6)
  np.testing.assert_allclose(got["embed_sum"], f["vq_train_after/codebook.embed_ema"], atol=1e-6)
  np.testing.assert_allclose(got["embedding"], f["vq_train_after/codebook.weight"][:-1],
                             atol=1e-6)


def test_ema_update_is_global_under_a_sharded_batch():
  devices = np.array(jax.devices())
  assert devices.size == 8  # conftest: 8 fake CPU devices
  mesh = jax.sharding.Mesh(devices, ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state = make_state(9)
  z = np.random.RandomState(10).randn(8, 2, 2, D).astype(np.float32)
  mask = np.ones((8, 2, 2), np.float32)
  quantizer = EMAVectorQuantizer(K, D, restart_unused_codes=False)
  _, reference = apply_quantizer(quantizer, state, z, mask, True)
  (_, codes, _), sharded = apply_quantizer(quantizer, state, jax.device_put(z, batch_sharding),
                                           jax.device_put(mask, batch_sharding), True)
  assert len(codes.sharding.device_set) == 8
  for name in ("cluster_size", "embed_sum", "embedding"):
    np.testing.assert_allclose(sharded[name], reference[name], rtol=1e-6, atol=1e-7)
