"""Model FLOPs, device peaks and MFU."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from dq.stage2.layout import TokenLayout
from dq.stage2.transformer import StackedTransformer
from dq.train import throughput


def test_transformer_flops_count_every_matmul():
  layout = TokenLayout(coarse_size=2, fine_size=4, codebook_size=8)
  model = StackedTransformer(
      vocab_size=layout.content_vocab_size, coarse_position_size=layout.coarse_position_vocab_size,
      fine_position_size=layout.fine_position_vocab_size, segment_size=2, block_size=19,
      position_layers=1, content_layers=2, n_head=2, n_embd=16)
  dummy = jnp.zeros((1, 20), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), dummy, dummy, dummy, method="forward_packed")
  # Every Dense kernel is a matmul weight: 2 FLOPs per weight per token forward.
  kernels = sum(np.size(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if "kernel" in jax.tree_util.keystr(path))
  attention = 3 * 2 * 2 * 19 * 16  # 3 layers, QK^T and AV at context 19
  expected = 3 * (2 * kernels + attention)
  assert throughput.model_flops_per_token(model, 19) == expected


def test_peaks_and_mfu():
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  v5e = types.SimpleNamespace(device_kind="TPU v5 lite")
  assert throughput.device_peak_flops(h100) == 989e12
  assert throughput.device_peak_flops(v5e) == 197e12
  assert throughput.device_peak_flops(jax.devices()[0]) is None  # CPU
  assert throughput.mfu(989e12, 0.5, [h100, h100]) == 0.25
  assert throughput.mfu(1e12, 1.0, jax.devices()) is None


def test_compiled_flops_of_a_matmul():
  fn = jax.jit(lambda a, b: a @ b)
  flops = throughput.compiled_flops(fn, jnp.ones((8, 16)), jnp.ones((16, 4)))
  assert flops == 2 * 8 * 16 * 4  # XLA:CPU reports its cost analysis


def test_vae_step_benchmark_splits_a_small_batch_over_fewer_devices():
  """benchmarks/vae_step.py's default batch 2 on the 8 test devices: a batch that the devices
  do not divide runs on gcd(batch, devices) of them instead of raising IndivisibleError."""
  import importlib.util
  import os

  import pytest

  from dq import sharding as sh
  path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "vae_step.py")
  spec = importlib.util.spec_from_file_location("vae_step_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert jax.device_count() == 8
  images = {"image": np.zeros((2, 4, 4, 3), np.float32)}
  with pytest.raises(Exception, match="partitioned 8 times"):  # all 8 devices, batch 2
    jax.block_until_ready(sh.shard_batch(images, sh.make_mesh({"data": -1})))
  assert [len(bench.bench_devices(b)) for b in (2, 6, 8, 16, 3)] == [2, 2, 8, 8, 1]
  mesh = sh.make_mesh({"data": -1}, devices=bench.bench_devices(2))
  sharded = sh.shard_batch(images, mesh)["image"]
  assert sharded.shape == (2, 4, 4, 3) and len(sharded.sharding.device_set) == 2
