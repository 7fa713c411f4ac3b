"""Temporary alias: this module is `dq.tokenizer` (moved from here).

Kept only until `dq/evaluation/fid_jobs.py` and `dq/train/transformer_sample.py` import
`dq.tokenizer`; delete it then (tests/test_import_layers.py lists it in `_PENDING`).
"""
import sys

from dq import tokenizer

sys.modules[__name__] = tokenizer
