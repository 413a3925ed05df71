"""Repair the CMake exports of the PyPI ROS 2 wheels inside a virtual environment.

The wheels were built on a manylinux image, and their exported CMake targets name include
directories of that machine (``/opt/python/cp311-cp311/include/python3.11`` and its numpy
include). CMake refuses to generate a package that links those targets, because the paths do
not exist here. This rewrites them, in the venv's ``share/*/cmake`` files only, to this
interpreter's include directory and numpy's. It is idempotent and writes nothing outside the
venv.

Usage: python scripts/repair_ros_wheels.py VENV
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy

BUILD_PREFIX = "/opt/python/cp311-cp311"


def replacements() -> list[tuple[str, str]]:
    py_include = sysconfig.get_paths()["include"]
    np_include = numpy.get_include()
    return [
        (f"{BUILD_PREFIX}/lib/python3.11/site-packages/numpy/_core/include", np_include),
        (f"{BUILD_PREFIX}/include/python3.11", py_include),
    ]


def repair(venv: Path) -> int:
    share = venv / "share"
    if not share.is_dir():
        raise SystemExit(f"{share} does not exist: install the ROS 2 wheels into {venv} first")
    changed = 0
    for cmake_file in sorted(share.glob("*/cmake/*.cmake")):
        text = cmake_file.read_text(encoding="utf-8")
        if BUILD_PREFIX not in text:
            continue
        new = text
        for old, repl in replacements():
            new = new.replace(old, repl)
        if new != text:
            cmake_file.write_text(new, encoding="utf-8")
            changed += 1
    return changed


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    venv = Path(sys.argv[1]).resolve()
    n = repair(venv)
    print(f"repair_ros_wheels: {n} CMake file(s) repaired in {venv / 'share'}")


if __name__ == "__main__":
    main()
