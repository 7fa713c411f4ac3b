"""Tokenizer fingerprints: which weights they cover, and the errors when token shards or a
stage-2 run meet another DQ-VAE of the same shapes."""
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from dq import generator as gen
from dq import tokenizer as stage1_lib
from dq.stage2 import token_data
from dq.stage2 import token_encoding
from dq.train import transformer_trainer as tt
from stage1_util import make_tiny_stage1, tiny_data_config


@pytest.fixture(scope="module")
def stage1_dirs(tmp_path_factory):
  """Two tiny DQ-VAEs of the same shapes and different weights (seeds 0 and 1)."""
  base = tmp_path_factory.mktemp("fingerprint")
  return {seed: make_tiny_stage1(str(base / f"vae{seed}"), seed=seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def stage1(stage1_dirs):
  return stage1_lib.load_stage1(stage1_dirs[0])


def _variables(stage1):
  return jax.tree.map(np.asarray, stage1.variables)


def _changed(variables, path, delta=1e-3):
  """A copy of `variables` with the first element of the leaf at `path` moved by `delta`."""
  copy = jax.tree.map(np.copy, variables)
  leaf = copy
  for key in path:
    leaf = leaf[key]
  leaf.reshape(-1)[0] += delta
  return copy


def test_fingerprint_covers_the_weights_that_make_tokens(stage1):
  variables = _variables(stage1)
  reference = stage1_lib.tokenizer_fingerprint(variables)
  assert re.fullmatch(r"[0-9a-f]{16}", reference)
  assert stage1.fingerprint == reference  # load_stage1 computes it (feature router: no table)
  assert stage1_lib.tokenizer_fingerprint(jax.tree.map(np.copy, variables)) == reference
  params = variables["params"]
  encoder_leaf = ["params", "encoder", *_first_path(params["encoder"])]
  router_leaf = ["params", "router", *_first_path(params["router"])]
  for path in (encoder_leaf, router_leaf, ["params", "quant_conv", "kernel"],
               ["codebook", "quantize", "embedding"]):
    assert stage1_lib.tokenizer_fingerprint(_changed(variables, path)) != reference, path
  decoder_leaf = ["params", "decoder", *_first_path(params["decoder"])]
  for path in (decoder_leaf, ["params", "post_quant_conv", "kernel"],
               ["codebook", "quantize", "cluster_size"], ["codebook", "quantize", "embed_sum"]):
    assert stage1_lib.tokenizer_fingerprint(_changed(variables, path)) == reference, path
  assert stage1_lib.tokenizer_fingerprint(variables, (2.5,)) != reference
  assert (stage1_lib.tokenizer_fingerprint(variables, (2.5,))
          != stage1_lib.tokenizer_fingerprint(variables, (2.6,)))


def _first_path(tree):
  """Keys down to the first leaf of a nested dict."""
  path = []
  while isinstance(tree, dict):
    key = sorted(tree)[0]
    path.append(key)
    tree = tree[key]
  return path


def test_two_models_of_one_shape_differ(stage1_dirs, stage1):
  other = stage1_lib.load_stage1(stage1_dirs[1])
  assert other.codebook_size == stage1.codebook_size and other.fine_size == stage1.fine_size
  assert other.fingerprint != stage1.fingerprint


def test_token_shards_of_another_model_are_refused(stage1_dirs, stage1, tmp_path):
  tokens = str(tmp_path / "tokens")
  data_cfg = tiny_data_config(train_size=8, eval_size=8)
  token_encoding.encode_dataset(stage1, data_cfg, tokens, split="eval", num_classes=0)
  meta = token_data.load_token_meta(tokens)
  assert meta["stage1_fingerprint"] == stage1.fingerprint
  layout = stage1_lib.token_layout(stage1)
  token_data.check_token_meta(meta, layout, tokens, stage1_fingerprint=stage1.fingerprint)
  # The same path holding other weights (e.g. a stage-1 run trained further).
  retrained = stage1_lib.load_stage1(stage1_dirs[1])
  retrained = dataclasses.replace(retrained, source=stage1.source)
  with pytest.raises(ValueError, match=re.escape(
      f"tokens in {tokens} were encoded by a stage-1 model with tokenizer fingerprint "
      f"{stage1.fingerprint} (from {stage1.source}), but config.stage1.path gives fingerprint "
      f"{retrained.fingerprint}: its encoder, router or codebook differ")):
    token_data.check_token_meta(meta, layout, tokens, stage1_fingerprint=retrained.fingerprint)
  with pytest.raises(ValueError, match=re.escape(
      f"tokens in {tokens} were made with stage1_fingerprint={stage1.fingerprint!r}, not "
      f"{retrained.fingerprint!r}")):
    token_encoding.encode_dataset(retrained, data_cfg, tokens, split="train", num_classes=0)
  # Tokens written before fingerprints existed are not checked for it.
  old = {k: v for k, v in meta.items() if k != "stage1_fingerprint"}
  token_data.check_token_meta(old, layout, tokens, stage1_fingerprint=retrained.fingerprint)


def test_stage2_run_records_and_checks_its_stage1(stage1_dirs, stage1, tmp_path):
  other = stage1_lib.load_stage1(stage1_dirs[1])
  workdir = str(tmp_path / "run")
  tt.record_stage1(workdir, stage1)
  with open(os.path.join(workdir, gen.STAGE1_RECORD)) as f:
    assert json.load(f) == {"path": stage1.source, "fingerprint": stage1.fingerprint}
  tt.record_stage1(workdir, stage1)  # a resume with the same model
  gen.check_stage1_of_run(os.path.join(workdir, "checkpoints", "5"), stage1)
  message = re.escape(
      f"the transformer in {workdir} was trained on tokens of the stage-1 model {stage1.source} "
      f"(tokenizer fingerprint {stage1.fingerprint}), but config.stage1.path={other.source} "
      f"gives fingerprint {other.fingerprint}")
  with pytest.raises(ValueError, match=message):
    tt.record_stage1(workdir, other)  # a resume with another model
  with pytest.raises(ValueError, match=message.replace(re.escape(workdir),
                                                       re.escape(workdir + "/checkpoints/5"))):
    gen.check_stage1_of_run(os.path.join(workdir, "checkpoints", "5"), other)
  gen.check_stage1_of_run(str(tmp_path / "converted"), other)  # no record: not checked
