"""Config sections that check themselves where the code reads them (build_dqvae, the stage-1
step), with the message dq.validate prints: grain targets (+ the one grain-map fine fraction),
the budget loss's fields, the learned router's schedule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq.fields import FieldError
from dq.losses.budget import BudgetLoss, budget_loss, budget_loss_triple
from dq.models.build import build_dqvae, default_model_config
from dq.models.grains import GrainTargets, fine_fraction


@pytest.mark.parametrize("kwargs,field,expectation", [
    (dict(fine=1.5), "model.router.fine_ratio", "expected a number [0.0, 1.0]"),
    (dict(fine=float("nan")), "model.router.fine_ratio", "expected a number [0.0, 1.0]"),
    (dict(fine="0.5"), "model.router.fine_ratio", "expected a number [0.0, 1.0]"),
    (dict(fine=True), "model.router.fine_ratio", "expected a number [0.0, 1.0]"),
    (dict(fine=0.5, median=-0.1, num_grains=3), "model.router.median_ratio",
     "expected a number [0.0, 1.0]"),
    (dict(fine=0.5, median=0.6, num_grains=3), "model.router.median_ratio",
     "expected median_ratio + fine_ratio <= 1 (fine_ratio 0.5; the rest is coarse)"),
    (dict(fine=0.5, num_grains=4), "model.num_grains", "expected one of (2, 3)")])
def test_grain_targets_name_the_field(kwargs, field, expectation):
  with pytest.raises(FieldError) as info:
    GrainTargets(**kwargs)
  assert (info.value.field, info.value.expectation) == (field, expectation)
  assert str(info.value).startswith(f"config.{field} = ")


def test_grain_targets_ignore_median_for_dual_grain():
  router = ml_collections.ConfigDict(dict(fine_ratio=0.25, median_ratio=0.9))
  assert GrainTargets.from_router(router, 2) == GrainTargets(0.25, 0.0, 2)
  assert GrainTargets.from_router(router, 2).median == 0.0
  with pytest.raises(FieldError, match="median_ratio \\+ fine_ratio <= 1"):
    GrainTargets.from_router(router, 3)


@pytest.mark.parametrize("num_grains,median,fine,grain", [
    (2, 0.0, 0.0, 0), (2, 0.0, 1.0, 1), (3, 0.0, 0.0, 0), (3, 1.0, 0.0, 1), (3, 0.0, 1.0, 2)])
def test_fixed_grain_from_the_targets(num_grains, median, fine, grain):
  assert GrainTargets(fine, median, num_grains).fixed_grain == grain


@pytest.mark.parametrize("num_grains,median,fine", [(2, 0.0, 0.5), (3, 0.5, 0.5), (3, 0.3, 0.0)])
def test_fixed_grain_refuses_a_mixture(num_grains, median, fine):
  with pytest.raises(FieldError, match="the fixed router codes every region at one grain"):
    GrainTargets(fine, median, num_grains).fixed_grain  # pylint: disable=expression-not-assigned


def test_build_dqvae_checks_the_grain_targets_for_every_router():
  cfg = default_model_config()
  for kind in ("feature", "fixed"):
    cfg.router.kind = kind
    cfg.router.fine_ratio = 1.25
    with pytest.raises(FieldError, match="config.model.router.fine_ratio = 1.25"):
      build_dqvae(cfg)
  cfg.router.fine_ratio = 0.5
  with pytest.raises(FieldError, match="fixed router codes every region at one grain"):
    build_dqvae(cfg)


@pytest.mark.parametrize("num_grains", [2, 3])
def test_fine_fraction_matches_numpy_on_numpy_and_jax(num_grains):
  grain = np.random.default_rng(0).integers(0, num_grains, size=(5, 4, 6))
  want = np.array([np.count_nonzero(g == num_grains - 1) / g.size for g in grain])
  np.testing.assert_allclose(fine_fraction(grain, num_grains, per_image=True), want)
  np.testing.assert_allclose(fine_fraction(grain, num_grains), want.mean())
  got = fine_fraction(jnp.asarray(grain), num_grains, per_image=True)
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _loss_cfg(**overrides):
  """The stage-1 base config's loss section with `overrides`."""
  from dq.configs import vae_base_config
  return ml_collections.ConfigDict(dict(vae_base_config().loss.to_dict(), **overrides))


@pytest.mark.parametrize("on", ["hard", "expected"])
@pytest.mark.parametrize("num_grains", [2, 3])
def test_budget_loss_from_config_equals_the_functions(on, num_grains):
  logits = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, num_grains))
  gate = jax.nn.one_hot(jnp.argmax(logits, -1), num_grains)
  outputs = {"gate": gate, "gate_logits": logits}
  targets = GrainTargets(0.3, 0.2 if num_grains == 3 else 0.0, num_grains)
  loss = BudgetLoss.from_config(_loss_cfg(budget_on=on, budget_gamma=4.0), targets)
  used = gate if on == "hard" else jax.nn.softmax(logits, -1)
  want = (budget_loss(used, 0.3, 4.0, calculate_all=True) if num_grains == 2 else
          budget_loss_triple(used, 0.2, 0.3, 4.0, form="official"))
  np.testing.assert_allclose(loss(outputs), want, rtol=1e-6)


@pytest.mark.parametrize("field,value,expectation", [
    ("budget_on", "soft", "expected one of ('hard', 'expected')"),
    ("budget_triple", "plain", "expected one of ('official', 'fractions')"),
    ("budget_gamma", -1.0, "expected a number >= 0.0"),
    ("budget_gamma", float("inf"), "expected a number >= 0.0")])
def test_budget_loss_owns_and_checks_its_fields(field, value, expectation):
  with pytest.raises(FieldError) as info:
    BudgetLoss.from_config(_loss_cfg(**{field: value}), GrainTargets(0.5))
  assert (info.value.field, info.value.expectation) == (f"loss.{field}", expectation)


def test_stage1_step_checks_the_budget_before_tracing():
  from dq.train.vae_step import make_update_fn
  import optax
  model_cfg = default_model_config()
  loss_cfg = _loss_cfg(budget_on="soft")
  with pytest.raises(FieldError, match="config.loss.budget_on = 'soft'"):
    make_update_fn(build_dqvae(model_cfg), optax.sgd(0.1), lambda step: 0.1, loss_cfg=loss_cfg,
                   router_cfg=model_cfg.router, num_grains=2)


@pytest.mark.parametrize("field,value,expectation", [
    ("gumbel_temperature", 0.0, "expected a number > 0.0"),
    ("gumbel_temperature_end", -1.0, "expected a number > 0.0"),
    ("temperature_steps", 2.5, "expected an int >= 0"),
    ("warmup_steps", -1, "expected an int >= 0"),
    ("distill_steps", -2, "expected an int >= -1"),
    ("teacher", "oracle", "expected one of ('entropy', 'detail')")])
def test_router_schedule_checks_its_fields(field, value, expectation):
  from dq.train.router_control import RouterSchedule
  defaults = default_model_config().router.to_dict()
  RouterSchedule.from_router(ml_collections.ConfigDict(defaults))  # the defaults pass
  router = ml_collections.ConfigDict(dict(defaults, **{field: value}))
  with pytest.raises(FieldError) as info:
    RouterSchedule.from_router(router)
  assert (info.value.field, info.value.expectation) == (f"model.router.{field}", expectation)


def test_router_schedule_temperature_is_the_geometric_anneal():
  from dq.train.router_control import RouterSchedule
  schedule = RouterSchedule(temperature=2.0, temperature_end=0.5, temperature_steps=100)
  for step in (0, 25, 100, 400):
    np.testing.assert_allclose(schedule.temperature_at(jnp.asarray(step)),
                               2.0 * 0.25 ** (min(step, 100) / 100), rtol=1e-6)
  assert float(RouterSchedule(temperature=2.0, temperature_end=0.5).temperature_at(50)) == 2.0


def test_stage1_step_checks_the_router_schedule_before_tracing():
  from dq.train.vae_step import make_update_fn
  import optax
  model_cfg = default_model_config()
  model_cfg.router.teacher = "oracle"
  with pytest.raises(FieldError, match="config.model.router.teacher = 'oracle'"):
    make_update_fn(build_dqvae(model_cfg), optax.sgd(0.1), lambda step: 0.1,
                   loss_cfg=_loss_cfg(), router_cfg=model_cfg.router, num_grains=2)


@pytest.mark.parametrize("field", ["l1_weight", "perceptual_weight", "codebook_weight",
                                   "budget_weight", "router_distill_weight"])
def test_stage1_loss_checks_its_weights(field):
  from dq.configs import vae_base_config
  from dq.losses.vae_loss import Stage1Loss
  config = vae_base_config()
  config.loss[field] = -0.5
  with pytest.raises(FieldError) as info:
    Stage1Loss.from_config(config.loss, config.model.router, 2)
  assert (info.value.field, info.value.expectation) == (f"loss.{field}", "expected a number >= 0.0")


def test_stage1_loss_terms_follow_the_router_kind():
  from dq.configs import vae_base_config
  from dq.losses.vae_loss import Stage1Loss
  config = vae_base_config()
  logits = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 2, 2))
  x = jnp.zeros((2, 8, 8, 3))
  outputs = {"xrec": x + 0.5, "codebook_loss": jnp.float32(0.25), "gate_logits": logits,
             "gate": jax.nn.one_hot(jnp.argmax(logits, -1), 2)}
  teacher = jax.nn.one_hot(jnp.zeros((2, 2, 2), jnp.int32), 2)
  learned = Stage1Loss.from_config(config.loss, config.model.router, 2)
  total, terms = learned(x, outputs, teacher_gate=teacher, teacher_weight=1.0)
  assert set(terms) == {"l1", "codebook", "budget", "router_distill"}
  np.testing.assert_allclose(total, 0.5 + 0.25 + terms["budget"] + terms["router_distill"],
                             rtol=1e-6)
  config.model.router.kind = "entropy"
  entropy = Stage1Loss.from_config(config.loss, config.model.router, 2)
  assert entropy.budget is None
  total, terms = entropy(x, outputs, teacher_gate=teacher, teacher_weight=1.0)
  assert set(terms) == {"l1", "codebook"}
  np.testing.assert_allclose(total, 0.75, rtol=1e-6)


@pytest.mark.parametrize("overrides,field,expectation", [
    (dict(disc_weight=-1.0), "loss.disc_weight", "expected a number >= 0.0"),
    (dict(disc_start=-3), "loss.disc_start", "expected an int >= 0"),
    (dict(disc_weight=0.5, disc_loss="wasserstein"), "loss.disc_loss",
     "expected one of ('hinge', 'non_saturating')"),
    (dict(adaptive_weight_max=0.0), "loss.adaptive_weight_max", "expected a number > 0.0")])
def test_adversarial_loss_checks_its_fields(overrides, field, expectation):
  from dq.losses.gan import AdversarialLoss
  with pytest.raises(FieldError) as info:
    AdversarialLoss.from_config(_loss_cfg(**overrides))
  assert (info.value.field, info.value.expectation) == (field, expectation)


def test_adversarial_kind_is_only_read_when_the_gan_is_on():
  from dq.losses.gan import AdversarialLoss
  off = AdversarialLoss.from_config(_loss_cfg(disc_weight=0.0, disc_loss="wasserstein"))
  assert off.weight == 0.0
  on = AdversarialLoss.from_config(_loss_cfg(disc_weight=0.75, disc_start=30, disc_loss="hinge"))
  assert (on.weight, on.start, on.kind) == (0.75, 30, "hinge")
