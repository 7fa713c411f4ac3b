"""The FID jobs, one module each (`run(config, workdir, inception_params=None) -> dict`):
`reference` (reference statistics), `reconstruction` (rFID of a DQ-VAE: the `stage1` job) and
`generation` (FID / IS / precision-recall of DQ-Transformer samples: the `stage2` job); what
they share is in `common`. `dq.evaluation.fid_jobs` composes them."""
