"""Any CPython 3.10-3.13 sets the project up: the interpreter finder and the wheel repair.

The ROS 2 wheels name their build machine's include directories in their CMake exports
(/opt/python/cp3XY-cp3XY/...), for whichever CPython they were built for: Kilted's exist for
3.10-3.13, Jazzy's (the board leg) for 3.10-3.12. scripts/repair_ros_wheels.py once knew only
cp311, so colcon failed on any other Python.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from conftest import REPO_ROOT

FIND = REPO_ROOT / "scripts" / "find_python.sh"


def _repair_module():
    spec = importlib.util.spec_from_file_location(
        "repair_ros_wheels", REPO_ROOT / "scripts" / "repair_ros_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tag,core", [("310", "_core"), ("311", "_core"), ("312", "core"),
                                      ("313", "_core")])
def test_repair_rewrites_the_build_paths_of_any_cpython(tmp_path, tag, core):
    build = f"/opt/python/cp{tag}-cp{tag}"
    cmake = tmp_path / "share" / "some_msgs" / "cmake" / "export.cmake"
    cmake.parent.mkdir(parents=True)
    cmake.write_text(
        f'INTERFACE_INCLUDE_DIRECTORIES "{build}/include/python3.{tag[1:]};'
        f'{build}/lib/python3.{tag[1:]}/site-packages/numpy/{core}/include;${{_IMPORT_PREFIX}}"\n')
    repair = _repair_module()
    assert repair.repair(tmp_path) == 1
    text = cmake.read_text()
    assert "/opt/python" not in text, text
    assert f'"{sysconfig.get_paths()["include"]};{np.get_include()};${{_IMPORT_PREFIX}}"' in text
    assert repair.repair(tmp_path) == 0  # idempotent


def test_find_python_finds_this_version_and_explains_a_missing_one():
    this = "{}.{}".format(*sys.version_info[:2])
    found = subprocess.run([str(FIND), "3.99", this], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    exe = found.stdout.strip()
    version = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == str(sys.version_info[:2])
    missing = subprocess.run([str(FIND), "3.99"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "pyenv install 3.99" in missing.stderr


def test_makefile_claims_no_single_python():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "3.11 only" not in makefile and "PYTHON ?= python3.11" not in makefile
    assert "scripts/find_python.sh 3.11 3.12 3.13 3.10" in makefile
    assert "scripts/find_python.sh 3.10" in makefile  # the board leg
