"""The large-data profile reaches the Fast DDS that is installed, 2.x (Humble, Jazzy) or 3.x.

Fast DDS 2.x reads only FASTRTPS_DEFAULT_PROFILES_FILE, 3.x only FASTDDS_DEFAULT_PROFILES_FILE.
The launch file's use_large_data_profile, docs/NODE.md's export and the profile's own comment
must set the one the installed Fast DDS reads: both. The board leg (`make test-board`, Jazzy's
Fast DDS 2.14) and the default leg (Kilted's 3.x) each check their own library here; the
frame-count test in test_node_transport.py, which sets the launch file's variables, shows the
profile taking effect (90 best-effort 640x480 frames: about 40 arrive on Fast DDS 2.x when only
the FASTDDS_ variable is set, all with the right one).
"""

from __future__ import annotations

import re
from pathlib import Path

from test_launch import _by_type, description  # noqa: F401 (the fixture)

from conftest import LAUNCH_FILE, PROFILES_FILE_VARIABLES, REPO_ROOT, mapped_library

PROFILE = LAUNCH_FILE.parents[1] / "config" / "fastdds_large_data.xml"
VARIABLE = re.compile(rb"FAST(?:RTPS|DDS)_DEFAULT_PROFILES_FILE")
BOTH = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")  # 2.x, 3.x


def installed_fast_dds() -> tuple[Path, set[str]]:
    """The Fast DDS library rclpy's RMW loaded, and the profiles-file variables it reads."""
    from rclpy.impl.implementation_singleton import rclpy_implementation  # noqa: F401

    lib = mapped_library("libfastrtps.so") or mapped_library("libfastdds.so")
    assert lib is not None, "rclpy did not load Fast DDS: is RMW_IMPLEMENTATION rmw_fastrtps_cpp?"
    return lib, {m.decode() for m in VARIABLE.findall(lib.read_bytes())}


def test_installed_fast_dds_reads_a_variable_the_launch_file_sets():
    lib, reads = installed_fast_dds()
    assert reads, f"{lib} names no profiles-file variable: has Fast DDS renamed it again?"
    assert reads & set(PROFILES_FILE_VARIABLES), (
        f"{lib.name} reads {sorted(reads)}; the launch file sets {PROFILES_FILE_VARIABLES}")


def test_launch_sets_every_variable_to_the_profile_when_asked(description):  # noqa: F811
    actions = _by_type(description, "SetEnvironmentVariable")
    assert sorted(a.args[0] for a in actions) == sorted(PROFILES_FILE_VARIABLES) == sorted(BOTH)
    for action in actions:
        assert action.args[1] == "/opt/share/internvl_ros/config/fastdds_large_data.xml"
        (condition,) = action.kwargs["condition"].args
        assert condition.args == ("use_large_data_profile",)


def test_docs_and_the_profile_export_both_variables():
    for path in (REPO_ROOT / "docs" / "NODE.md", PROFILE):
        text = path.read_text()
        for variable in BOTH:
            assert re.search(rf"export {variable}=\S", text), f"{path.name}: no export {variable}"
