"""Non-finite steps: the guarded step keeps the state, the host stops with a message naming the
step, the terms and the last good checkpoint (or skips and counts); codebook-collapse warning."""
import json
import logging

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq import sharding as sh
from dq import checkpoint as ckpt
from dq.train import loop
from dq.train import vae_trainer
from test_train_vae import tiny_config


@flax.struct.dataclass
class ToyState:
  step: jnp.ndarray
  params: jnp.ndarray


def toy_update(state, scale):
  params = state.params * scale
  return state.replace(step=state.step + 1, params=params), {
      "loss": jnp.sum(params), "grad_norm": jnp.sqrt(jnp.sum(params**2))}


def test_guard_keeps_state_on_nonfinite_and_advances_step():
  step_fn = jax.jit(loop.guard_nonfinite(toy_update))
  state = ToyState(step=jnp.zeros((), jnp.int32), params=jnp.ones(3))
  good, metrics = step_fn(state, 2.0)
  np.testing.assert_array_equal(good.params, [2.0, 2.0, 2.0])
  assert float(metrics["finite"]) == 1.0
  bad, metrics = step_fn(good, jnp.inf)
  np.testing.assert_array_equal(bad.params, good.params)  # update dropped
  assert int(bad.step) == 2 and float(metrics["finite"]) == 0.0
  assert loop.nonfinite_terms(jax.device_get(metrics)) == ["grad_norm", "loss"]


class FakeManager:
  directory = "/runs/x/checkpoints"

  def latest_step(self):
    return 4


def _metrics(finite, **values):
  return {"finite": jnp.float32(finite), **{k: jnp.float32(v) for k, v in values.items()}}


def test_monitor_raises_one_step_late_naming_step_terms_and_checkpoint():
  monitor = loop.NonFiniteMonitor(FakeManager(), skip=False)
  monitor.push(5, _metrics(0, loss=np.nan, loss_l1=np.nan, grad_norm=1.0))
  with pytest.raises(FloatingPointError) as error:
    monitor.push(6, _metrics(1, loss=1.0))  # the check of step 5 runs here
  message = str(error.value)
  assert "non-finite loss, loss_l1 at step 5" in message
  assert "step 4 in /runs/x/checkpoints" in message and "skip_nonfinite" in message


def test_monitor_skip_mode_counts_and_flush_checks_the_last_step():
  monitor = loop.NonFiniteMonitor(FakeManager(), skip=True)
  monitor.push(1, _metrics(1, loss=1.0))
  monitor.push(2, _metrics(0, loss=np.inf))
  assert monitor.skipped == 0
  monitor.flush()
  assert monitor.skipped == 1
  monitor.flush()  # nothing pending
  assert monitor.skipped == 1


def test_counters_are_saved_with_a_checkpoint_and_continue_after_a_resume(tmp_path):
  train_cfg = ml_collections.ConfigDict(dict(num_steps=10, log_every=1, checkpoint_every=5,
                                             skip_nonfinite=True))
  manager = ckpt.make_manager(str(tmp_path), async_save=False)
  state = ToyState(step=jnp.int32(5), params=jnp.ones(3))
  first = loop.TrainLoop(train_cfg, manager, 0)
  first.stepped(1, _metrics(0, loss=np.nan), skipped_records=3)
  first.stepped(2, _metrics(1, loss=1.0), skipped_records=2)
  assert first.counters() == {"nonfinite_skipped": 1, "skipped_records": 5}
  ckpt.save(manager, 5, state, None, first.counters())
  manager.wait_until_finished()
  assert ckpt.restore_counters(manager, 5) == {"nonfinite_skipped": 1, "skipped_records": 5}

  resumed = loop.TrainLoop(train_cfg, ckpt.make_manager(str(tmp_path), async_save=False), 5)
  assert resumed.counters() == {"nonfinite_skipped": 1, "skipped_records": 5}
  # A new process finds the same bad files again: the count does not double.
  resumed.stepped(6, _metrics(0, loss=np.inf), skipped_records=4)
  scalars = resumed.log_scalars(6, _metrics(1, loss=1.0), batch_size=2)
  assert scalars["nonfinite_skipped"] == 2.0 and scalars["data/skipped_records"] == 5.0
  resumed.stepped(7, _metrics(1, loss=1.0), skipped_records=3)  # 7 distinct in this run
  assert resumed.counters() == {"nonfinite_skipped": 2, "skipped_records": 7}
  fresh = loop.TrainLoop(train_cfg, manager, 0)  # a run from scratch reads no counters
  assert fresh.counters() == {"nonfinite_skipped": 0, "skipped_records": 0}


def test_codebook_collapse_warning(caplog):
  with caplog.at_level(logging.WARNING):
    assert not loop.warn_codebook_collapse(0.5, 0.9, 10)
    assert loop.warn_codebook_collapse(0.95, 0.9, 10)
  assert "95% of the codebook is dead" in caplog.text


@pytest.fixture
def nan_at_step_3(monkeypatch):
  """Feeds a NaN image to the trainer's 3rd step."""
  original = sh.shard_batch
  calls = {"n": 0}

  def shard_batch(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3 and "image" in batch:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return original(batch, mesh)

  monkeypatch.setattr(sh, "shard_batch", shard_batch)


def test_trainer_stops_before_saving_a_nonfinite_state(tmp_path, nan_at_step_3):
  with pytest.raises(FloatingPointError) as error:
    vae_trainer.train_and_evaluate(tiny_config(5, checkpoint_every=2), str(tmp_path))
  message = str(error.value)
  assert "at step 3" in message and "loss" in message and "grad_norm" in message
  assert "Last good checkpoint: step 2" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_trainer_skip_mode_counts_and_warns_on_dead_codes(tmp_path, nan_at_step_3, caplog):
  config = tiny_config(4, skip_nonfinite=True, dead_code_warning=1e-6)
  with caplog.at_level(logging.WARNING):
    state = vae_trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["nonfinite_skipped"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
  assert "Step 3: non-finite" in caplog.text and "update skipped" in caplog.text
  assert "of the codebook is dead" in caplog.text
