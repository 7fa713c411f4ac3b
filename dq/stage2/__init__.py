"""Stage 2: coarse-to-fine token sequences and the DQ-Transformer."""
from dq.stage2.layout import TokenLayout
from dq.stage2.losses import packed_losses, stackgpt_losses
from dq.stage2.tokens import (
    official_permuter_order,
    pack_tokens,
    pack_tokens_jax,
    unpack_tokens,
    unpack_tokens_jax,
)
from dq.stage2.sampler import SamplingConfig, make_sampler, sampling_config_from
from dq.stage2.transformer import StackedTransformer, init_cache

__all__ = [
    "TokenLayout",
    "official_permuter_order",
    "pack_tokens",
    "pack_tokens_jax",
    "unpack_tokens",
    "unpack_tokens_jax",
    "SamplingConfig",
    "StackedTransformer",
    "init_cache",
    "make_sampler",
    "packed_losses",
    "sampling_config_from",
    "stackgpt_losses",
]
