"""What `python -m dq.main` prints (issue 18): a short run shows dq's own lines only (no orbax or
absl INFO chatter) with the compilation time, and known user errors end in one readable line
unless --verbose."""
import os
import subprocess
import sys

from cli_util import subprocess_env, tiny_vae_flags

REPO = os.path.join(os.path.dirname(__file__), "..")


def _main(args, tmp_path, timeout=300):
  env = subprocess_env(1, str(tmp_path / "jax_cache"))
  return subprocess.run([sys.executable, "-m", "dq.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_a_30_step_run_prints_at_most_40_lines(tmp_path):
  workdir = str(tmp_path / "wd")
  flags = tiny_vae_flags(30, 10, "--config.train.log_every=10", "--config.eval.at_end=True",
                         "--config.eval.lpips=False", "--config.eval.max_images=16",
                         "--config.eval.batch_size=8", "--config.train.async_checkpointing=True")
  result = _main([f"--workdir={workdir}", *flags], tmp_path)
  lines = (result.stdout + result.stderr).splitlines()
  assert result.returncode == 0, "\n".join(lines[-30:])
  assert len(lines) <= 40, "\n".join(lines)
  text = "\n".join(lines)
  assert "Compiling the train step..." in text and "Train step compiled and run once in" in text
  assert "step 30/30" in text and "checkpoint_manager" not in text and "orbax" not in text
  assert os.listdir(os.path.join(workdir, "eval"))


def test_known_user_errors_end_in_one_line(tmp_path):
  missing = _main(["--config=configs/demo_vea.py", f"--workdir={tmp_path}"], tmp_path)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      "dq.main: error: --config=configs/demo_vea.py: no such config file (--verbose shows "
      "the traceback)"]
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n  pass\n")
  syntax = _main([f"--config={broken}", f"--workdir={tmp_path}"], tmp_path)
  assert syntax.returncode == 1
  assert syntax.stderr.strip().splitlines() == [
      f"dq.main: error: the config file {broken} does not parse: line 1: invalid syntax: "
      "def get_config(: (--verbose shows the traceback)"]
  checked = _main(["--config=configs/demo_vae.py", "--config.train.num_steps=0",
                   f"--workdir={tmp_path}"], tmp_path)
  assert checked.returncode == 1
  lines = checked.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("dq.main: error: config.train.num_steps = 0"), \
      lines
  verbose = _main(["--config=configs/demo_vea.py", f"--workdir={tmp_path}", "--verbose"],
                  tmp_path)
  assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
