"""Router-training options (gate gradient, given Gumbel noise, argmax training gate, router
norm, temperature anneal, entropy warm-up, expected budget, router_lr_mult, benefit target,
config checks): values against numpy / hand computations, gradients and invariants."""
import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq.configs import vae_base_config
from dq.losses.vae_loss import distill_loss, router_budget, vae_loss
from dq.models.build import build_dqvae
from dq.models.entropy import patch_entropy
from dq.models.router import (GATE_GRADIENTS, FeatureRouter, entropy_gate,
                              gumbel_straight_through, merge_grains)
from dq.train.optim import make_optimizer
from dq.train.router_control import (benefit_target, gumbel_temperature, region_l1,
                                     router_steering)
from dq.train.state import TrainState
from dq.train.vae_step import make_update_fn
from stage1_util import random_variables, tiny_model_config
from test_validate import failures, load_config

IMAGE, PATCH, BATCH = 16, 4, 2  # 16 px, coarse factor 4: 4x4 coarse and 8x8 fine grids
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _np_up(a, factor):
  return np.repeat(np.repeat(a, factor, 1), factor, 2)


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _model_cfg():
  cfg = tiny_model_config()
  cfg.update(dict(resolution=IMAGE, ch_mult=(1, 1, 2), num_res_blocks=0, dec_ch_mult=(1, 2)))
  return cfg


def _images(seed=0):
  """Noise with a random amplitude per coarse region: a spread of region entropies."""
  rng = np.random.default_rng(seed)
  amp = _np_up(rng.uniform(0.02, 1.0, (BATCH, IMAGE // PATCH, IMAGE // PATCH, 1)), PATCH)
  return jnp.asarray((amp * rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3))).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _train_fn(model):
  def apply(variables, x, key, steer):
    out, _ = model.apply(variables, x, train=True, mutable=["codebook"],
                         rngs={"gumbel": key, "codebook": key}, **steer)
    return out
  return jax.jit(apply)


@pytest.fixture(scope="module")
def tiny():
  cfg = _model_cfg()
  model = build_dqvae(cfg)
  assert (model.router_norm, model.gate_gradient, model.train_gate) == (
      "group", "official", "gumbel")  # the paper recipe is the default
  return types.SimpleNamespace(cfg=cfg, model=model, x=_images(),
                               variables=random_variables(model, cfg, seed=0))


@pytest.mark.parametrize("num_grains", [2, 3])
def test_merge_grains_gate_gradient_official_vs_both(num_grains):
  rng = np.random.default_rng(num_grains)
  coarse, channels = 2, 3
  taps = [jnp.asarray(rng.normal(size=(2, coarse * 2**g, coarse * 2**g, channels)),
                      jnp.float32) for g in range(num_grains)]
  grain = rng.integers(0, num_grains, (2, coarse, coarse))
  grain.flat[:num_grains] = np.arange(num_grains)  # every grain is chosen somewhere
  gate = jnp.asarray(np.eye(num_grains, dtype=np.float32)[grain])
  fine = taps[-1].shape[1]
  dy = jnp.asarray(rng.normal(size=(2, fine, fine, channels)), jnp.float32)
  forward = {m: np.asarray(merge_grains(taps, gate, m)) for m in GATE_GRADIENTS}
  np.testing.assert_array_equal(forward["official"], forward["both"])
  grads = {m: np.asarray(jax.grad(lambda g, m=m: jnp.sum(merge_grains(taps, g, m) * dy))(gate))
           for m in GATE_GRADIENTS}
  f = fine // coarse  # fine cells per coarse region side
  per_grain = np.stack([(_np_up(np.asarray(t), fine // t.shape[1]) * np.asarray(dy)).sum(-1)
                        .reshape(2, coarse, f, coarse, f).sum((2, 4)) for t in taps], -1)
  np.testing.assert_allclose(grads["both"], per_grain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["official"], per_grain * np.asarray(gate), rtol=1e-5,
                             atol=1e-5)
  assert np.all(grads["official"][np.asarray(gate) == 0] == 0.0)
  assert np.abs(per_grain[np.asarray(gate) == 0]).min() > 1e-3  # 'both' gives them gradient
  with pytest.raises(ValueError, match="gate_gradient"):
    merge_grains(taps, gate, "max")


def test_gumbel_with_given_noise_forward_and_gradient():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 3)), jnp.float32)
  noise = jnp.asarray(rng.gumbel(size=logits.shape), jnp.float32)
  temperature, w = 0.7, jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
  hard, _ = gumbel_straight_through(logits, None, temperature, noise=noise)
  z = np.asarray(logits + noise)
  np.testing.assert_array_equal(hard, np.eye(3)[z.argmax(-1)])
  assert (z.argmax(-1) != np.asarray(logits).argmax(-1)).any()  # the noise matters here
  grad = jax.grad(lambda l: jnp.sum(gumbel_straight_through(l, None, temperature, noise)[0]
                                    * w))(logits)
  s, w = _np_softmax(z / temperature), np.asarray(w)
  want = s * (w - (s * w).sum(-1, keepdims=True)) / temperature  # softmax Jacobian (symmetric)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="noise shape"):
    gumbel_straight_through(logits, None, 1.0, noise=noise[..., :2])


def test_dqvae_given_noise_and_argmax_train_gate(tiny):
  shape = (BATCH, IMAGE // PATCH, IMAGE // PATCH, 2)
  noise = jax.random.gumbel(jax.random.PRNGKey(7), shape)
  keys = [jax.random.PRNGKey(1), jax.random.PRNGKey(2)]
  train = _train_fn(tiny.model)
  noisy = [train(tiny.variables, tiny.x, k, {"gumbel_noise": noise}) for k in keys]
  for out in noisy:
    want = np.eye(2)[np.asarray(out["gate_logits"] + noise).argmax(-1)]
    np.testing.assert_array_equal(out["gate"], want)
  np.testing.assert_array_equal(noisy[0]["gate"], noisy[1]["gate"])
  drawn = [train(tiny.variables, tiny.x, k, {})["gate"] for k in keys]
  assert not np.array_equal(drawn[0], drawn[1])  # without given noise the rng does matter
  eval_gate = jax.jit(lambda v, x: tiny.model.apply(v, x)["gate"])(tiny.variables, tiny.x)
  argmax_model = tiny.model.clone(train_gate="argmax")
  for k in keys:
    np.testing.assert_array_equal(_train_fn(argmax_model)(tiny.variables, tiny.x, k, {})["gate"],
                                  eval_gate)


def _router_setup(norm, channels=4, groups=2, seed=0):
  rng = np.random.default_rng(seed)
  taps = [jnp.asarray(rng.normal(size=(2, 2 * 2**g, 2 * 2**g, channels)) + 0.5, jnp.float32)
          for g in range(2)]
  router = FeatureRouter(2, channels, norm_groups=groups, norm=norm)
  shapes = jax.eval_shape(router.init, jax.random.PRNGKey(0), taps)["params"]
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5, shapes)
  return router, taps, params


def _np_router_head(pieces, params):
  h = np.concatenate(pieces, -1) @ params["gate_0"]["kernel"] + params["gate_0"]["bias"]
  h = h / (1 + np.exp(-h))
  return h @ params["gate_2"]["kernel"] + params["gate_2"]["bias"]


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_router_norm_layer_and_none_match_numpy(norm):
  router, taps, params = _router_setup(norm)
  _, _, group_params = _router_setup("group")
  norm_keys = {k for k in params if k.startswith("feature_norm_")}
  if norm == "none":
    assert not norm_keys
  else:
    assert norm_keys == {"feature_norm_coarse", "feature_norm_fine"}
    assert (jax.tree.map(np.shape, params) == jax.tree.map(np.shape, group_params))
  pieces = []
  for name, tap in zip(("coarse", "fine"), taps):
    h = np.asarray(tap, np.float64)
    if norm == "layer":
      h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
      h = h * params[f"feature_norm_{name}"]["scale"] + params[f"feature_norm_{name}"]["bias"]
    f = h.shape[1] // 2
    pieces.append(h.reshape(2, 2, f, 2, f, -1).mean((2, 4)))
  got = router.apply({"params": params}, taps)
  np.testing.assert_allclose(got, _np_router_head(pieces, params), rtol=1e-4, atol=1e-4)


def test_router_norm_invariances():
  """GroupNorm with one channel per group removes a per-image constant per channel; LayerNorm
  removes a per-position constant shared by the channels; 'none' removes neither."""
  rng = np.random.default_rng(3)
  per_channel = jnp.asarray(rng.normal(size=(2, 1, 1, 4)) * 3, jnp.float32)
  per_position = jnp.asarray(rng.normal(size=(2, 4, 4, 1)) * 3, jnp.float32)
  invariant = {"group": "channel", "layer": "position", "none": None}
  for norm, kind in invariant.items():
    router, taps, params = _router_setup(norm, groups=4)  # 4 channels, 4 groups
    base = np.asarray(router.apply({"params": params}, taps))
    for name, offset in (("channel", per_channel), ("position", per_position)):
      shifted = np.asarray(router.apply({"params": params}, [taps[0], taps[1] + offset]))
      if name == kind:
        np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4, err_msg=norm)
      else:
        assert np.abs(shifted - base).max() > 1e-2, (norm, name)


def test_gumbel_temperature_schedule():
  cfg = ml_collections.ConfigDict(dict(gumbel_temperature=2.0, gumbel_temperature_end=0.5,
                                       temperature_steps=0))
  for step in (0, 10, 10_000):
    assert float(gumbel_temperature(cfg, jnp.asarray(step))) == 2.0
  cfg.temperature_steps = 100
  for step in (0, 25, 50, 99, 100, 101, 5000):
    want = 2.0 * (0.25 ** (min(step, 100) / 100))
    np.testing.assert_allclose(gumbel_temperature(cfg, jnp.asarray(step)), want, rtol=1e-6)
  np.testing.assert_allclose(gumbel_temperature(cfg, 50), 1.0, rtol=1e-6)  # geometric midpoint


def test_entropy_warmup_routes_by_teacher_then_router(tiny):
  router_cfg = ml_collections.ConfigDict(tiny.cfg.router.to_dict())
  router_cfg.warmup_steps = 5
  loss_cfg = vae_base_config().loss
  loss_cfg.router_distill_weight = 0.7
  entropy = np.asarray(patch_entropy(tiny.x, PATCH))
  threshold = float(np.median(entropy))
  teacher_want = np.eye(2)[(entropy > threshold).astype(int)]
  noise = jax.random.gumbel(jax.random.PRNGKey(3), teacher_want.shape)
  for step in (0, 4, 5, 9):
    steer, teacher, weight = router_steering(router_cfg, jnp.asarray(step), tiny.x,
                                             (threshold,), PATCH)
    np.testing.assert_array_equal(teacher, teacher_want)
    np.testing.assert_array_equal(teacher, entropy_gate(jnp.asarray(entropy), (threshold,)))
    out = _train_fn(tiny.model)(tiny.variables, tiny.x, jax.random.PRNGKey(step),
                                {**steer, "gumbel_noise": noise})
    own = np.eye(2)[np.asarray(out["gate_logits"] + noise).argmax(-1)]
    assert not np.array_equal(own, teacher_want)  # the two routings differ: a real check
    np.testing.assert_array_equal(out["gate"], teacher_want if step < 5 else own)
    assert float(weight) == (1.0 if step < 5 else 0.0)
    total, terms = vae_loss(tiny.x, out, loss_cfg=loss_cfg, router_cfg=router_cfg,
                            num_grains=2, teacher_gate=teacher, teacher_weight=weight)
    log_p = np.log(_np_softmax(np.asarray(out["gate_logits"], np.float64)))
    np.testing.assert_allclose(terms["router_distill"],
                               -np.mean((teacher_want * log_p).sum(-1)), rtol=1e-5)
    want = (terms["l1"] + terms["codebook"] + terms["budget"]
            + 0.7 * float(weight) * terms["router_distill"])
    np.testing.assert_allclose(total, want, rtol=1e-6)
  with pytest.raises(ValueError, match="thresholds"):
    router_steering(router_cfg, jnp.asarray(0), tiny.x, (), PATCH)


def test_distill_loss_is_cross_entropy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
  teacher = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 3, 3))]
  want = -np.mean(np.log(_np_softmax(logits.astype(np.float64)))[teacher == 1])
  np.testing.assert_allclose(distill_loss(jnp.asarray(logits), jnp.asarray(teacher)), want,
                             rtol=1e-6)
  grad = jax.grad(distill_loss)(jnp.asarray(logits), jnp.asarray(teacher))
  np.testing.assert_allclose(grad, (_np_softmax(logits) - teacher) / 18, rtol=1e-4, atol=1e-7)


def _budget(logits, key, budget_on, num_grains, calculate_all=True):
  loss_cfg = ml_collections.ConfigDict(dict(budget_on=budget_on, budget_gamma=10.0,
                                            budget_calculate_all=calculate_all,
                                            budget_triple="official"))
  router_cfg = ml_collections.ConfigDict(dict(fine_ratio=0.3, median_ratio=0.2))
  outputs = {"gate": gumbel_straight_through(logits, key)[0], "gate_logits": logits}
  return router_budget(outputs, loss_cfg, router_cfg, num_grains)


def test_expected_budget_matches_numpy_and_ignores_noise():
  rng = np.random.default_rng(5)
  keys = [jax.random.PRNGKey(i) for i in range(4)]
  for num_grains in (2, 3):
    logits = jnp.asarray(rng.normal(size=(2, 3, 3, num_grains)) * 0.5, jnp.float32)
    p, n = _np_softmax(np.asarray(logits, np.float64)), 9
    if num_grains == 2:
      r = ((p[..., 0] + 4 * p[..., 1]).sum((1, 2)).mean() - n) / (3 * n)
      want = 2 * 10.0 * (r - 0.3) ** 2  # official calculate_all: the term twice
      np.testing.assert_allclose(_budget(logits, keys[0], "expected", 2, False),
                                 10.0 * (r - 0.3) ** 2, rtol=1e-5)
    else:
      r_m = ((p[..., 0] + 4 * p[..., 1] + p[..., 2]).sum((1, 2)).mean() - n) / (3 * n)
      r_f = ((p[..., 0] + p[..., 1] + 16 * p[..., 2]).sum((1, 2)).mean() - n) / (15 * n)
      want = 10.0 * (r_f - 0.3) ** 2 + (r_m - 0.2) ** 2
    for on in ("expected", "hard"):
      values, grads = zip(*[jax.value_and_grad(_budget)(logits, k, on, num_grains)
                            for k in keys])
      if on == "expected":
        for value, grad in zip(values, grads):
          np.testing.assert_allclose(value, want, rtol=1e-5)
          np.testing.assert_array_equal(value, values[0])
          np.testing.assert_array_equal(grad, grads[0])
      else:
        assert len({float(v) for v in values}) > 1  # the sampled gate changes the value
  with pytest.raises(ValueError, match="budget_on"):
    _budget(logits, keys[0], "soft", 3)


def test_expected_budget_of_model_outputs_ignores_rng(tiny):
  outs = [_train_fn(tiny.model)(tiny.variables, tiny.x, jax.random.PRNGKey(i), {})
          for i in (1, 2)]
  loss_cfg = vae_base_config().loss
  budgets = {}
  for on in ("expected", "hard"):
    loss_cfg.budget_on = on
    budgets[on] = [float(router_budget(o, loss_cfg, tiny.cfg.router, 2)) for o in outs]
  assert budgets["expected"][0] == budgets["expected"][1]
  p = _np_softmax(np.asarray(outs[0]["gate_logits"], np.float64))
  np.testing.assert_allclose(budgets["expected"][0], 20.0 * (p[..., 1].mean() - 0.5) ** 2,
                             rtol=1e-4)
  assert budgets["hard"][0] != budgets["hard"][1]


def test_router_lr_mult_scales_only_router_updates():
  rng = np.random.default_rng(6)
  draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {"router": {"gate_0": {"kernel": draw(3, 3), "bias": draw(3)}},
            "encoder": {"conv_in": {"kernel": draw(2, 2)}}}
  grads = jax.tree.map(lambda p: draw(*p.shape), params)
  cfg = vae_base_config().optim
  cfg.update(dict(lr=0.01, schedule="constant", eps=1e-3))

  def updates(mult):
    cfg.router_lr_mult = mult
    tx, _ = make_optimizer(cfg, 10)
    return jax.tree.map(np.asarray, tx.update(grads, tx.init(params), params)[0])

  base = updates(1.0)
  g = jax.tree.map(np.asarray, grads)  # first Adam step: -lr * g / (|g| + eps)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.01 * g / (np.abs(g) + 1e-3),
                                                       rtol=1e-5), base, g)
  for mult in (0.1, 3.0):
    scaled = updates(mult)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, mult * b, rtol=1e-6),
                 scaled["router"], base["router"])
    jax.tree.map(np.testing.assert_array_equal, scaled["encoder"], base["encoder"])
    assert not np.allclose(scaled["router"]["gate_0"]["kernel"], base["router"]["gate_0"]["kernel"])


def test_benefit_target_by_hand():
  rng = np.random.default_rng(8)
  x, xrec, flipped = (rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32) for _ in range(3))
  grain = rng.integers(0, 2, (2, 2, 2))
  l1 = lambda y: np.abs(x - y).mean(-1).reshape(2, 2, 4, 2, 4).mean((2, 4))
  np.testing.assert_allclose(region_l1(x, xrec, 4), l1(xrec), rtol=1e-6)
  main, other = l1(xrec), l1(flipped)
  want_benefit = np.where(grain == 1, other, main) - np.where(grain == 1, main, other)
  for ratio in (0.0, 0.25, 0.5, 0.75, 1.0):
    target, benefit = benefit_target(x, xrec, flipped, jnp.asarray(grain), ratio, 4)
    np.testing.assert_allclose(benefit, want_benefit, rtol=1e-5, atol=1e-6)
    k = round(ratio * 8)
    want = np.zeros(8)
    want[np.argsort(want_benefit.ravel())[8 - k:]] = 1
    np.testing.assert_array_equal(np.asarray(target)[..., 1].ravel(), want, err_msg=str(ratio))
    np.testing.assert_array_equal(np.asarray(target).sum(-1), 1.0)


def _step_metrics_and_updates(tiny, benefit_weight):
  config = vae_base_config()
  config.loss.router_benefit_weight = benefit_weight
  config.optim.update(dict(lr=1.0, eps=1.0, schedule="constant"))  # update ~ linear in grad
  tx, schedule = make_optimizer(config.optim, 10)
  params = tiny.variables["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     codebook=tiny.variables["codebook"], rng=jax.random.PRNGKey(0))
  update_fn = make_update_fn(tiny.model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=tiny.cfg.router, num_grains=2)
  batch = {"image": tiny.x}
  new, metrics = jax.jit(update_fn).lower(state, batch, {}).compile(FAST_COMPILE)(
      state, batch, {})
  return jax.device_get(metrics), jax.device_get(jax.tree.map(jnp.subtract, new.params, params))


def test_benefit_loss_in_the_update_step(tiny):
  metrics0, updates0 = _step_metrics_and_updates(tiny, 0.0)
  metrics1, updates1 = _step_metrics_and_updates(tiny, 1.0)
  assert tiny.cfg.router.kind == "feature"  # the budget's target is logged next to the ratio
  np.testing.assert_allclose(metrics0["fine_ratio_target"], tiny.cfg.router.fine_ratio)
  assert "loss_router_benefit" not in metrics0
  benefit = float(metrics1["loss_router_benefit"])
  assert np.isfinite(benefit) and benefit > 0
  np.testing.assert_allclose(metrics1["loss"], metrics0["loss"] + benefit, rtol=1e-5)
  change = lambda key: max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(updates1[key]), jax.tree.leaves(updates0[key])))
  assert change("router") > 1e-4  # the benefit cross-entropy trains the router ...
  for key in ("decoder", "post_quant_conv", "quant_conv"):  # ... not the decoder side
    assert change(key) < 1e-6, key
  triple = _model_cfg()
  triple.update(dict(num_grains=3, ch_mult=(1, 1, 2, 2)))
  config = vae_base_config()
  config.loss.router_benefit_weight = 1.0
  with pytest.raises(ValueError, match="dual-grain"):
    make_update_fn(build_dqvae(triple), None, None, loss_cfg=config.loss,
                   router_cfg=triple.router, num_grains=3)


@pytest.mark.parametrize("field,value,line", [
    ("model.router.norm", "batch", "config.model: model config field 'router.norm' = 'batch': "
     "must be one of ('group', 'layer', 'none')"),
    ("model.router.gate_gradient", "max", "config.model: model config field "
     "'router.gate_gradient' = 'max': must be one of ('official', 'both')"),
    ("model.router.train_gate", "soft", "config.model: model config field 'router.train_gate' "
     "= 'soft': must be one of ('gumbel', 'argmax')"),
    ("loss.budget_on", "soft", "config.loss.budget_on = 'soft': expected one of ('hard', "
     "'expected')"),
    ("loss.budget_triple", "plain", "config.loss.budget_triple = 'plain': expected one of "
     "('official', 'fractions')"),
    ("model.router.warmup_steps", -1, "config.model.router.warmup_steps = -1: expected an int "
     ">= 0"),
    ("loss.router_benefit_weight", -1.0, "config.loss.router_benefit_weight = -1.0: expected a "
     "number >= 0.0")])
def test_validate_names_bad_router_fields(field, value, line):
  config = load_config("demo_vae.py")
  config.update_from_flattened_dict({field: value})
  assert line in failures(config)


def test_validate_refuses_the_benefit_target_for_triple_grain():
  config = load_config("ffhq_vae.py", "triple,tiny")
  assert not any("router_benefit_weight" in f for f in failures(config))
  config.loss.router_benefit_weight = 1.0
  assert any(f.startswith("config.loss.router_benefit_weight = 1.0: expected 0 for a "
                          "triple-grain model") for f in failures(config))
