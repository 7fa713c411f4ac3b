#!/usr/bin/env bash
# Run a config on this machine (all local devices, one process), appending the output to
# WORKDIR/log.txt.
#   launch/local.sh CONFIG WORKDIR [--config.field=value ...] [--dry-run]
set -euo pipefail

readonly SYNOPSIS="usage: $0 CONFIG[:args] WORKDIR [--config.x=y ...] [--dry-run]"

# shellcheck source-path=SCRIPTDIR source=common.bash
source "$(dirname "${BASH_SOURCE[0]}")/common.bash"

case "${1:-}" in
  -h | --help)
    printf '%s\n\nRuns python -m dq.main --config=CONFIG --workdir=WORKDIR [flags] with the %s\n' \
      "$SYNOPSIS" "output appended to WORKDIR/log.txt; --dry-run prints the commands only."
    exit 0 ;;
esac
[ $# -ge 2 ] || die_usage "expected CONFIG and WORKDIR"
config="$1"
workdir="$2"
shift 2
if [[ "$config" == -* || "$workdir" == -* ]]; then
  die_usage "expected CONFIG and WORKDIR before the flags: got '$config' '$workdir'"
fi
# Everything after WORKDIR but --dry-run goes to dq.main.
dry_run=0
extra=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=1; else extra+=("$arg"); fi
done

cmd=(python -m dq.main "--config=${config}" "--workdir=${workdir}" "${extra[@]}")
if [ "$dry_run" = 1 ]; then
  print_cmd mkdir -p "$workdir"
  printf '%s 2>&1 | tee -a %q\n' "$(print_cmd "${cmd[@]}")" "${workdir}/log.txt"
  exit 0
fi
mkdir -p "$workdir"
"${cmd[@]}" 2>&1 | tee -a "${workdir}/log.txt"
