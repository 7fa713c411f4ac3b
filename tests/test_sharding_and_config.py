"""Mesh construction, batch sharding, config files and config args."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from dq import sharding as sh
from dq.configs import parse_arg
from dq.train.optim import make_schedule

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_mesh_sizes():
  assert jax.device_count() == 8
  assert dict(sh.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sh.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sh.make_mesh({"data": 2, "tensor": 2, "fsdp": -1}).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices"):
    sh.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown axes"):
    sh.make_mesh({"dta": 8})


def test_shard_batch_splits_leading_axis():
  mesh = sh.make_mesh({"data": 4, "fsdp": 2})
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  y = sh.shard_batch({"x": x}, mesh)["x"]
  assert len(y.addressable_shards) == 8
  assert all(s.data.shape == (2, 3) for s in y.addressable_shards)
  np.testing.assert_array_equal(np.asarray(y), x)


def test_parse_arg():
  arg = parse_arg("tiny,steps=7", tiny=False, steps=1, router="feature")
  assert arg.tiny is True and arg.steps == 7 and arg.router == "feature"
  with pytest.raises(ValueError, match="'tyni' unknown"):
    parse_arg("tyni", tiny=False)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*_vae.py"))))
def test_every_vae_config_builds_a_valid_model(path):
  from dq.models.build import build_dqvae
  for arg in (None, "tiny"):
    config = load_config(path, arg) if "demo" not in path else load_config(path)
    assert config.stage == "vae"
    thresholds = (0.5,) if config.model.router.kind == "entropy" else ()
    build_dqvae(config.model, entropy_thresholds=thresholds)  # validates fields


def test_paper_config_matches_official_hyperparameters():
  config = load_config(os.path.join(CONFIG_DIR, "ffhq_vae.py"))
  m = config.model
  assert (m.resolution, m.ch, tuple(m.ch_mult), m.num_res_blocks) == (256, 128, (1, 1, 2, 2, 4), 2)
  assert (m.codebook_size, m.embed_dim, m.z_channels) == (1024, 256, 256)
  assert (m.dec_ch, tuple(m.dec_ch_mult), tuple(m.dec_attn_resolutions)) == (128, (1, 1, 2, 2), (32,))
  assert m.router.fine_ratio == 0.5 and config.loss.budget_gamma == 10.0
  assert (config.optim.b1, config.optim.b2) == (0.5, 0.9)


def test_schedule_warmup_then_cosine():
  s = make_schedule(1.0, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.5 * (1 + np.cos(np.pi * 0.5)), atol=1e-6)
  np.testing.assert_allclose(s(110), 0.0, atol=1e-6)


def test_fsdp_and_rule_shardings():
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  mesh = sh.make_mesh({"data": 2, "fsdp": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  tree = {"dense": {"kernel": jnp.zeros((64, 512)), "bias": jnp.zeros((512,))},
          "odd": {"kernel": jnp.zeros((33, 35))},
          "emb": {"embedding": jnp.zeros((1000, 64))},
          "opt": {"mu": {"dense": {"kernel": jnp.zeros((64, 512))}}}}
  shardings = sh.tree_shardings(tree, mesh, rules=[("emb/embedding", (None, "fsdp"))],
                                fsdp_min_size=4096)
  assert shardings["dense"]["kernel"].spec == P(None, "fsdp")  # largest divisible dim
  assert shardings["dense"]["bias"].spec == P()                # small: replicated
  assert shardings["odd"]["kernel"].spec == P()                # no dim divisible by 4
  assert shardings["emb"]["embedding"].spec == P(None, "fsdp")  # rule beats the largest dim
  assert shardings["opt"]["mu"]["dense"]["kernel"].spec == P(None, "fsdp")
  placed = jax.device_put(tree, shardings)
  kernel = placed["dense"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sh.tree_shardings(tree, mesh, rules=[("dense/kernel", (None, "model"))])
  with pytest.raises(ValueError, match="does not divide it"):
    sh.tree_shardings(tree, mesh, rules=[("odd/kernel", ("fsdp", None))])
  with pytest.raises(ValueError, match="unknown fields"):
    sh.state_shardings_from_config(tree, mesh, {"rule": []})
  with pytest.raises(ValueError, match="sizes must be >= 1"):
    sh.make_mesh({"data": 0})
