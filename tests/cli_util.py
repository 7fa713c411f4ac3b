"""Command-line flags of a tiny stage-1 run of `python -m dq.main` (for subprocess tests)."""


def tiny_vae_flags(num_steps: int, checkpoint_every: int, *extra: str) -> list[str]:
  """demo_vae at 32 px, 64 train images, codebook 32, batch 8, constant lr, a log line per step,
  synchronous checkpoints, no summaries or final eval; `extra` flags are appended."""
  return [
      "--config=configs/demo_vae.py", "--config.data.image_size=32",
      "--config.model.resolution=32", "--config.data.embedded.train_size=64",
      "--config.data.embedded.eval_size=16", "--config.model.codebook_size=32",
      "--config.train.batch_size=8", f"--config.train.num_steps={num_steps}",
      "--config.train.log_every=1", "--config.train.summary_every=0",
      f"--config.train.checkpoint_every={checkpoint_every}",
      "--config.train.async_checkpointing=False", "--config.train.tensorboard=False",
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
      "--config.eval.at_end=False", *extra]
