#!/usr/bin/env bash
# Run N `python -m dq.main` processes on this machine as one multi-process JAX job (coordinator on
# localhost): on fake CPU devices by default, or on GPUs split between the processes (--gpus).
# See launch/README.md.
set -euo pipefail

readonly SYNOPSIS="usage: $0 [-n NUM_PROCESSES] [--port P] [--devices-per-process D | --gpus LIST] \
[--python PYTHON] CONFIG[:args] WORKDIR [--config.x=y ...] [-- extra dq.main flags] [--dry-run]"

# shellcheck source-path=SCRIPTDIR source=common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"

readonly KILL_GRACE_S=10

usage() {
  cat <<EOF
$SYNOPSIS

Starts process i = 0..N-1 as
  python -m dq.main --config=CONFIG --workdir=WORKDIR \\
    --coordinator_address=localhost:PORT --num_processes=N --process_id=i [--config.x=y ...]
with its output in WORKDIR/log.process<i>.txt, waits for all of them, and stops the others as soon
as one fails. The exit code is the first failing process's (0 when all succeed).

options:
  -n, --num-processes N      processes (default 2)
  --port P                   coordinator port on localhost (default \$DQ_COORDINATOR_PORT or 12321)
  --devices-per-process D    CPU mode (default): JAX_PLATFORMS=cpu and
                             XLA_FLAGS=--xla_force_host_platform_device_count=D (default 4) unless
                             already set in the environment
  --gpus LIST                GPU mode: comma-separated GPU ids split evenly between the processes
                             in order, as CUDA_VISIBLE_DEVICES (e.g. -n 2 --gpus 0,1,2,3)
  --python PYTHON            interpreter (default \$PYTHON or python)
  --dry-run                  print the commands, one per line, and run nothing
  -h, --help                 this message
EOF
}

num_processes=2
port="${DQ_COORDINATOR_PORT:-12321}"
devices_per_process=""
gpus=""
python_bin="${PYTHON:-python}"
dry_run=0
positional=()
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --config.*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    -n) take_value -n "$@"; num_processes="$value"; shift "$consumed" ;;
    --num-processes | --num-processes=*)
      take_value --num-processes "$@"; num_processes="$value"; shift "$consumed" ;;
    --port | --port=*) take_value --port "$@"; port="$value"; shift "$consumed" ;;
    --devices-per-process | --devices-per-process=*)
      take_value --devices-per-process "$@"; devices_per_process="$value"; shift "$consumed" ;;
    --gpus | --gpus=*) take_value --gpus "$@"; gpus="$value"; shift "$consumed" ;;
    --python | --python=*) take_value --python "$@"; python_bin="$value"; shift "$consumed" ;;
    -*) die_usage "unknown option '$1'" ;;
    *) positional+=("$1"); shift ;;
  esac
done

[ ${#positional[@]} -eq 2 ] || die_usage "expected CONFIG and WORKDIR, got ${#positional[@]} \
positional argument(s)"
config="${positional[0]}"
workdir="${positional[1]}"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] \
  || die_usage "-n must be a positive integer: got '$num_processes'"
if ! [[ "$port" =~ ^[1-9][0-9]*$ ]] || [ "$port" -gt 65535 ]; then
  die_usage "--port must be in 1..65535: got '$port'"
fi
case "$workdir" in
  *://*) die_usage "WORKDIR must be a local folder (it holds log.process<i>.txt): got '$workdir'" ;;
esac

# Per-process environment assignments, one string of `env` arguments per process.
gpu_groups=()
env_common=()
if [ -n "$gpus" ]; then
  [ -z "$devices_per_process" ] \
    || die_usage "--devices-per-process is for CPU runs; not with --gpus"
  [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die_usage "--gpus must be comma-separated GPU ids like 0,1,2,3: got '$gpus'"
  IFS=, read -r -a gpu_ids <<< "$gpus"
  if [ $((${#gpu_ids[@]} % num_processes)) -ne 0 ]; then
    die_usage "--gpus lists ${#gpu_ids[@]} GPU(s), not a multiple of $num_processes processes"
  fi
  per_process=$((${#gpu_ids[@]} / num_processes))
  for ((i = 0; i < num_processes; i++)); do
    group="${gpu_ids[*]:i*per_process:per_process}"
    gpu_groups+=("${group// /,}")
  done
else
  devices_per_process="${devices_per_process:-4}"
  [[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] \
    || die_usage "--devices-per-process must be a positive integer: got '$devices_per_process'"
  env_common+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}")
  xla_flags="${XLA_FLAGS:-}"
  if [[ "$xla_flags" == *xla_force_host_platform_device_count* ]]; then
    echo "$0: note: XLA_FLAGS already sets the host device count; --devices-per-process ignored" >&2
  else
    xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices_per_process"
  fi
  env_common+=("XLA_FLAGS=$xla_flags")
fi

# The command of process $1.
process_cmd() {
  local process_id="$1"
  cmd=(env "${env_common[@]}")
  [ -z "$gpus" ] || cmd+=("CUDA_VISIBLE_DEVICES=${gpu_groups[$process_id]}")
  cmd+=("$python_bin" -m dq.main "--config=$config" "--workdir=$workdir"
        "--coordinator_address=localhost:$port" "--num_processes=$num_processes"
        "--process_id=$process_id" "${extra[@]}")
}

log_path() {
  printf '%s/log.process%d.txt\n' "$workdir" "$1"
}

if [ "$dry_run" = 1 ]; then
  print_cmd mkdir -p "$workdir"
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "$i"
    printf '%s < /dev/null > %q 2>&1 &\n' "$(print_cmd "${cmd[@]}")" "$(log_path "$i")"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$workdir"
pids=()          # pids[i]: process i, cleared once it has been waited for
running_count=0

is_running() {
  local running
  running=" $(jobs -rp | tr '\n' ' ') "
  [[ "$running" == *" $1 "* ]]
}

# Each process leads its own process group (started under `set -m`), so signals reach its children
# too. Sends SIGTERM to the groups still running, SIGKILL to what is left after KILL_GRACE_S.
stop_all() {
  local i deadline
  for i in "${!pids[@]}"; do
    [ -z "${pids[$i]}" ] || kill -TERM -- "-${pids[$i]}" 2>/dev/null || true
  done
  deadline=$((SECONDS + KILL_GRACE_S))
  for i in "${!pids[@]}"; do
    [ -n "${pids[$i]}" ] || continue
    while is_running "${pids[$i]}" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if is_running "${pids[$i]}"; then
      echo "$0: process $i (pid ${pids[$i]}) ignored SIGTERM; sending SIGKILL" >&2
    fi
    kill -KILL -- "-${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
    pids[i]=""
  done
}

trap stop_all EXIT
trap 'echo "$0: interrupted; stopping the processes" >&2; exit 130' INT
trap 'echo "$0: terminated; stopping the processes" >&2; exit 143' TERM

set -m
for ((i = 0; i < num_processes; i++)); do
  process_cmd "$i"
  "${cmd[@]}" < /dev/null > "$(log_path "$i")" 2>&1 &
  pids+=("$!")
  running_count=$((running_count + 1))
  echo "process $i: pid $!, log $(log_path "$i")"
done
set +m

first_failure=0
while [ "$running_count" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    if [ -z "$pid" ] || is_running "$pid"; then continue; fi
    status=0
    wait "$pid" || status=$?
    pids[i]=""
    running_count=$((running_count - 1))
    if [ "$status" -ne 0 ] && [ "$first_failure" -eq 0 ]; then
      first_failure="$status"
      echo "$0: process $i exited with status $status; stopping the others. Its log ends:" >&2
      tail -n 20 "$(log_path "$i")" >&2 || true
      stop_all
      running_count=0
    fi
  done
  [ "$running_count" -eq 0 ] || sleep 0.5
done
exit "$first_failure"
