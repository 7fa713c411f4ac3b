"""CLI conversion of an official DQ-Transformer checkpoint (Dualformer layout), torch-free."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_path
from test_convert_official import lightning_checkpoint

from dq.stage2.layout import TokenLayout
from dq.stage2.transformer import StackedTransformer
from dq.tools import convert_official_transformer as conv
from dq.official import transformer as transformer_conversion

INPUTS = ("coarse_content", "fine_content", "coarse_position", "fine_position", "coarse_seg",
          "fine_seg")


@pytest.fixture(scope="module")
def official():
  return dict(np.load(fixture_path("official_stackgpt_small.npz")))


def _dualformer_checkpoint(tmp_path, official):
  sd = {"transformer." + k[3:]: v for k, v in official.items() if k.startswith("sd/")}
  sd["first_stage_model.encoder.conv_in.weight"] = np.ones((8, 3, 3, 3), np.float32)
  return lightning_checkpoint(tmp_path / "last.ckpt", sd)


def test_cli_converts_and_reproduces_official_logits(tmp_path, official):
  out = tmp_path / "converted"
  assert conv.main([str(_dualformer_checkpoint(tmp_path, official)), str(out), "--n_head",
                    "4"]) == 0
  params, config = transformer_conversion.load_converted_transformer(str(out))
  assert config["model"] == {"n_embd": 64, "n_head": 4, "position_layers": 2,
                             "content_layers": 3, "block_size": 128}
  assert config["layout"] == {"coarse_size": 4, "fine_size": 8, "codebook_size": 64,
                              "num_classes": 0, "max_len": 68}
  layout = TokenLayout(**config["layout"])
  model = StackedTransformer(
      vocab_size=layout.content_vocab_size, coarse_position_size=layout.coarse_position_vocab_size,
      fine_position_size=layout.fine_position_vocab_size, segment_size=2,
      **{k: config["model"][k] for k in ("block_size", "position_layers", "content_layers",
                                         "n_head", "n_embd")})
  with jax.default_matmul_precision("highest"):
    position_logits, content_logits = model.apply(
        {"params": params}, *(jnp.asarray(official[f"in/{n}"]) for n in INPUTS))
  np.testing.assert_allclose(position_logits, official["position_logits"], atol=1e-4)
  np.testing.assert_allclose(content_logits, official["content_logits"], atol=1e-4)


def test_bad_arguments_and_files_name_the_problem(tmp_path, official, capsys):
  ckpt = str(_dualformer_checkpoint(tmp_path, official))
  assert conv.main([ckpt, str(tmp_path / "a"), "--n_head", "5"]) == 1
  assert "--n_head=5 must divide n_embd=64" in capsys.readouterr().err
  assert conv.main([ckpt, str(tmp_path / "b"), "--num_classes", "10"]) == 1
  assert "content vocabulary has 67 ids" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no params.npz"):
    transformer_conversion.load_converted_transformer(str(tmp_path))


def test_converted_folder_initialises_a_training_state(tmp_path, official):
  from dq.stage2.build import build_transformer, default_transformer_config
  from dq.train import transformer_step as ts
  from dq.train.transformer_trainer import init_params_from
  from dq.configs import transformer_base_config
  out = tmp_path / "converted"
  assert conv.main([str(_dualformer_checkpoint(tmp_path, official)), str(out), "--n_head",
                    "4"]) == 0
  params, config = transformer_conversion.load_converted_transformer(str(out))
  layout = TokenLayout(**config["layout"])  # max_len 68: block_size 67 < the official 128
  model_cfg = default_transformer_config()
  model_cfg.update({k: config["model"][k] for k in ("n_embd", "n_head", "position_layers",
                                                     "content_layers")})
  model = build_transformer(model_cfg, layout)
  tx, _ = ts.make_transformer_optimizer(transformer_base_config().optim, 10)
  init_fn = ts.make_init_fn(model, tx, layout)
  state = jax.jit(init_fn)(jax.random.PRNGKey(0))
  state = init_params_from(str(out), state, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(state.params["pos_emb"], params["pos_emb"][:, :67])
  np.testing.assert_array_equal(state.params["content_block_2"]["mlp_fc"]["kernel"],
                                params["content_block_2"]["mlp_fc"]["kernel"])
