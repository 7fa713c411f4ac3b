"""One train step on every mesh shape equals the single-device step; FSDP and tensor
parallelism really shard; activations stay split over the batch; checkpoints move between
meshes."""
import functools
import math

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dq import sharding as sh
from dq.configs import tensor_parallel_rules
from dq.models.build import build_dqvae
from dq import checkpoint as ckpt
from dq.train.optim import make_optimizer
from dq.train.state import abstract_with_shardings
from dq.train.vae_step import make_update_fn
from dq.train.vae_trainer import make_discriminator, make_init_fn
from test_train_vae import tiny_config

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
SHARDING = {"fsdp_min_size": 2048}  # small enough that the tiny model's big kernels shard
# Adam with eps 1e-3 keeps the first update ~linear in the gradient, so float reduction-order
# differences between meshes stay at float32 rounding level instead of flipping update signs.
RTOL, ATOL = 2e-4, 2e-6
# Tiny steps compared with each other: skipping LLVM's expensive passes halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config():
  config = tiny_config(1)
  config.optim.update(dict(lr=1e-2, eps=1e-3))
  config.loss.update(dict(disc_weight=0.75, disc_start=0, disc_ndf=8, disc_layers=2))
  return config


def _images():
  return np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)


def _setup(config, mesh):
  model = build_dqvae(config.model)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  discriminator, disc_tx = make_discriminator(config)
  init_fn = make_init_fn(model, tx, 32, discriminator, disc_tx)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh, SHARDING)
  state = jax.jit(init_fn, out_shardings=shardings).lower(rng).compile(FAST_COMPILE)(rng)
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router, num_grains=2,
                             discriminator=discriminator, disc_tx=disc_tx,
                             activation_sharding=sh.batch_sharding(mesh))
  repl = sh.replicated(mesh)
  step = jax.jit(update_fn, in_shardings=(shardings, sh.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl))
  return init_fn, rng, shardings, state, step


def _one_step(mesh):
  _, _, shardings, state, step = _setup(_config(), mesh)
  batch = sh.shard_batch({"image": _images()}, mesh)
  state, metrics = step.lower(state, batch, {}).compile(FAST_COMPILE)(state, batch, {})
  return state, jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single_device():
  state, metrics, _ = _one_step(sh.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  return jax.device_get(state), metrics


@pytest.mark.parametrize("data,fsdp", MESHES)
def test_stage1_step_is_mesh_invariant(single_device, data, fsdp):
  reference_state, reference_metrics = single_device
  state, metrics, shardings = _one_step(sh.make_mesh({"data": data, "fsdp": fsdp}))
  for name in ("loss", "loss_l1", "loss_codebook", "loss_budget", "loss_generator",
               "disc_loss"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=RTOL, err_msg=name)
  kernel = state.params["decoder"]["conv_out"]["kernel"]
  if fsdp > 1:  # the biggest kernels are split over fsdp, small arrays replicated
    big = state.params["encoder"]["down_3"]["block_0"]["conv2"]["kernel"]
    assert "fsdp" in big.sharding.spec
    assert {s.data.size for s in big.addressable_shards} == {big.size // fsdp}
  assert kernel.sharding.is_fully_replicated
  got, expected = jax.device_get((state.params, state.codebook, state.disc_params)), (
      reference_state.params, reference_state.codebook, reference_state.disc_params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


def test_checkpoint_moves_between_meshes(tmp_path):
  config = _config()
  _, _, _, state, _ = _setup(config, sh.make_mesh({"data": 2, "fsdp": 4}))
  manager = ckpt.make_manager(str(tmp_path), async_save=False)
  ckpt.save(manager, 1, state, None)
  other = sh.make_mesh({"data": 8, "fsdp": 1})
  init_fn, rng, shardings, _, _ = _setup(config, other)
  restored, step = ckpt.restore(manager, abstract_with_shardings(init_fn, rng, shardings), None)
  assert step == 1
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.sharding.mesh.shape == other.shape
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))


def _stage2_step(mesh, microbatches=1, rules=()):
  """One stage-2 step on `mesh`; returns (state, metrics, lowered text, compiled HLO text)."""
  from dq.stage2.build import build_transformer
  from dq.train import transformer_step as ts
  from stage2_util import LAYOUT, random_batch, tiny_model_config
  from dq.configs import transformer_base_config
  optim = transformer_base_config().optim
  optim.update(dict(lr=1e-2, eps=1e-3, schedule="constant", warmup_steps=0))
  model = build_transformer(tiny_model_config(), LAYOUT)
  tx, schedule = ts.make_transformer_optimizer(optim, 10)
  init_fn = ts.make_init_fn(model, tx, LAYOUT)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh,
                                             {"fsdp_min_size": 512, "rules": list(rules)})
  state = jax.jit(init_fn, out_shardings=shardings).lower(rng).compile(FAST_COMPILE)(rng)
  update_fn = ts.make_update_fn(model, tx, schedule, layout=LAYOUT, label_dropout=0.25,
                                class_conditional=True, microbatches=microbatches,
                                activation_sharding=sh.batch_sharding(mesh))
  step = jax.jit(update_fn, in_shardings=(shardings, sh.batch_sharding(mesh)),
                 out_shardings=(shardings, sh.replicated(mesh)))
  batch = sh.shard_batch(dict(random_batch(LAYOUT, 16, seed=3)), mesh)
  assert batch["content"].sharding.spec == P(sh.BATCH_AXES)  # never split over `tensor`
  lowered = step.lower(state, batch)
  compiled = lowered.compile(FAST_COMPILE)
  state, metrics = compiled(state, batch)
  return state, jax.device_get(metrics), lowered.as_text(), compiled.as_text()


@functools.lru_cache(maxsize=None)
def _stage2_on(data, fsdp, tensor=1, microbatches=1):
  """`_stage2_step` on the first data x fsdp x tensor devices (tensor > 1: the tensor-parallel
  rules), computed once per mesh shape for the tests below."""
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = sh.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, devices)
  rules = tensor_parallel_rules("transformer") if tensor > 1 else ()
  return _stage2_step(mesh, microbatches, rules)


@pytest.fixture(scope="module")
def stage2_single_device():
  state, metrics, _, _ = _stage2_on(1, 1)
  return jax.device_get(state), metrics


def _assert_stage2_matches(reference, state, metrics):
  reference_state, reference_metrics = reference
  for name in ("loss", "content_loss", "coarse_position_loss", "fine_position_loss",
               "content_accuracy", "position_accuracy", "grad_norm", "null_label_fraction"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=RTOL, err_msg=name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                          jax.tree.leaves(reference_state.params)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("data,fsdp,microbatches", [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1),
                                                    (1, 1, 4), (2, 4, 2)])
def test_stage2_step_is_mesh_and_microbatch_invariant(stage2_single_device, data, fsdp,
                                                      microbatches):
  state, metrics, _, _ = _stage2_on(data, fsdp, 1, microbatches)
  _assert_stage2_matches(stage2_single_device, state, metrics)
  if fsdp > 1:
    mlp = state.params["content_block_0"]["mlp_fc"]["kernel"]  # [32, 128]
    assert "fsdp" in mlp.sharding.spec
    assert {s.data.size for s in mlp.addressable_shards} == {mlp.size // fsdp}


@pytest.mark.parametrize("data,fsdp", [(2, 2), (4, 1)])
def test_stage2_tensor_parallel_step_matches_single_device(stage2_single_device, data, fsdp):
  state, metrics, _, _ = _stage2_on(data, fsdp, tensor=2)
  _assert_stage2_matches(stage2_single_device, state, metrics)
  block = state.params["content_block_0"]
  expected = {  # Megatron: column-parallel in, row-parallel out; FSDP on the other dimension
      ("attn", "query", "kernel"): P("fsdp", "tensor"),
      ("attn", "value", "bias"): P("tensor"),
      ("attn", "proj", "kernel"): P("tensor", "fsdp"),
      ("mlp_fc", "kernel"): P("fsdp", "tensor"),
      ("mlp_proj", "kernel"): P("tensor", "fsdp"),
  }
  for path, spec in expected.items():
    array = functools.reduce(lambda node, key: node[key], path, block)
    assert array.sharding.spec == spec, path
    assert {s.data.size for s in array.addressable_shards} == {
        array.size // math.prod(dict(array.sharding.mesh.shape)[a] for a in spec if a)}, path
  embedding = state.params["content_emb"]["embedding"]  # [V, C]: C over fsdp x tensor
  assert embedding.sharding.spec == P(None, ("fsdp", "tensor"))
  assert {s.data.shape for s in embedding.addressable_shards} == {
      (embedding.shape[0], embedding.shape[1] // (2 * fsdp))}
  moment = state.opt_state[1][0].mu["content_block_0"]["mlp_proj"]["kernel"]
  assert moment.sharding.spec == P("tensor", "fsdp")  # the optimizer state follows the rules


def test_stage2_logits_stay_split_over_the_batch():
  """On mesh (4, 2) the [B, T, V] and [B, T, P] logits carry a batch sharding constraint and
  no device ever holds them whole (no full-batch logits buffer in the compiled step)."""
  from stage2_util import LAYOUT
  _, _, lowered, compiled = _stage2_on(4, 2)
  steps = LAYOUT.max_len - 1
  for width in (LAYOUT.content_vocab_size, LAYOUT.fine_position_vocab_size):
    full = f"tensor<16x{steps}x{width}xf32>"
    constraints = [line for line in lowered.splitlines() if full in line and (
        "sharding_constraint" in line or "@Sharding" in line)]
    assert constraints, f"no sharding constraint on the {full} logits"
    if "sdy.sharding_constraint" in constraints[0]:
      assert '[{"data", "fsdp"}, {?}, {?}]' in constraints[0], constraints[0]
    for shape in (f"f32[16,{steps},{width}]", f"f32[{16 * steps},{width}]"):
      assert shape not in compiled, f"the compiled step materialises full logits {shape}"
    assert f"f32[2,{steps},{width}]" in compiled  # 16 / (4 x 2) rows per device


def test_tensor_parallel_rules():
  mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = tensor_parallel_rules("transformer")
  spec = lambda path, shape: sh.partition_spec(path, shape, mesh, rules, fsdp_min_size=1)
  assert spec("params/position_block_3/attn/key/kernel", (64, 64)) == P("fsdp", "tensor")
  assert spec("opt_state/1/0/nu/content_block_0/mlp_proj/kernel", (256, 64)) == P(
      "tensor", "fsdp")
  assert spec("params/pos_emb", (1, 11, 64)) == P(None, None, ("fsdp", "tensor"))
  assert spec("params/position_head/linear/kernel", (64, 67)) == P(("fsdp", "tensor"), None)
  # Not covered by a rule: FSDP over the largest divisible dimension (here 64).
  assert spec("params/content_block_0/ln1/scale", (64,)) == P("fsdp")
  assert spec("params/seg_emb/embedding", (2, 64)) == P(None, ("fsdp", "tensor"))
  with pytest.raises(ValueError, match=r"mlp_fc/kernel\$.*size 33 .*over 'tensor'"):
    spec("params/content_block_0/mlp_fc/kernel", (64, 33))  # 4C not divisible by tensor
  with pytest.raises(ValueError, match="stage 'vae' has no tensor-parallel rules"):
    tensor_parallel_rules("vae")


def test_constrain_batch():
  x = np.ones((8, 6), np.float32)
  assert sh.constrain_batch(x, None) is x  # no mesh: untouched (unjitted steps)
  mesh = sh.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  weight = jax.device_put(np.ones((6, 4), np.float32),
                          jax.sharding.NamedSharding(mesh, P(None, "tensor")))
  out = jax.jit(lambda a, w: sh.constrain_batch(a @ w, sh.batch_sharding(mesh)))(x, weight)
  assert {s.data.shape[0] for s in out.addressable_shards} == {2}  # 8 rows over data = 4
  assert {s.index[0].start for s in out.addressable_shards} == {0, 2, 4, 6}
  np.testing.assert_array_equal(out, np.full((8, 4), 6.0))
  with pytest.raises(ValueError, match=r"batch axis 0 \(6\) is not divisible by the 4 devices"):
    sh.constrain_batch(np.ones((6, 3)), sh.batch_sharding(mesh))
