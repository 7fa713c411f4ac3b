"""dq.train.run_setup with a toy state (a [16, 8] weight and its Adam moments): the mesh and
per-process batch, a fresh start (init_from applied, shardings as asked), a resume (the saved
step, values and data-iterator position; init_from not applied) and the jitted step (extra
arguments, the state donated, a non-finite update not applied)."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dq import checkpoint as ckpt
from dq.train import run_setup
from dq.train.state import TrainState

TX = optax.adam(0.1)
SHARDING_CFG = {"rules": [(r"/w$", ("data", None))]}  # the weight and its moments


def init_fn(rng):
  params = {"w": jax.random.normal(rng, (16, 8))}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params),
                    codebook={}, rng=rng)


def data_iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def start(workdir, data, init_from=None):
  mesh, _ = run_setup.mesh_and_local_batch(None, 8)
  rng = jax.random.PRNGKey(0)
  shardings = run_setup.state_shardings(init_fn, rng, mesh, SHARDING_CFG)
  return mesh, shardings, run_setup.init_or_restore(
      init_fn, rng, shardings, workdir, keep=2, async_save=False, data_iterator=data,
      init_from=init_from)


def test_mesh_and_local_batch():
  mesh, local = run_setup.mesh_and_local_batch({"data": 4, "fsdp": 2}, 16)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1} and local == 16
  with pytest.raises(ValueError, match=r"config.x=12 must be divisible by the data-parallel "
                     "size 8"):
    run_setup.mesh_and_local_batch(None, 12, "config.x")


def test_fresh_start_then_resume(tmp_path):
  workdir, calls = str(tmp_path), []

  def init_from(state, abstract):
    calls.append(abstract)
    return state.replace(params={"w": state.params["w"] + 1.0})

  mesh, shardings, fresh = start(workdir, data_iterator(), init_from)
  assert not fresh.restored and int(fresh.state.step) == 0 and len(calls) == 1
  assert calls[0].params["w"].sharding.spec == P("data", None)  # the abstract has shardings
  assert fresh.state.params["w"].sharding.spec == P("data", None)
  assert fresh.state.opt_state[0].mu["w"].sharding.spec == P("data", None)
  np.testing.assert_allclose(fresh.state.params["w"],
                             jax.jit(init_fn)(jax.random.PRNGKey(0)).params["w"] + 1.0)

  data = data_iterator()
  assert [next(data) for _ in range(3)] == [0, 1, 2]
  saved = fresh.state.replace(step=jnp.asarray(5, jnp.int32),
                              params={"w": fresh.state.params["w"] * 2.0})
  ckpt.save(fresh.manager, 5, saved, data)
  fresh.manager.wait_until_finished()

  resumed_data = data_iterator()
  _, _, resumed = start(workdir, resumed_data, init_from)
  assert resumed.restored and int(resumed.state.step) == 5 and len(calls) == 1
  np.testing.assert_array_equal(resumed.state.params["w"], saved.params["w"])
  assert resumed.state.params["w"].sharding.spec == P("data", None)
  assert next(resumed_data) == 3  # the data order goes on where the checkpoint left it
  assert resumed.manager.latest_step() == 5


def test_jit_train_step_extra_args_and_nonfinite_guard(tmp_path):
  mesh, shardings, run = start(str(tmp_path), data_iterator())

  def update_fn(state, batch, scale):
    loss = jnp.mean(batch) * scale
    return state.replace(step=state.step + 1,
                         params={"w": state.params["w"] + loss}), {"loss": loss}

  step = run_setup.jit_train_step(update_fn, mesh, shardings,
                                  extra_in_shardings=(jax.sharding.NamedSharding(mesh, P()),))
  w = np.asarray(run.state.params["w"])
  state, metrics = step(run.state, jnp.ones((8, 2)), jnp.float32(2.0))
  assert run.state.params["w"].is_deleted()  # the state is donated
  assert int(state.step) == 1 and float(metrics["finite"]) == 1.0
  assert state.params["w"].sharding.spec == P("data", None)
  assert metrics["loss"].sharding.is_fully_replicated
  np.testing.assert_allclose(state.params["w"], w + 2.0)
  kept, metrics = step(state, jnp.ones((8, 2)), jnp.float32(np.inf))
  assert int(kept.step) == 2 and float(metrics["finite"]) == 0.0
  np.testing.assert_allclose(kept.params["w"], w + 2.0)  # the non-finite update is not applied
