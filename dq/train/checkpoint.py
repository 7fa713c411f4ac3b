"""Temporary alias: this module is `dq.checkpoint` (moved from here).

Kept only until `dq/train/transformer_sample.py` imports `dq.checkpoint`; delete it then
(tests/test_import_layers.py lists it in `_PENDING`).
"""
import sys

from dq import checkpoint

sys.modules[__name__] = checkpoint
