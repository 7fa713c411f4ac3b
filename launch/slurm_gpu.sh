#!/usr/bin/env bash
# Write (and with --submit, sbatch) a Slurm job that runs `python -m dq.main --distributed=auto`
# on N GPU nodes: one process per GPU or one per node. See launch/README.md.
set -euo pipefail

readonly SYNOPSIS="usage: $0 [--nodes N] [--gpus-per-node G] [--mode per-gpu|per-node] \
[--partition P] [--time T] [--venv PATH] [options] CONFIG[:args] WORKDIR [--config.x=y ...] \
[-- extra dq.main flags] [--dry-run] [--submit]"

# shellcheck source-path=SCRIPTDIR source=common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"

usage() {
  cat <<EOF
$SYNOPSIS

Writes an sbatch script to WORKDIR/slurm/<job-name>-<time>.sbatch (or --script PATH) and prints
its path; --submit also runs sbatch on it. Every task runs
  python -m dq.main --config=CONFIG --workdir=WORKDIR --distributed=auto [--config.x=y ...]
and jax.distributed.initialize() reads the SLURM_* variables. Relative CONFIG and WORKDIR paths
are relative to the current folder (the job starts there: #SBATCH --chdir).

options:
  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs per node (default 8)
  --mode per-gpu       one process per GPU: --ntasks-per-node=G --gpus-per-task=1 (default)
  --mode per-node      one process per node driving all G GPUs: --ntasks-per-node=1
  --partition P        Slurm partition
  --time T             time limit, e.g. 2-00:00:00
  --account A          Slurm account
  --cpus-per-task C    CPUs per task (passed to sbatch and srun)
  --job-name NAME      job name (default dq)
  --venv PATH          virtual environment to activate in the job (default: python on PATH)
  --script PATH        where to write the sbatch script
  --submit             run sbatch on the script
  --dry-run            print the commands (mkdir, the script as a here-document, sbatch) only
  -h, --help           this message
EOF
}

# An absolute path for a relative local one (left alone: absolute paths and URLs like gs://).
absolute() {
  case "$1" in
    /* | *://*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "$1" ;;
  esac
}

nodes=1
gpus_per_node=8
mode="per-gpu"
partition=""
time_limit=""
account=""
cpus_per_task=""
job_name="dq"
venv=""
script=""
submit=0
dry_run=0
positional=()
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --submit) submit=1; shift ;;
    --config.*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    --nodes | --nodes=*) take_value --nodes "$@"; nodes="$value"; shift "$consumed" ;;
    --gpus-per-node | --gpus-per-node=*)
      take_value --gpus-per-node "$@"; gpus_per_node="$value"; shift "$consumed" ;;
    --mode | --mode=*) take_value --mode "$@"; mode="$value"; shift "$consumed" ;;
    --partition | --partition=*)
      take_value --partition "$@"; partition="$value"; shift "$consumed" ;;
    --time | --time=*) take_value --time "$@"; time_limit="$value"; shift "$consumed" ;;
    --account | --account=*) take_value --account "$@"; account="$value"; shift "$consumed" ;;
    --cpus-per-task | --cpus-per-task=*)
      take_value --cpus-per-task "$@"; cpus_per_task="$value"; shift "$consumed" ;;
    --job-name | --job-name=*) take_value --job-name "$@"; job_name="$value"; shift "$consumed" ;;
    --venv | --venv=*) take_value --venv "$@"; venv="$value"; shift "$consumed" ;;
    --script | --script=*) take_value --script "$@"; script="$value"; shift "$consumed" ;;
    -*) die_usage "unknown option '$1'" ;;
    *) positional+=("$1"); shift ;;
  esac
done

[ ${#positional[@]} -eq 2 ] || die_usage "expected CONFIG and WORKDIR, got ${#positional[@]} \
positional argument(s)"
config="${positional[0]}"
workdir="${positional[1]}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die_usage "--nodes must be a positive integer: got '$nodes'"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] \
  || die_usage "--gpus-per-node must be a positive integer: got '$gpus_per_node'"
[ -z "$cpus_per_task" ] || [[ "$cpus_per_task" =~ ^[1-9][0-9]*$ ]] \
  || die_usage "--cpus-per-task must be a positive integer: got '$cpus_per_task'"
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || die_usage "--job-name must match [A-Za-z0-9._-]+"
case "$workdir" in
  *://*) die_usage "WORKDIR must be a path on a file system the nodes share: got '$workdir'" ;;
esac
case "$mode" in
  per-gpu) tasks_per_node="$gpus_per_node"; gpus_per_task=1 ;;
  per-node) tasks_per_node=1; gpus_per_task="$gpus_per_node" ;;
  *) die_usage "--mode must be per-gpu or per-node: got '$mode'" ;;
esac

submit_dir="$PWD"
workdir=$(absolute "$workdir")
[ -z "$venv" ] || venv=$(absolute "$venv")
[ -n "$script" ] || script="$workdir/slurm/$job_name-$(date +%Y%m%d-%H%M%S).sbatch"
script=$(absolute "$script")
# Each task sees its gpus_per_task GPUs (Slurm binds --gpus-per-task GPUs to each task) as CUDA
# devices 0..gpus_per_task-1; JAX's Slurm detection would otherwise pick device SLURM_LOCALID only.
local_device_ids=$(seq -s, 0 $((gpus_per_task - 1)))

srun_cmd=(srun "--ntasks-per-node=$tasks_per_node" "--gpus-per-task=$gpus_per_task")
[ -z "$cpus_per_task" ] || srun_cmd+=("--cpus-per-task=$cpus_per_task")
srun_cmd+=(--kill-on-bad-exit=1 --open-mode=append "--output=$workdir/log.process%t.txt"
           python -m dq.main "--config=$config" "--workdir=$workdir" --distributed=auto
           "${extra[@]}")

sbatch_lines=(
  "--job-name=$job_name"
  "--nodes=$nodes"
  "--ntasks-per-node=$tasks_per_node"
  "--gpus-per-task=$gpus_per_task"
  "--chdir=$submit_dir"
  "--output=$workdir/slurm/%x-%j.out"
)
[ -z "$partition" ] || sbatch_lines+=("--partition=$partition")
[ -z "$time_limit" ] || sbatch_lines+=("--time=$time_limit")
[ -z "$account" ] || sbatch_lines+=("--account=$account")
[ -z "$cpus_per_task" ] || sbatch_lines+=("--cpus-per-task=$cpus_per_task")

job_script() {
  local line
  echo "#!/usr/bin/env bash"
  for line in "${sbatch_lines[@]}"; do
    printf '#SBATCH %s\n' "$line"
  done
  echo "# Written by launch/slurm_gpu.sh (mode $mode, $nodes x $gpus_per_node GPUs)."
  echo "set -eo pipefail"
  if [ -n "$venv" ]; then
    printf 'source %q\n' "$venv/bin/activate"
  fi
  echo "set -u"
  printf 'export JAX_LOCAL_DEVICE_IDS=%s\n' "$local_device_ids"
  print_cmd mkdir -p "$workdir"
  print_cmd "${srun_cmd[@]}"
}

if [ "$dry_run" = 1 ]; then
  print_cmd mkdir -p "$workdir/slurm" "$(dirname "$script")"
  printf 'cat > %q <<'\''DQ_SBATCH_EOF'\''\n' "$script"
  job_script
  echo "DQ_SBATCH_EOF"
  [ "$submit" = 0 ] || print_cmd sbatch "$script"
  exit 0
fi

mkdir -p "$workdir/slurm" "$(dirname "$script")"
job_script > "$script"
echo "$script"
[ "$submit" = 0 ] || sbatch "$script"
