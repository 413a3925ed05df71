"""Start internvl_node.

  ros2 launch internvl_ros internvl.launch.py model_dir:=/path/to/model \
      image_topic:=/camera/image_raw [params_file:=/path/to/internvl.yaml] [namespace:=robot1]

Arguments:
  model_dir               the model directory (docs/MODEL_DIR.md); when given, it overrides the
                          params file's model_dir (the shipped file leaves it empty, so a plain
                          launch needs either this or a params file that sets it)
  params_file             parameters YAML (default: the installed config/internvl.yaml)
  namespace               namespace of the node (default: none, so /internvl/describe)
  image_topic             topic remapped onto the node's "image" input (with
                          image_transport: compressed the node reads <image_topic>/compressed)
  use_large_data_profile  true: start the node with config/fastdds_large_data.xml as its Fast DDS
                          profile (give the camera driver the same file; docs/NODE.md). Sets
                          FASTRTPS_DEFAULT_PROFILES_FILE (read by Fast DDS 2.x: Humble, Jazzy)
                          and FASTDDS_DEFAULT_PROFILES_FILE (Fast DDS 3.x: Kilted on)
  autostart               true (default): configure and activate at start-up; false: the node
                          waits, unconfigured, for lifecycle transitions (a lifecycle manager,
                          or ros2 lifecycle set /internvl configure, then activate)
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "internvl_ros"
EXECUTABLE = "internvl_node"
# the variable naming the profiles file: Fast DDS 2.x reads the first, 3.x the second
PROFILES_FILE_VARIABLES = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")


def node_action(context):
    """The node; model_dir overrides the params file only when the argument is non-empty."""
    parameters = [LaunchConfiguration("params_file")]
    model_dir = LaunchConfiguration("model_dir").perform(context)
    if model_dir:
        parameters.append({"model_dir": model_dir})  # later entries win
    autostart = LaunchConfiguration("autostart").perform(context).strip().lower()
    if autostart:  # empty: the params file decides
        parameters.append({"autostart": autostart in ("true", "1", "yes", "on")})
    return [
        Node(
            package=PACKAGE,
            executable=EXECUTABLE,
            name="internvl",
            namespace=LaunchConfiguration("namespace"),
            parameters=parameters,
            remappings=[("image", LaunchConfiguration("image_topic"))],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model_dir",
                default_value="",
                description="Model directory; overrides the params file's model_dir when set.",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "internvl.yaml"),
                description="Parameters YAML for internvl_node.",
            ),
            DeclareLaunchArgument(
                "namespace", default_value="", description="Namespace of the node."
            ),
            DeclareLaunchArgument(
                "autostart",
                default_value="",
                description="true: configure and activate at start-up; false: wait for "
                "lifecycle transitions; empty (default): the params file's autostart (true).",
            ),
            DeclareLaunchArgument(
                "image_topic",
                default_value="image",
                description="Camera topic remapped onto the node's 'image' input.",
            ),
            DeclareLaunchArgument(
                "use_large_data_profile",
                default_value="false",
                description="Use config/fastdds_large_data.xml (large best-effort frames).",
            ),
            *[
                SetEnvironmentVariable(
                    variable,
                    os.path.join(share, "config", "fastdds_large_data.xml"),
                    condition=IfCondition(LaunchConfiguration("use_large_data_profile")),
                )
                for variable in PROFILES_FILE_VARIABLES
            ],
            OpaqueFunction(function=node_action),
        ]
    )
