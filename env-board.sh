# The board leg's shell (after `make setup-board`):   source env-board.sh
# Like env.sh, on .venv-board (Python 3.10, numpy 1.21.5, OpenCV 4.5.4, ROS 2 Jazzy wheels) and
# install-board. It changes nothing on disk.

if [ -n "${BASH_SOURCE:-}" ]; then
  _internvl_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
  # shellcheck disable=SC2296
  _internvl_here="$(cd "$(dirname "${(%):-%x}")" && pwd)"
else
  _internvl_here="$(pwd)"
fi
_internvl_venv=.venv-board _internvl_install=install-board _internvl_setup=setup-board
# shellcheck disable=SC1091
. "$_internvl_here/env.sh"
unset _internvl_here
