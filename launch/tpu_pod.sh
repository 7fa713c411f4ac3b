#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), copy this repo to every worker, install it,
# run `python -m dq.main` on all workers at once, follow the logs and delete the TPU.
# See launch/README.md; `launch/tpu_pod.sh --help` lists the options.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# The worker's home in remote commands: stays unquoted there so the worker's shell expands it.
# shellcheck disable=SC2088
readonly REMOTE_HOME='~'
readonly LIBTPU_RELEASES="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
readonly WORKER_NUMBER_URL="http://metadata.google.internal/computeMetadata/v1/instance/\
attributes/agent-worker-number"

readonly SYNOPSIS="usage: $0 {create|setup|run|tail|stop|delete} [options] [--config.x=y ...] \
[-- extra dq.main flags]"

# shellcheck source-path=SCRIPTDIR source=common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"

usage() {
  cat <<EOF
$SYNOPSIS

subcommands:
  create   gcloud compute tpus tpu-vm create (needs --accelerator)
  setup    copy the repo to all workers (git archive HEAD, or git clone --repo-url) and install it
           into a venv with jax[tpu] pinned to requirements.txt's jax version
  run      start python -m dq.main --distributed=auto on all workers (nohup, one log per worker;
           needs --config and --workdir, e.g. gs://bucket/run)
  tail     tail -F the log of one worker (--worker, default 0)
  stop     kill the run started by 'run' (its process group) on all workers
  delete   delete the TPU (--yes skips gcloud's prompt)

options (environment variable defaults in brackets):
  --name NAME            TPU name [TPU_NAME]
  --zone ZONE            zone, e.g. us-central2-b [TPU_ZONE]
  --project PROJECT      GCP project; gcloud's default when unset [TPU_PROJECT]
  --accelerator TYPE     accelerator type, e.g. v4-32, v5litepod-16, v6e-8 [TPU_ACCELERATOR]
  --version RUNTIME      TPU VM runtime version [TPU_VERSION]; default from the accelerator:
                         v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot | --preemptible create a Spot / preemptible TPU
  --repo-url URL         setup: git clone URL on the workers instead of copying git archive HEAD
  --branch REF           setup: the ref to check out with --repo-url (default HEAD)
  --jax-version V        setup: jax[tpu] version (default: jax== in requirements.txt)
  --python PYTHON        setup: interpreter that creates the venv on the workers (default python3;
                         requirements.txt needs Python >= 3.11)
  --remote-dir DIR       repo folder on the workers, under \$HOME (default dq)
  --venv DIR             venv on the workers, under \$HOME (default dq_venv)
  --config CONFIG[:args] run: config file (relative to the repo)
  --workdir DIR          run: workdir, usually gs://BUCKET/PATH
  --log-name NAME        run/tail/stop: log file stem, ~/dq_logs/NAME.worker<i>.log (default dq)
  --worker W             tail: which worker (default 0)
  --yes                  delete: do not ask for confirmation
  --dry-run              print every command (one per line, shell-quoted) and run nothing
  -h, --help             this message
EOF
}

# Runs a command, or only prints it under --dry-run.
run_cmd() {
  if [ "$dry_run" = 1 ]; then print_cmd "$@"; else "$@"; fi
}

default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# The version in requirements.txt's `jax==X` line.
requirements_jax_version() {
  local requirements="$REPO_ROOT/requirements.txt" version
  if [ ! -f "$requirements" ]; then
    echo "$0: $requirements not found (needed for the jax[tpu] pin; or pass --jax-version)" >&2
    exit 1
  fi
  version=$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$requirements" | head -n 1)
  if [ -z "$version" ]; then
    echo "$0: no 'jax==VERSION' line in $requirements (or pass --jax-version)" >&2
    exit 1
  fi
  printf '%s\n' "$version"
}

# A path under the worker's home: ~/ then the quoted relative path.
remote_path() {
  case "$1" in
    /* | \~*) die_usage "remote paths are relative to the worker's \$HOME: got '$1'" ;;
  esac
  printf '%s/%q' "$REMOTE_HOME" "$1"
}

subcommand=""
name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-}"
version="${TPU_VERSION:-}"
capacity=""
repo_url=""
branch="HEAD"
jax_version=""
python_bin="python3"
remote_dir="dq"
venv="dq_venv"
config=""
workdir=""
log_name="dq"
worker="0"
yes=0
dry_run=0
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --spot | --preemptible) capacity="$1"; shift ;;
    --yes) yes=1; shift ;;
    --config.*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    --name | --name=*) take_value --name "$@"; name="$value"; shift "$consumed" ;;
    --zone | --zone=*) take_value --zone "$@"; zone="$value"; shift "$consumed" ;;
    --project | --project=*) take_value --project "$@"; project="$value"; shift "$consumed" ;;
    --accelerator | --accelerator=*)
      take_value --accelerator "$@"; accelerator="$value"; shift "$consumed" ;;
    --version | --version=*) take_value --version "$@"; version="$value"; shift "$consumed" ;;
    --repo-url | --repo-url=*) take_value --repo-url "$@"; repo_url="$value"; shift "$consumed" ;;
    --branch | --branch=*) take_value --branch "$@"; branch="$value"; shift "$consumed" ;;
    --jax-version | --jax-version=*)
      take_value --jax-version "$@"; jax_version="$value"; shift "$consumed" ;;
    --python | --python=*) take_value --python "$@"; python_bin="$value"; shift "$consumed" ;;
    --remote-dir | --remote-dir=*)
      take_value --remote-dir "$@"; remote_dir="$value"; shift "$consumed" ;;
    --venv | --venv=*) take_value --venv "$@"; venv="$value"; shift "$consumed" ;;
    --config | --config=*) take_value --config "$@"; config="$value"; shift "$consumed" ;;
    --workdir | --workdir=*) take_value --workdir "$@"; workdir="$value"; shift "$consumed" ;;
    --log-name | --log-name=*) take_value --log-name "$@"; log_name="$value"; shift "$consumed" ;;
    --worker | --worker=*) take_value --worker "$@"; worker="$value"; shift "$consumed" ;;
    -*) die_usage "unknown option '$1'" ;;
    *)
      [ -z "$subcommand" ] || die_usage "unexpected argument '$1' (subcommand is '$subcommand')"
      subcommand="$1"; shift ;;
  esac
done

[ -n "$subcommand" ] || die_usage "missing SUBCOMMAND"
case "$subcommand" in
  create | setup | run | tail | stop | delete) ;;
  *) die_usage "unknown subcommand '$subcommand'" ;;
esac
[ -n "$name" ] || die_usage "$subcommand needs --name (or TPU_NAME)"
[ -n "$zone" ] || die_usage "$subcommand needs --zone (or TPU_ZONE)"
[[ "$worker" =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker number: got '$worker'"
[[ "$log_name" =~ ^[A-Za-z0-9._-]+$ ]] || die_usage "--log-name must match [A-Za-z0-9._-]+"
if [ ${#extra[@]} -gt 0 ] && [ "$subcommand" != run ]; then
  die_usage "dq.main flags (${extra[0]} ...) only go with 'run'"
fi

gcloud_flags=("--zone=$zone")
[ -z "$project" ] || gcloud_flags+=("--project=$project")
tpu_vm=(gcloud compute tpus tpu-vm)
remote_repo=$(remote_path "$remote_dir")
remote_venv=$(remote_path "$venv")
remote_log_stem="$REMOTE_HOME/dq_logs/$log_name"

ssh_all() {
  run_cmd "${tpu_vm[@]}" ssh "$name" "${gcloud_flags[@]}" --worker=all "--command=$1"
}

case "$subcommand" in
  create)
    [ -n "$accelerator" ] || die_usage "create needs --accelerator (or TPU_ACCELERATOR), e.g. v4-32"
    if [ -z "$version" ]; then
      version=$(default_version "$accelerator") \
        || die_usage "no default runtime for accelerator '$accelerator': pass --version"
    fi
    create=("${tpu_vm[@]}" create "$name" "${gcloud_flags[@]}" "--accelerator-type=$accelerator"
            "--version=$version")
    [ -z "$capacity" ] || create+=("$capacity")
    run_cmd "${create[@]}"
    ;;

  setup)
    [ -n "$jax_version" ] || jax_version=$(requirements_jax_version)
    if [ -n "$repo_url" ]; then
      fetch="{ [ -d $remote_repo/.git ] || git clone $(printf '%q' "$repo_url") $remote_repo; }"
      fetch+=" && git -C $remote_repo fetch origin $(printf '%q' "$branch")"
      fetch+=" && git -C $remote_repo checkout --force FETCH_HEAD"
      ssh_all "$fetch"
    else
      if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
        echo "$0: warning: uncommitted changes are not copied (git archive HEAD)" >&2
      fi
      tarball="${TMPDIR:-/tmp}/dq-$name.tar.gz"
      run_cmd git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" HEAD
      run_cmd "${tpu_vm[@]}" scp --recurse "$tarball" "$name:dq.tar.gz" "${gcloud_flags[@]}" \
        --worker=all
      run_cmd rm -f "$tarball"
      ssh_all "mkdir -p $remote_repo && tar -xzf $REMOTE_HOME/dq.tar.gz -C $remote_repo\
 && rm $REMOTE_HOME/dq.tar.gz"
    fi
    install="$(printf '%q' "$python_bin") -m venv $remote_venv"
    install+=" && $remote_venv/bin/pip install --upgrade pip"
    install+=" && cd $remote_repo && $remote_venv/bin/pip install -r requirements.txt -e ."
    install+=" $(printf '%q' "jax[tpu]==$jax_version") -f $LIBTPU_RELEASES"
    ssh_all "$install"
    ;;

  run)
    [ -n "$config" ] || die_usage "run needs --config"
    [ -n "$workdir" ] || die_usage "run needs --workdir (e.g. gs://BUCKET/PATH)"
    train=("$remote_venv/bin/python" -m dq.main "--config=$config" "--workdir=$workdir"
           --distributed=auto "${extra[@]}")
    # Every worker runs the same command; jax.distributed.initialize() finds the pod's workers.
    # setsid: the run leads its own process group (stop kills the group), apart from the ssh
    # session.
    launch="cd $remote_repo && mkdir -p $REMOTE_HOME/dq_logs"
    launch+=" && worker=\$(curl -sf -H Metadata-Flavor:Google $WORKER_NUMBER_URL || hostname)"
    # ${train[0]} holds ~/..., which must stay unquoted to expand on the worker.
    launch+=" && { setsid nohup ${train[0]}$(printf ' %q' "${train[@]:1}")"
    launch+=" > $remote_log_stem.worker\"\$worker\".log 2>&1 < /dev/null &"
    launch+=" echo \$! > $remote_log_stem.pid; echo \"worker \$worker: pid \$!,"
    launch+=" log $remote_log_stem.worker\$worker.log\"; }"
    ssh_all "$launch"
    ;;

  tail)
    run_cmd "${tpu_vm[@]}" ssh "$name" "${gcloud_flags[@]}" "--worker=$worker" \
      "--command=tail -n 200 -F $remote_log_stem.worker*.log"
    ;;

  stop)
    ssh_all "if [ -f $remote_log_stem.pid ]; then kill -- -\$(cat $remote_log_stem.pid) || true;\
 rm -f $remote_log_stem.pid; fi"
    ;;

  delete)
    delete=("${tpu_vm[@]}" delete "$name" "${gcloud_flags[@]}")
    [ "$yes" = 0 ] || delete+=(--quiet)
    run_cmd "${delete[@]}"
    ;;
esac
