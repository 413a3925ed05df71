"""Start internvl_node.

  ros2 launch internvl_ros internvl.launch.py \
      params_file:=/path/to/internvl.yaml namespace:=robot1 image_topic:=/camera/image_raw

Arguments:
  params_file             parameters YAML (default: the installed config/internvl.yaml)
  namespace               namespace of the node (default: none, so /internvl/describe)
  image_topic             topic remapped onto the node's "image" input (with
                          image_transport: compressed the node reads <image_topic>/compressed)
  use_large_data_profile  true: start the node with config/fastdds_large_data.xml as its Fast DDS
                          profile (give the camera driver the same file; docs/NODE.md)
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "internvl_ros"
EXECUTABLE = "internvl_node"


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "internvl.yaml"),
                description="Parameters YAML for internvl_node.",
            ),
            DeclareLaunchArgument(
                "namespace", default_value="", description="Namespace of the node."
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
            SetEnvironmentVariable(
                "FASTDDS_DEFAULT_PROFILES_FILE",
                os.path.join(share, "config", "fastdds_large_data.xml"),
                condition=IfCondition(LaunchConfiguration("use_large_data_profile")),
            ),
            Node(
                package=PACKAGE,
                executable=EXECUTABLE,
                name="internvl",
                namespace=LaunchConfiguration("namespace"),
                parameters=[LaunchConfiguration("params_file")],
                remappings=[("image", LaunchConfiguration("image_topic"))],
                output="screen",
                emulate_tty=True,
            ),
        ]
    )
