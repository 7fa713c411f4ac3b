"""Stage-2 trainer: the update step, label dropout, weight decay, resume, both token paths,
sample mode and config errors, on a tiny random DQ-VAE (32 px, coarse 4x4, fine 8x8, K=16)."""
import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.configs import transformer_base_config
from dq.stage2.build import build_transformer
from dq.generator import sample_labels
from dq.stage2.layout import TokenLayout
from dq.train import transformer_sample
from dq.train import transformer_step as ts
from dq.train import transformer_trainer as tt
from stage2_util import LAYOUT, random_batch, tiny_config, tiny_model_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def stage1_dir(tiny_stage1_dir):
  return tiny_stage1_dir


class StepEnv:
  """One tiny class-conditional model and its initial state; jitted update steps per
  label-dropout rate, built once for the module."""

  def __init__(self, layout=LAYOUT, lr=3e-3):
    config = transformer_base_config()
    config.optim.update(dict(lr=lr, schedule="constant"))
    self.layout = layout
    self.model = build_transformer(tiny_model_config(), layout)
    self.tx, self.schedule = ts.make_transformer_optimizer(config.optim, 100)
    self.state = jax.jit(ts.make_init_fn(self.model, self.tx, layout))(jax.random.PRNGKey(0))
    self._updates = {}

  def update_fn(self, label_dropout, jit=True):
    fn = ts.make_update_fn(self.model, self.tx, self.schedule, layout=self.layout,
                           label_dropout=label_dropout,
                           class_conditional=self.layout.num_classes > 0)
    return jax.jit(fn) if jit else fn

  def update(self, label_dropout):
    if label_dropout not in self._updates:
      self._updates[label_dropout] = self.update_fn(label_dropout)
    return self._updates[label_dropout]


@pytest.fixture(scope="module")
def env():
  return StepEnv()


def test_update_step_overfits_a_fixed_batch(env):
  batch = jax.tree.map(jnp.asarray, random_batch(LAYOUT, 8))
  state, update = env.state, env.update(0.0)
  losses = []
  for _ in range(30):
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 30
  assert losses[-1] < 0.5 * losses[0], losses
  np.testing.assert_allclose(metrics["loss"],
                             metrics["content_loss"] + metrics["position_loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["position_loss"], (metrics["coarse_position_loss"]
                                                        + metrics["fine_position_loss"]) / 2)
  assert 0.5 < float(metrics["content_accuracy"]) <= 1.0  # memorising the batch
  assert 0.0 <= float(metrics["position_accuracy"]) <= 1.0
  assert float(metrics["tokens"]) == float(np.sum(batch["valid"]))
  assert float(metrics["lr"]) == pytest.approx(3e-3)
  assert float(metrics["grad_norm"]) > 0


def test_label_dropout_rate_and_null_id():
  content = jnp.asarray(random_batch(LAYOUT, 4000)["content"])
  dropped_content, dropped = ts.apply_label_dropout(content, jax.random.PRNGKey(1), 0.1,
                                                    LAYOUT.null_class_sos)
  dropped, dropped_content = np.asarray(dropped), np.asarray(dropped_content)
  assert 0.085 < dropped.mean() < 0.115
  np.testing.assert_array_equal(dropped_content[dropped, 0], LAYOUT.null_class_sos)
  np.testing.assert_array_equal(dropped_content[~dropped, 0], np.asarray(content)[~dropped, 0])
  np.testing.assert_array_equal(dropped_content[:, 1:], np.asarray(content)[:, 1:])


def test_update_step_sees_the_null_class_only_when_conditional(env, monkeypatch):
  # label_dropout=1: the step sees the batch with every SOS replaced by the null class.
  batch = random_batch(LAYOUT, 8)
  nulled = dict(batch, content=batch["content"].copy())
  nulled["content"][:, 0] = LAYOUT.null_class_sos
  _, plain = env.update(0.0)(env.state, batch)
  _, expected = env.update(0.0)(env.state, nulled)
  _, metrics = env.update(1.0)(env.state, batch)
  assert float(expected["loss"]) != pytest.approx(float(plain["loss"]))
  assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-6)
  assert float(metrics["null_label_fraction"]) == 1.0
  assert "null_label_fraction" not in plain
  # Unconditional models never drop labels, whatever label_dropout says (traced, not run).
  def no_dropout(*args):
    raise AssertionError("label dropout applied")
  monkeypatch.setattr(ts, "apply_label_dropout", no_dropout)
  layout = TokenLayout(4, 8, 16)
  model = build_transformer(tiny_model_config(), layout)
  state = jax.eval_shape(ts.make_init_fn(model, env.tx, layout), jax.random.PRNGKey(0))
  update = ts.make_update_fn(model, env.tx, env.schedule, layout=layout, label_dropout=1.0,
                             class_conditional=False)
  _, metrics = jax.eval_shape(update, state, random_batch(layout, 8))
  assert "null_label_fraction" not in metrics
  with pytest.raises(AssertionError, match="label dropout applied"):
    jax.eval_shape(env.update_fn(1.0, jit=False), env.state, batch)
  with pytest.raises(ValueError, match="class_conditional=True but the token layout has"):
    ts.make_update_fn(model, env.tx, env.schedule, layout=layout, label_dropout=0.1,
                      class_conditional=True)


def test_weight_decay_covers_exactly_the_dense_kernels(env):
  params = env.state.params
  mask = ts.transformer_weight_decay_mask(params)
  paths = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = {p for p, m in paths.items() if m}
  assert decayed == {p for p in paths if p.endswith("['kernel']")}
  assert "['position_block_0']['attn']['query']['kernel']" in decayed
  assert "['content_head']['linear']['kernel']" in decayed
  for kept in ("['pos_emb']", "['content_emb']['embedding']", "['seg_emb']['embedding']",
               "['position_block_0']['ln1']['scale']", "['content_block_0']['mlp_fc']['bias']"):
    assert not paths[kept], kept
  # With zero gradients AdamW only decays: kernels shrink by lr * wd, everything else stays.
  config = transformer_base_config()
  config.optim.update(dict(lr=0.1, weight_decay=0.5, grad_clip=0.0, schedule="constant"))
  tx, _ = ts.make_transformer_optimizer(config.optim, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = jax.jit(lambda p: tx.update(zeros, tx.init(p), p)[0])(params)
  flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    param = flat_params[path]
    expected = -0.1 * 0.5 * param if paths[jax.tree_util.keystr(path)] else 0.0 * param
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9)


def params_of(state):
  return jax.tree.leaves(jax.device_get((state.params, state.opt_state)))


def metric_rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trained(stage1_dir, tmp_path_factory):
  """A 4-step on-the-fly run (with a sample grid at step 4) and a 2 + 2 interrupted run."""
  base = tmp_path_factory.mktemp("runs")
  full_dir, split_dir = str(base / "full"), str(base / "split")
  full = tt.train_and_evaluate(tiny_config(stage1_dir, 4, sample_every=4, sample_images=4),
                               full_dir)
  tt.train_and_evaluate(tiny_config(stage1_dir, 2), split_dir)
  assert "2" in os.listdir(os.path.join(split_dir, "checkpoints"))
  resumed = tt.train_and_evaluate(tiny_config(stage1_dir, 4), split_dir)
  return dict(full=full, resumed=resumed, full_dir=full_dir, split_dir=split_dir)


def test_resume_matches_uninterrupted_run(trained):
  assert int(trained["resumed"].step) == 4
  for a, b in zip(params_of(trained["full"]), params_of(trained["resumed"])):
    np.testing.assert_array_equal(a, b)
  rows = metric_rows(trained["split_dir"])
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # resumed at step 2, not from scratch
  full_rows = [r for r in metric_rows(trained["full_dir"]) if "loss" in r]
  np.testing.assert_array_equal([r["loss"] for r in rows], [r["loss"] for r in full_rows])
  for key in ("loss", "content_loss", "coarse_position_loss", "fine_position_loss",
              "position_loss", "content_accuracy", "position_accuracy", "grad_norm", "lr",
              "tokens", "null_label_fraction", "steps_per_sec", "examples_per_sec",
              "tokens_per_sec"):
    assert key in rows[0], key
  assert all(r["tokens"] >= 8 * 20 for r in rows)  # every sequence has >= nc + 4 tokens


def test_resume_with_another_model_size_is_refused_before_building(stage1_dir, trained,
                                                                    tmp_path, monkeypatch):
  import shutil
  from dq.validate.resume import ResumeConfigError
  workdir = str(tmp_path / "run")
  shutil.copytree(trained["split_dir"], workdir)
  before = open(os.path.join(workdir, "config.json"), "rb").read()
  config = tiny_config(stage1_dir, 6)
  saved = json.loads(before)["model"]["n_embd"]
  config.model.n_embd = 2 * saved
  config.tokens.fine_order = "region"
  config.train.batch_size = 16  # allowed on resume
  monkeypatch.setattr(tt, "setup", lambda *a: pytest.fail("the trainer started building"))
  with pytest.raises(ResumeConfigError) as error:
    tt.train_and_evaluate(config, workdir)
  text = str(error.value)
  assert f"model.n_embd: {saved} -> {2 * saved}" in text
  assert "tokens.fine_order: 'row' -> 'region'" in text and "batch_size" not in text
  assert open(os.path.join(workdir, "config.json"), "rb").read() == before


def test_config_init_from_applies_on_a_fresh_start_only(stage1_dir, trained, tmp_path):
  config = tiny_config(stage1_dir, 4)
  config.init_from = trained["full_dir"]
  env = tt.setup(config, str(tmp_path / "new"))
  assert int(env["state"].step) == 0  # the run's params, a fresh step and optimizer
  for a, b in zip(jax.tree.leaves(jax.device_get(env["state"].params)),
                  jax.tree.leaves(jax.device_get(trained["full"].params))):
    np.testing.assert_array_equal(a, b)
  # A workdir with checkpoints resumes from them; init_from (here: a missing path) is not read.
  import shutil
  shutil.copytree(trained["split_dir"], tmp_path / "run")
  config.init_from = str(tmp_path / "missing")
  assert int(tt.setup(config, str(tmp_path / "run"))["state"].step) == 4


def expected_strip_shape(rows):
  """A coarse-to-fine strip of `rows` 32 px samples at scale 2: a caption band, then rows of
  five 64 px frames (coarse, fine 25/50/75/100%) with 2 px separators."""
  from dq import summaries as viz
  return (viz.CAPTION_HEIGHT + 2 + rows * (2 * 32 + 2) - 2, 5 * (2 * 32 + 2) - 2, 3)


def test_training_writes_sample_grids(trained):
  grids = glob.glob(os.path.join(trained["full_dir"], "summaries", "samples_*.png"))
  assert [os.path.basename(g) for g in grids] == ["samples_0000004.png"]
  from PIL import Image
  grid = np.asarray(Image.open(grids[0]))
  assert grid.shape == (32, 4 * 2 * 34 - 2, 3)  # one row of 4 (sample | grain overlay) pairs
  strips = glob.glob(os.path.join(trained["full_dir"], "summaries", "generation_strip_*.png"))
  assert [os.path.basename(s) for s in strips] == ["generation_strip_0000004.png"]
  assert np.asarray(Image.open(strips[0])).shape == expected_strip_shape(4)
  sample_rows = [r for r in metric_rows(trained["full_dir"]) if "sample/fine_ratio" in r]
  assert len(sample_rows) == 1 and 0.0 <= sample_rows[0]["sample/fine_ratio"] <= 1.0


def test_sample_mode_writes_pngs_and_npz(stage1_dir, trained, tmp_path):
  config = tiny_config(stage1_dir, 4)
  config.mode = "sample"
  config.sample.out_dir = str(tmp_path / "samples")
  path = transformer_sample.sample(config, trained["full_dir"])
  assert path == str(tmp_path / "samples" / "samples.npz")
  pngs = sorted(os.listdir(tmp_path / "samples"))
  assert [p for p in pngs if p.startswith("sample_")] == [f"sample_{i:05d}.png" for i in range(5)]
  assert "grid.png" in pngs
  from PIL import Image
  strip = np.asarray(Image.open(tmp_path / "samples" / "generation_strip.png"))
  assert strip.shape == expected_strip_shape(4)
  out = np.load(path)
  assert out["codes"].shape == (5, 8, 8) and out["grain"].shape == (5, 4, 4)
  assert out["images"].shape == (5, 32, 32, 3) and out["images"].dtype == np.uint8
  np.testing.assert_array_equal(out["labels"], [0, 3, 0, 3, 0])
  assert out["codes"].min() >= 0 and out["codes"].max() < 16
  assert set(np.unique(out["grain"])) <= {0, 1}
  # Coarse regions carry one code per 2x2 block; lengths agree with the grain maps.
  blocks = out["codes"].reshape(5, 4, 2, 4, 2)
  constant = np.all(blocks == blocks[:, :, :1, :, :1], axis=(2, 4))
  assert np.all(constant[out["grain"] == 0])
  np.testing.assert_array_equal(out["length"], 16 + 3 * out["grain"].sum(axis=(1, 2)) + 4)
  assert float(out["setting_content_temperature"]) == 1.0
  assert int(out["setting_checkpoint_step"]) == 4
  from PIL import Image
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "samples" / "sample_00003.png")),
                                out["images"][3])


def test_token_shard_path_encodes_then_trains(stage1_dir, tmp_path):
  config = tiny_config(stage1_dir, 2)
  config.tokens.dir = str(tmp_path / "tokens")
  state = tt.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 2
  assert os.path.exists(tmp_path / "tokens" / "meta.json")
  rows = metric_rows(str(tmp_path / "run"))
  assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["loss"])
  # Tokens made for another layout (here: unconditional) are refused, naming the folder.
  config = tiny_config(stage1_dir, 2)
  config.tokens.dir = str(tmp_path / "tokens")
  config.class_conditional = False
  with pytest.raises(ValueError, match="tokens"):
    tt.train_and_evaluate(config, str(tmp_path / "other"))


def test_encode_mode_writes_both_splits(stage1_dir, tmp_path):
  config = tiny_config(stage1_dir, 1)
  config.mode = "encode"
  config.tokens.max_images = 16
  results = tt.encode(config, str(tmp_path))
  assert set(results) == {"train", "eval"}
  assert os.path.exists(tmp_path / "tokens" / "meta.json")


def test_stage1_path_errors(tmp_path):
  config = tiny_config("", 1)
  with pytest.raises(ValueError, match="stage1.path is empty.*configs/demo_vae.py"):
    tt.train_and_evaluate(config, str(tmp_path))
  config.stage1.path = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing does not exist.*train stage 1 first"):
    transformer_sample.sample(config, str(tmp_path))


def test_sample_labels():
  config = transformer_base_config()
  np.testing.assert_array_equal(sample_labels(config, LAYOUT, 11), np.arange(11) % 9)
  config.sample.labels = "2,9"
  np.testing.assert_array_equal(sample_labels(config, LAYOUT, 3), [2, 9, 2])
  config.sample.labels = "10"
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
    sample_labels(config, LAYOUT, 3)
  with pytest.raises(ValueError, match="unconditional"):
    sample_labels(config, TokenLayout(4, 8, 16), 3)


def test_build_transformer_validates_fields():
  model = build_transformer(tiny_model_config(), LAYOUT)
  assert model.block_size == LAYOUT.max_len - 1
  assert model.vocab_size == LAYOUT.content_vocab_size == 16 + 3 + 10
  assert model.fine_position_size == 64 + 3 and model.coarse_position_size == 16 + 3
  for field, value, message in (("n_head", 3, "divisible by config.model.n_head=3"),
                                ("dropout", 1.0, r"dropout must lie in \[0, 1\)"),
                                ("attention_impl", "flash", "attention_impl must be None"),
                                ("dtype", "float16", "dtype must be one of"),
                                ("content_layers", 0, "content_layers must be a positive int")):
    model_cfg = tiny_model_config()
    model_cfg[field] = value
    with pytest.raises(ValueError, match=message):
      build_transformer(model_cfg, LAYOUT)


def load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(CONFIG_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["demo_transformer.py", "ffhq_transformer.py",
                                  "imagenet_transformer.py"])
def test_transformer_configs_build(name):
  args = ["stage1=/some/vae"] + ([] if name.startswith("demo") else ["stage1=/v,tiny"])
  for arg in args:
    config = load_config_file(name, arg)
    assert config.stage == "transformer" and config.stage1.path.startswith("/")
    layout = TokenLayout(16, 32, 1024, num_classes=1000 if config.class_conditional else 0)
    model = build_transformer(config.model, layout)
    assert model.block_size == 1024 + 3
    assert (config.optim.name, config.optim.b1, config.optim.b2) == ("adamw", 0.9, 0.95)
  config = load_config_file("ffhq_transformer.py")
  m = config.model
  assert (m.n_embd, m.n_head, m.position_layers, m.content_layers, m.dropout) == (
      1024, 8, 6, 18, 0.1)
  assert not config.class_conditional and config.optim.weight_decay == 0.01
  config = load_config_file("imagenet_transformer.py", "tfds")
  assert config.class_conditional and config.label_dropout == 0.1
  assert config.data.tfds.name == "imagenet2012"
