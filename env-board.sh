# The board leg's shell (after `make setup-board`):   source env-board.sh
# Like env.sh, on .venv-board (Python 3.10, numpy 1.21.5, OpenCV 4.5.4, ROS 2 Jazzy wheels) and
# install-board. It changes nothing on disk.

if [ -n "${BASH_SOURCE:-}" ]; then
  _internvl_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
  # shellcheck disable=SC2296
  _internvl_root="$(cd "$(dirname "${(%):-%x}")" && pwd)"
else
  _internvl_root="$(pwd)"
fi

if [ ! -x "$_internvl_root/.venv-board/bin/python" ] || [ ! -f "$_internvl_root/install-board/local_setup.sh" ]; then
  echo "env-board.sh: run 'make setup-board' in $_internvl_root first" >&2
  unset _internvl_root
  return 1 2>/dev/null || exit 1
fi

# The colcon and venv scripts read unset variables: allow that while sourcing them.
case $- in *u*) _internvl_nounset=1; set +u ;; *) _internvl_nounset=0 ;; esac

VIRTUAL_ENV_DISABLE_PROMPT=${VIRTUAL_ENV_DISABLE_PROMPT:-1}
# shellcheck disable=SC1091
. "$_internvl_root/.venv-board/bin/activate"
export AMENT_PREFIX_PATH="$_internvl_root/.venv-board"
export CMAKE_PREFIX_PATH="$_internvl_root/.venv-board"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# shellcheck disable=SC1091
. "$_internvl_root/install-board/local_setup.sh"
export PATH="$_internvl_root/install-board/internvl_ros/lib/internvl_ros:$PATH"

[ "$_internvl_nounset" = 1 ] && set -u
unset _internvl_root _internvl_nounset
