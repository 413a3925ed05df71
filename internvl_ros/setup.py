from glob import glob

from setuptools import find_packages, setup

package_name = "internvl_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={"internvl_ros.console": ["static/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="internvl_ros maintainers",
    maintainer_email="maintainers@internvl-ros.invalid",
    description="Describe the camera view with InternVL3.5 on the AX650N NPU or onnxruntime.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "internvl_node = internvl_ros.ros.main:main",
            "internvl-caption = internvl_ros.tools.caption:main",
            "internvl-export = internvl_ros.export.exporter:main",
            "internvl-make-tiny-model = internvl_ros.export.tiny:main",
            "internvl-bag-replay = internvl_ros.tools.bag_replay:main",
            "internvl-console = internvl_ros.console.cli:main",
            "console = internvl_ros.console.cli:main",  # ros2 run internvl_ros console
        ],
    },
)
