"""The stage-2 model config (`config.model`) and the StackedTransformer built from it."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from dq.stage2.layout import TokenLayout
from dq.stage2.transformer import ATTENTION_IMPLEMENTATIONS, StackedTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_transformer_config() -> ml_collections.ConfigDict:
  """Every StackedTransformer field with a default (a small model; configs set the size)."""
  return ml_collections.ConfigDict(dict(
      n_embd=256,
      n_head=8,
      position_layers=2,
      content_layers=4,
      dropout=0.0,
      # None: plain XLA einsum attention; 'xla' or 'cudnn': jax.nn.dot_product_attention.
      attention_impl=ml_collections.config_dict.placeholder(str),
      dtype="float32",  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
      remat=False,  # recompute block activations in the backward pass (less memory)
  ))


def _positive_int(model_cfg: Any, name: str) -> int:
  value = model_cfg[name]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
      or value < 1:
    raise ValueError(f"config.model.{name} must be a positive int; got {value!r}")
  return int(value)


def build_transformer(model_cfg: Any, layout: TokenLayout) -> StackedTransformer:
  """StackedTransformer sized for `layout` (vocabularies, block_size = max_len - 1).

  Raises:
    ValueError: naming the first `config.model` field that is out of range.
  """
  n_embd = _positive_int(model_cfg, "n_embd")
  n_head = _positive_int(model_cfg, "n_head")
  if n_embd % n_head:
    raise ValueError(f"config.model.n_embd={n_embd} must be divisible by "
                     f"config.model.n_head={n_head}")
  position_layers = _positive_int(model_cfg, "position_layers")
  content_layers = _positive_int(model_cfg, "content_layers")
  dropout = float(model_cfg.dropout)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"config.model.dropout must lie in [0, 1); got {model_cfg.dropout}")
  attention_impl = model_cfg.get("attention_impl") or None
  if attention_impl is not None and attention_impl not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention_impl must be None (plain XLA) or one of "
                     f"{ATTENTION_IMPLEMENTATIONS}; got {attention_impl!r}")
  dtype = model_cfg.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
  return StackedTransformer(
      vocab_size=layout.content_vocab_size,
      coarse_position_size=layout.coarse_position_vocab_size,
      fine_position_size=layout.fine_position_vocab_size,
      segment_size=2,
      block_size=layout.max_len - 1,
      position_layers=position_layers,
      content_layers=content_layers,
      n_head=n_head,
      n_embd=n_embd,
      dropout=dropout,
      attention_impl=attention_impl,
      dtype=DTYPES[dtype],
      remat=bool(model_cfg.get("remat", False)))
