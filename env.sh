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

if [ ! -x "$_internvl_root/.venv/bin/python" ] || [ ! -f "$_internvl_root/install/local_setup.sh" ]; then
  echo "env.sh: run 'make setup' in $_internvl_root first" >&2
  unset _internvl_root
  return 1 2>/dev/null || exit 1
fi

# The colcon and venv scripts read unset variables: allow that while sourcing them.
case $- in *u*) _internvl_nounset=1; set +u ;; *) _internvl_nounset=0 ;; esac

# The venv holds the ROS 2 wheels; it is the underlay prefix.
VIRTUAL_ENV_DISABLE_PROMPT=${VIRTUAL_ENV_DISABLE_PROMPT:-1}
# shellcheck disable=SC1091
. "$_internvl_root/.venv/bin/activate"
export AMENT_PREFIX_PATH="$_internvl_root/.venv"
export CMAKE_PREFIX_PATH="$_internvl_root/.venv"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"

# The colcon workspace (both packages) on top.
# shellcheck disable=SC1091
. "$_internvl_root/install/local_setup.sh"
# ament_python puts console scripts in lib/<pkg> (for `ros2 run`); put them on PATH too.
export PATH="$_internvl_root/install/internvl_ros/lib/internvl_ros:$PATH"

if [ "$_internvl_nounset" = 1 ]; then set -u; fi
unset _internvl_root _internvl_nounset
