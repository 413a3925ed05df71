#!/usr/bin/env bash
# Print the path of a CPython interpreter of one of the given versions, the first found in
# this order: each version's pythonX.Y on the PATH, then `python3` on the PATH, then pyenv's
# builds (~/.pyenv or $PYENV_ROOT). Exits 1 with advice when there is none.
#
#   scripts/find_python.sh 3.11 3.12 3.13 3.10   # the default leg: 3.11 first, any 3.10-3.13
#   scripts/find_python.sh 3.10                  # the board leg: the board's Python
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 VERSION..." >&2; exit 2; }

version_of() {  # the interpreter's X.Y, if it is CPython and has venv
  "$1" -c 'import sys, platform, venv
assert platform.python_implementation() == "CPython"
print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

candidates() {
  local v
  for v in "$@"; do command -v "python$v" || true; done
  command -v python3 || true
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for v in "$@"; do
    # newest patch release first
    ls -d "$root/versions/$v".* 2>/dev/null | sort -t. -k3,3nr | sed "s|\$|/bin/python$v|" || true
  done
}

while read -r exe; do
  [ -n "$exe" ] && [ -x "$exe" ] || continue
  have=$(version_of "$exe") || continue
  for v in "$@"; do
    if [ "$have" = "$v" ]; then echo "$exe"; exit 0; fi
  done
done < <(candidates "$@")

{
  echo "no CPython $* with the venv module found (looked on the PATH and in pyenv)."
  echo "Install one, e.g. on Debian/Ubuntu: sudo apt install python$1 python$1-venv"
  echo "(Ubuntu 22.04 has 3.10, Debian 12 3.11), or with pyenv: pyenv install $1"
} >&2
exit 1
