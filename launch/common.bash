# Helpers sourced by the launch scripts; each script sets SYNOPSIS before sourcing this file.
# shellcheck shell=bash
# value and consumed are read by the scripts that source this file.
# shellcheck disable=SC2034

# Prints the error, the synopsis and a pointer to --help on stderr; exits 2.
die_usage() {
  printf '%s: %s\n%s\n(%s --help lists the options)\n' "$0" "$*" "$SYNOPSIS" "$0" >&2
  exit 2
}

# Prints a command as one shell-quoted line.
print_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# take_value OPT "$@": the value of OPT given as `OPT=V` or `OPT V`, in $value; $consumed is the
# number of arguments it took (1 or 2). A missing or empty value is a usage error.
value=""
consumed=0
take_value() {
  local opt="$1"
  shift
  case "$1" in
    "$opt"=*) value="${1#"$opt"=}"; consumed=1 ;;
    *)
      [ $# -ge 2 ] && [[ "$2" != -* ]] || die_usage "$opt needs a value"
      value="$2"; consumed=2 ;;
  esac
  [ -n "$value" ] || die_usage "$opt needs a non-empty value"
}
