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


def subprocess_env(devices: int, cache_dir: str, **extra: str) -> dict:
  """Environment of a CPU `dq.main` subprocess: `devices` fake devices, XLA's cheaper backend
  passes (as in conftest) and a compilation cache shared by the test's processes."""
  import os
  flags = (f"--xla_force_host_platform_device_count={devices} "
           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
              **extra)
