"""Router training recipes in the configs: 'guided' is the default of the feature-router
configs, `:paper_router` selects the paper's recipe exactly, the entropy router is untouched."""
import pytest

from dq.configs import ROUTER_RECIPES, apply_router_recipe, vae_base_config
from dq.validate import ConfigError, validate_config
from test_validate import load_config


def field(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def recipe_of(config):
  """The recipe whose every field the config carries (None when none matches)."""
  for name, recipe in ROUTER_RECIPES.items():
    if all(field(config, k) == v for k, v in recipe.items()):
      return name
  return None


def test_recipes_set_the_same_fields_and_paper_is_the_base_default():
  assert set(ROUTER_RECIPES["paper"]) == set(ROUTER_RECIPES["guided"])
  assert recipe_of(vae_base_config()) == "paper"  # model/loss/optim defaults = the paper
  paper = ROUTER_RECIPES["paper"]
  assert paper["model.router.train_gate"] == "gumbel"
  assert paper["model.router.gate_gradient"] == "official"
  assert paper["loss.budget_on"] == "hard" and paper["model.router.warmup_steps"] == 0


@pytest.mark.parametrize("name,arg,recipe,warmup,grains", [
    ("demo_vae.py", None, "guided", 300, 2),
    ("demo_vae.py", "paper_router", "paper", 0, 2),
    ("ffhq_vae.py", None, "guided", 5000, 2),
    ("ffhq_vae.py", "paper_router,tiny", "paper", 0, 2),
    ("imagenet_vae.py", "triple,tiny", "guided", 5000, 3),
    ("imagenet_vae.py", "paper_router", "paper", 0, 2)])
def test_feature_router_configs_use_their_recipe(name, arg, recipe, warmup, grains):
  config = load_config(name, arg)
  assert config.model.router.kind == "feature"
  assert config.model.num_grains == grains  # the recipe leaves the other args alone
  assert config.model.router.warmup_steps == warmup
  overrides = dict(ROUTER_RECIPES[recipe], **{"model.router.warmup_steps": warmup})
  for key, value in overrides.items():
    assert field(config, key) == value, key
  try:
    validate_config(config)
    lines = []
  except ConfigError as error:  # the paper configs' data folders are not given here
    lines = list(error.failures)
  assert not [line for line in lines if "router" in line or "loss." in line], lines


@pytest.mark.parametrize("name", ["demo_vae.py", "ffhq_vae.py"])
def test_entropy_configs_keep_the_base_router_fields(name):
  config = load_config(name, "entropy")
  assert config.model.router.kind == "entropy"
  assert recipe_of(config) == "paper"  # untouched base defaults (unused by this router)


def test_apply_router_recipe_errors():
  config = vae_base_config()
  with pytest.raises(ValueError, match="router recipe 'fast' unknown"):
    apply_router_recipe(config, "fast")
  apply_router_recipe(config, "guided", warmup_steps=7)
  assert config.model.router.warmup_steps == 7 and recipe_of(config) is None
  apply_router_recipe(config, "paper", warmup_steps=7)  # the paper has no warm-up to resize
  assert recipe_of(config) == "paper"
