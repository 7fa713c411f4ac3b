"""Test setup: 8 fake CPU devices so sharding is real, full float32 matmuls, and XLA's cheaper
CPU backend passes (compiling dominates these tiny tests: about 17% less wall time)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Trainer tests build the same step several times (a run, then its resume): a per-session
# persistent compilation cache lets the later builds skip XLA compilation.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="dq_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture_path(name: str) -> pathlib.Path:
  """Path of a shared fixture; fails (never skips) when the fixture is missing."""
  for base in (os.environ.get("DQ_FIXTURES"), FIXTURES, pathlib.Path(__file__).resolve().parents[1] / "shared" / "fixtures"):
    if base and (pathlib.Path(base) / name).exists():
      return pathlib.Path(base) / name
  raise FileNotFoundError(f"fixture {name} not found; set DQ_FIXTURES to the shared/fixtures folder")


@pytest.fixture
def official_dqvae():
  import numpy as np
  return dict(np.load(fixture_path("official_dqvae_dual_64px.npz")))


@pytest.fixture(scope="session")
def vae_run_4_steps(tmp_path_factory):
  """A tiny stage-1 workdir (`test_train_vae.tiny_config`) trained 4 steps with checkpoints 2
  and 4; tests copy it before changing it."""
  from dq.train import vae_trainer
  from test_train_vae import tiny_config
  path = str(tmp_path_factory.mktemp("vae_run_4_steps") / "wd")
  vae_trainer.train_and_evaluate(tiny_config(4, checkpoint_every=2), path)
  return path


def _tree_digest(path: str) -> dict[str, str]:
  import hashlib
  root = pathlib.Path(path)
  return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def tiny_stage1_dir(tmp_path_factory):
  """The tiny feature-router DQ-VAE of `stage1_util.make_tiny_stage1` (seed 0) as a converted
  folder, built once per session. Tests read it; one that changes it fails at session end."""
  from stage1_util import make_tiny_stage1
  path = make_tiny_stage1(str(tmp_path_factory.mktemp("tiny_stage1")))
  before = _tree_digest(path)
  yield path
  assert _tree_digest(path) == before, f"a test changed the shared tiny stage-1 folder {path}"

