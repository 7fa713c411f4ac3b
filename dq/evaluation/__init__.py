"""Evaluation: reconstruction metrics, the FID toolkit (InceptionV3, statistics, FID / IS /
precision-recall, reference statistics) and the FID jobs (`dq.evaluation.fid_jobs`:
`reference`, `stage1`, `stage2`; `python -m dq.main --config=configs/fid_*.py`).

The names below load their module on first use (PEP 562), so `import dq.evaluation.metrics`
stays light and `dq.evaluation.inception_convert` (which the weight loader imports) can import
`dq.evaluation.inception` without a cycle.
"""
import importlib

_EXPORTS = {
    "FeatureStats": "dq.evaluation.fid",
    "fid_from_features": "dq.evaluation.fid",
    "frechet_distance": "dq.evaluation.fid",
    "inception_score": "dq.evaluation.fid",
    "load_stats": "dq.evaluation.fid",
    "precision_recall": "dq.evaluation.fid",
    "save_stats": "dq.evaluation.fid",
    "InceptionV3": "dq.evaluation.inception",
    "extract_features": "dq.evaluation.inception",
    "images_to_uint8": "dq.evaluation.inception",
    "preprocess_for_inception": "dq.evaluation.inception",
    "random_inception_params": "dq.evaluation.inception",
    "find_inception_weights": "dq.evaluation.inception_weights",
    "load_inception_params": "dq.evaluation.inception_weights",
    "compute_reference_stats": "dq.evaluation.reference_stats",
    "features_in_batches": "dq.evaluation.reference_stats",
    "fid_base_config": "dq.configs",
    "fid_to_reference": "dq.evaluation.evaluators.common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'dq.evaluation' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
