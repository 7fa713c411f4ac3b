"""Input data: embedded default data, image folders, TFDS ArrayRecord builds, grain pipelines.

Entry points: `dq.data.pipeline.make_dataset` / `build_source` / `detail_mask_available`,
`dq.data.config.default_data_config`, skip counters in `dq.data.stats`.
"""
