"""Stage 2: coarse-to-fine token sequences and the DQ-Transformer."""
from dq.stage2.tokens import (
    TokenLayout,
    official_permuter_order,
    pack_tokens,
    pack_tokens_jax,
    unpack_tokens,
    unpack_tokens_jax,
)
from dq.stage2.transformer import StackedTransformer, stackgpt_losses

__all__ = [
    "TokenLayout",
    "official_permuter_order",
    "pack_tokens",
    "pack_tokens_jax",
    "unpack_tokens",
    "unpack_tokens_jax",
    "StackedTransformer",
    "stackgpt_losses",
]
