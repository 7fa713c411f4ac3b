"""benchmarks/claims.py: settings, the acceptance arithmetic, and a micro end-to-end run.

The end-to-end run (marked `bench`, deselected by default; `python -m pytest -m bench`) is the
smoke mode (32 px, tiny widths, 2 steps per model) cut to the models
the acceptance check and stage 2 need (fixed_coarse, fixed_fine, feature_0.5), then both
transformers. Every model goes through the real trainers, so each costs its XLA compilations
(mostly the train-state init: ~25-50 s per model on 2 CPU cores); the entropy models differ only
in their config (`test_fixed_grid_configs_...`).
"""
import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "claims.py"
STAGE1_FIELDS = ("router", "target_fine_ratio", "codes_per_image", "regions_per_image",
                 "fine_ratio_mean", "fine_ratio_std", "fine_ratio_min", "fine_ratio_max", "psnr",
                 "ssim", "l1", "lpips", "rfid", "codebook_usage", "num_images",
                 "detail_precision", "detail_recall", "detail_lift", "detail_base_rate",
                 "train_final")
STAGE2_FIELDS = ("stage1", "seconds_per_image", "seconds_per_batch", "batch", "tokens_mean",
                 "tokens_max", "sampled_fine_ratio_mean", "max_len", "data_tokens_mean",
                 "train_final")


def load_claims():
  spec = importlib.util.spec_from_file_location("claims_under_test", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(module)
  return module


claims = load_claims()


def test_every_mode_has_both_grids_and_all_ratio_sweeps():
  for mode in claims.MODES:
    settings = claims.settings_for(mode)
    names = [spec["name"] for spec in claims.model_specs(settings)]
    assert names == ["fixed_coarse", "fixed_fine", "feature_0.25", "feature_0.5", "feature_0.75",
                     "entropy_0.25", "entropy_0.5", "entropy_0.75"]
    assert settings.image_size in (32, 64, 128)
  quick = claims.settings_for("quick", vae_steps=7, transformer_steps=3, rfid_images=16)
  assert (quick.vae_steps, quick.transformer_steps, quick.rfid_images) == (7, 3, 16)
  assert claims.settings_for("quick").rfid_images == 0
  with pytest.raises(ValueError, match="mode must be one of"):
    claims.settings_for("huge")
  subset = claims.settings_for("smoke", models=("fixed_fine", "feature_0.5"))
  assert [spec["name"] for spec in claims.model_specs(subset)] == ["fixed_fine", "feature_0.5"]
  with pytest.raises(ValueError, match="models \\['feature_0.6'\\] unknown"):
    claims.settings_for("smoke", models=("feature_0.6",))


def test_stage2_needs_its_stage1_models(tmp_path):
  settings = claims.settings_for("smoke", models=("fixed_coarse", "fixed_fine"))
  with pytest.raises(ValueError, match="stage 2 needs the stage-1 models feature_0.5"):
    claims.run_claims(settings, str(tmp_path))
  assert not list(tmp_path.iterdir())  # refused before writing anything


def test_fixed_grid_configs_use_the_fixed_router_and_no_budget_term():
  settings = claims.settings_for("smoke")
  specs = {spec["name"]: spec for spec in claims.model_specs(settings)}
  coarse = claims.vae_config(settings, specs["fixed_coarse"], "/tmp/table.json")
  entropy = claims.vae_config(settings, specs["entropy_0.25"], "/tmp/table.json")
  assert coarse.model.router.kind == "fixed" and coarse.model.router.fine_ratio == 0.0
  assert coarse.model.router.thresholds_path == ""
  assert entropy.model.router.thresholds_path == "/tmp/table.json"
  for config in (coarse, entropy):  # identical budgets
    assert config.train.num_steps == settings.vae_steps
    assert config.train.batch_size == settings.vae_batch
    assert config.model.codebook_size == settings.model["codebook_size"]
    assert config.model.resolution == config.data.image_size == settings.image_size


def _row(psnr: float, codes: float) -> dict:
  return {"psnr": psnr, "codes_per_image": codes}


def test_acceptance_arithmetic():
  rows = {"fixed_coarse": _row(20.0, 64.0), "fixed_fine": _row(24.0, 256.0),
          "feature_0.5": _row(23.5, 160.0), "entropy_0.5": _row(20.5, 160.0),
          "feature_0.25": _row(22.0, 112.0)}
  result = claims.acceptance(rows)
  assert "skipped" in claims.acceptance({"feature_0.5": rows["feature_0.5"]})
  feature = result["feature_0.5"]
  assert feature["psnr_gain_over_coarse_db"] == pytest.approx(3.5)
  assert feature["codes_over_coarse"] == pytest.approx(2.5)
  assert feature["psnr_gap_to_fine_db"] == pytest.approx(0.5)
  assert feature["codes_over_fine"] == pytest.approx(0.625)
  assert feature["psnr_gap_closed"] == pytest.approx(3.5 / 4.0)
  assert feature["codes_gap_spent"] == pytest.approx(0.5)
  assert feature["beats_coarse_clearly"] and feature["close_to_fine"]
  entropy = result["entropy_0.5"]
  assert not entropy["beats_coarse_clearly"] and not entropy["close_to_fine"]
  assert "feature_0.25" not in result


def test_router_acceptance_reads_the_issue_bar():
  fine, entropy = {"psnr": 20.5, "lpips": 0.44}, {"psnr": 20.4, "lpips": 0.45}
  good = {"psnr": 20.45, "lpips": 0.45, "detail_precision": 0.41, "router": "feature"}
  check = claims.router_acceptance(good, entropy, fine)
  assert check["router_bar_met"] and check["psnr_minus_fine_db"] == pytest.approx(-0.05)
  for bad in ({"psnr": 20.39}, {"psnr": 20.39 + 0.0, "lpips": 0.46}, {"detail_precision": 0.39},
              {"detail_precision": None}, {"psnr": 20.35, "lpips": 0.40}):
    assert not claims.router_acceptance({**good, **bad}, entropy, fine)["router_bar_met"], bad
  rows = {"fixed_coarse": _row(19.0, 64.0), "fixed_fine": {**_row(20.5, 256.0), **fine},
          "entropy_0.5": {**_row(20.4, 160.0), **entropy}, "feature_0.5": {**good,
                                                                           "codes_per_image": 160}}
  assert claims.acceptance(rows)["feature_0.5"]["router_bar_met"]
  assert "router_bar_met" not in claims.acceptance(rows)["entropy_0.5"]


def test_seeds_aggregate_to_mean_and_std():
  runs = {0: {"psnr": 20.0, "router": "feature", "routing_change": [0.2, 0.1], "x": None},
          1: {"psnr": 21.0, "router": "feature", "routing_change": [0.3, 0.05], "x": None}}
  row = claims.aggregate_seeds(runs)
  assert row["psnr"] == pytest.approx(20.5) and row["psnr_std"] == pytest.approx(0.5)
  assert row["routing_change_last"] == pytest.approx(0.075)
  assert row["seeds"] == [0, 1] and row["per_seed"]["1"]["psnr"] == 21.0
  assert row["router"] == "feature" and row["x"] is None and "x_std" not in row


def test_recipes_are_config_overrides_and_feature_is_the_paper():
  from dq.models.build import default_model_config
  settings = claims.settings_for("smoke", recipes=tuple(claims.RECIPES))
  specs = {spec["name"]: spec for spec in claims.model_specs(settings)}
  paper = claims.vae_config(settings, specs["feature_0.5"], "/tmp/table.json", seed=3)
  assert paper.seed == 3
  router, default = paper.model.router, default_model_config().router
  for field in ("norm", "gate_gradient", "train_gate", "temperature_steps", "warmup_steps"):
    assert router[field] == default[field], field  # the paper recipe is the model default
  assert router.gate_gradient == "official" and router.train_gate == "gumbel"
  assert router.gumbel_temperature == 1.0 and paper.loss.budget_on == "hard"
  assert router.thresholds_path == ""  # no warm-up, no entropy table
  for recipe in claims.RECIPES:
    config = claims.vae_config(settings, specs[f"{recipe}_0.5"], "/tmp/table.json")
    for field, value in claims.RECIPES[recipe].items():
      node = config
      for part in field.split("."):
        node = node[part]
      assert node == value, (recipe, field)
  with pytest.raises(KeyError, match="model.router.nrom is not a config field"):
    claims.apply_overrides(paper, {"model.router.nrom": "layer"})
  with pytest.raises(ValueError, match="recipes"):
    claims.settings_for("smoke", recipes=("nope",))


def test_clean_makes_json_safe():
  cleaned = claims._clean({"a": math.nan, "b": (1, math.inf), "c": {"d": 2.5}})
  assert cleaned == {"a": None, "b": [1, None], "c": {"d": 2.5}}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke run (~2.5 min of XLA compilation on 2 cores: outside the CI budget, so its tests
  carry the `bench` mark and run with `python -m pytest -m bench`)."""
  settings = claims.settings_for("smoke", models=("fixed_coarse", "fixed_fine", "feature_0.5"))
  workdir = tmp_path_factory.mktemp("claims")
  return settings, workdir, claims.run_claims(settings, str(workdir))


@pytest.mark.bench
def test_smoke_run_reports_every_model_and_field(smoke_run):
  settings, workdir, doc = smoke_run
  names = [spec["name"] for spec in claims.model_specs(settings)]
  assert list(doc["models"]) == names == ["fixed_coarse", "fixed_fine", "feature_0.5"]
  regions = (settings.image_size // 8) ** 2  # coarse factor 8
  for name, row in doc["models"].items():
    assert set(STAGE1_FIELDS) <= set(row), name
    assert 0.0 <= row["fine_ratio_mean"] <= 1.0
    assert row["regions_per_image"] == regions
    # Codes: 1 per coarse region, 4 per fine region.
    assert row["codes_per_image"] == pytest.approx(regions * (1 + 3 * row["fine_ratio_mean"]))
    assert 0.0 < row["psnr"] < 60.0 and -1.0 <= row["ssim"] <= 1.0
    assert row["num_images"] == settings.eval_images
    assert row["lpips"] is None and "LPIPS off" in row["lpips_note"]
    assert row["rfid"] is None and "rFID off" in row["rfid_note"]
    assert row["train_final"]["step"] == settings.vae_steps
    assert f"vae/{name}/seed0/train" in doc["phases_seconds"]
    assert f"vae/{name}/seed0/eval" in doc["phases_seconds"]
    assert row["seeds"] == [0] and set(row["per_seed"]) == {"0"}
  coarse, fine = doc["models"]["fixed_coarse"], doc["models"]["fixed_fine"]
  assert coarse["codes_per_image"] == regions and coarse["fine_ratio_max"] == 0.0
  assert fine["codes_per_image"] == 4 * regions and fine["fine_ratio_min"] == 1.0
  assert coarse["detail_recall"] == 0.0 and coarse["detail_precision"] is None  # no fine region
  assert fine["detail_recall"] == 1.0
  assert fine["detail_precision"] == pytest.approx(fine["detail_base_rate"])
  assert "loss_budget" in doc["models"]["feature_0.5"]["train_final"]
  feature = doc["models"]["feature_0.5"]
  # Checkpoints at every fifth of training (here steps 1 and 2): one routing-change value.
  assert feature["routing_steps"] == [1, 2] and len(feature["routing_change"]) == 1
  assert 0.0 <= feature["routing_change"][0] <= 1.0
  assert feature["router_margin_mean"] >= 0.0 and 0.0 <= feature["router_undecided"] <= 1.0
  assert "routing_change" not in coarse
  assert "loss_budget" not in coarse["train_final"]  # no budget term for fixed grids
  assert set(doc["acceptance"]) == {"clear_margin_db", "close_db", "feature_0.5"}
  assert "entropy_thresholds" not in doc["phases_seconds"]  # no entropy model, no table


@pytest.mark.bench
def test_smoke_run_times_both_samplers(smoke_run):
  settings, _, doc = smoke_run
  stage2 = doc["stage2"]
  cells = (settings.image_size // 4) ** 2  # fine factor 4
  regions = (settings.image_size // 8) ** 2
  for name in ("dq", "fixed_fine"):
    row = stage2[name]
    assert set(STAGE2_FIELDS) <= set(row), name
    assert row["seconds_per_image"] > 0 and row["batch"] == settings.sample_batch
    assert row["max_len"] == cells + claims.NUM_SPECIAL_TOKENS
    assert row["train_final"]["step"] == settings.transformer_steps
    assert math.isfinite(row["train_final"]["content_loss"])
  grid, dq = stage2["fixed_fine"], stage2["dq"]
  assert grid["tokens_mean"] == grid["tokens_max"] == cells + 4  # a full raster, every time
  assert grid["sampled_fine_ratio_mean"] == 1.0
  assert regions + 4 <= dq["tokens_mean"] <= cells + 4
  assert 0.0 <= dq["sampled_fine_ratio_mean"] <= 1.0
  assert dq["data_tokens_mean"] == pytest.approx(doc["models"]["feature_0.5"]["codes_per_image"]
                                                 + 4)
  assert stage2["fixed_over_dq_seconds"] == pytest.approx(
      grid["seconds_per_image"] / dq["seconds_per_image"])
  assert stage2["fixed_over_dq_tokens"] == pytest.approx(grid["tokens_mean"] / dq["tokens_mean"])


@pytest.mark.bench
def test_smoke_run_writes_json_and_markdown(smoke_run):
  settings, workdir, doc = smoke_run
  assert json.loads((workdir / "claims.json").read_text()) == doc
  table = (workdir / "claims.md").read_text()
  for name in doc["models"]:
    assert f"| {name} |" in table
  assert "| dq | feature_0.5 |" in table and "| fixed_fine | fixed_fine |" in table
  assert doc["total_seconds"] >= sum(v for k, v in doc["phases_seconds"].items()
                                     if k.startswith("vae/"))
  other = dataclasses.replace(settings, vae_steps=settings.vae_steps + 1)
  with pytest.raises(ValueError, match="other settings.*vae_steps"):
    claims.run_claims(other, str(workdir))
