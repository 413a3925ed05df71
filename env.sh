# Source this file (bash or zsh) after `make setup`:   source env.sh
# It gives a shell in which rclpy, the generated internvl_ros_interfaces and the package's
# console scripts (internvl_node, internvl-caption, ...) all work. It changes nothing on disk.

if [ -n "${BASH_SOURCE:-}" ]; then
  _internvl_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
  # shellcheck disable=SC2296
  _internvl_root="$(cd "$(dirname "${(%):-%x}")" && pwd)"
else
  _internvl_root="$(pwd)"
fi

# env-board.sh sources this file for the board leg's venv and workspace
_internvl_venv="$_internvl_root/${_internvl_venv:-.venv}"
_internvl_install="$_internvl_root/${_internvl_install:-install}"

if [ ! -x "$_internvl_venv/bin/python" ] || [ ! -f "$_internvl_install/local_setup.sh" ]; then
  echo "env.sh: run 'make ${_internvl_setup:-setup}' in $_internvl_root first" >&2
  unset _internvl_root _internvl_venv _internvl_install _internvl_setup
  return 1 2>/dev/null || exit 1
fi

# The colcon and venv scripts read unset variables: allow that while sourcing them.
case $- in *u*) _internvl_nounset=1; set +u ;; *) _internvl_nounset=0 ;; esac

# The venv holds the ROS 2 wheels; it is the underlay prefix.
VIRTUAL_ENV_DISABLE_PROMPT=${VIRTUAL_ENV_DISABLE_PROMPT:-1}
# shellcheck disable=SC1091
. "$_internvl_venv/bin/activate"
export AMENT_PREFIX_PATH="$_internvl_venv"
export CMAKE_PREFIX_PATH="$_internvl_venv"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"

# The colcon workspace (both packages) on top.
# shellcheck disable=SC1091
. "$_internvl_install/local_setup.sh"
# ament_python puts console scripts in lib/<pkg> (for `ros2 run`); put them on PATH too.
export PATH="$_internvl_install/internvl_ros/lib/internvl_ros:$PATH"

if [ "$_internvl_nounset" = 1 ]; then set -u; fi
unset _internvl_root _internvl_nounset _internvl_venv _internvl_install _internvl_setup
