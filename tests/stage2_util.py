"""A tiny class-conditional DQ-Transformer config and random packed batches, for stage-2 tests.

The config trains on tokens of the tiny DQ-VAE of `stage1_util.make_tiny_stage1` (32 px,
coarse 4x4, fine 8x8, K=16, 9 classes): width 32, 2 heads, 1 position + 1 content layer.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from dq.configs import transformer_base_config
from dq.stage2.build import default_transformer_config
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import pack_tokens

LAYOUT = TokenLayout(coarse_size=4, fine_size=8, codebook_size=16, num_classes=9)


def tiny_model_config() -> ml_collections.ConfigDict:
  model = default_transformer_config()
  model.update(dict(n_embd=32, n_head=2, position_layers=1, content_layers=1))
  return model


def tiny_config(stage1_path: str, num_steps: int = 1, **train) -> ml_collections.ConfigDict:
  """Stage-2 trainer config on the embedded procedural images; `train` overrides config.train."""
  config = transformer_base_config()
  config.stage1.path = stage1_path
  config.data.name = "embedded"
  config.data.embedded.update(dict(procedural_fraction=1.0, photos=False, train_size=64,
                                   eval_size=16))
  config.class_conditional = True
  config.model = tiny_model_config()
  config.optim.update(dict(schedule="constant", warmup_steps=0))
  config.train.update(dict(batch_size=8, num_steps=num_steps, log_every=1, sample_every=0,
                           checkpoint_every=1, async_checkpointing=False, tensorboard=False))
  config.train.update(train)
  config.tokens.update(dict(encode_batch_size=16, shard_size=32))
  config.sample.update(dict(num_images=5, batch_size=4, labels="0,3"))
  return config


def random_batch(layout: TokenLayout, batch: int, seed: int = 0) -> dict:
  """Packed tokens of random code maps: coarse regions carry one code per 2x2 block."""
  rng = np.random.default_rng(seed)
  hc, wc = layout.coarse_size
  grain = rng.integers(0, 2, (batch, hc, wc))
  coarse = np.repeat(np.repeat(rng.integers(0, layout.codebook_size, (batch, hc, wc)), 2, 1),
                     2, 2)
  fine = rng.integers(0, layout.codebook_size, (batch,) + layout.fine_size)
  codes = np.where(np.repeat(np.repeat(grain, 2, 1), 2, 2) == 1, fine, coarse)
  labels = rng.integers(0, layout.num_classes, batch) if layout.num_classes else None
  return pack_tokens(codes, grain, layout, labels)
