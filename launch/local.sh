#!/usr/bin/env bash
# Run a config on this machine (all local devices, one process).
#   launch/local.sh CONFIG WORKDIR [--config.field=value ...] [--dry-run]
set -euo pipefail
usage() { echo "usage: $0 CONFIG[:args] WORKDIR [--config.x=y ...] [--dry-run]" >&2; exit 2; }
[ $# -ge 2 ] || usage
config=$1 workdir=$2
shift 2
dry=0 extra=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry=1; else extra+=("$a"); fi
done
cmd=(python -m dq.main "--config=${config}" "--workdir=${workdir}" "${extra[@]}")
if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
mkdir -p "$workdir"
"${cmd[@]}" 2>&1 | tee -a "${workdir}/log.txt"
