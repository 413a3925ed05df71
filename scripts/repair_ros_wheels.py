"""Repair the CMake exports of the PyPI ROS 2 wheels inside a virtual environment.

The wheels were built on a manylinux image, and their exported CMake targets name include
directories of that machine (``/opt/python/cp311-cp311/include/python3.11`` and its numpy
include, for whichever CPython the wheel was built for: Kilted's come for 3.10-3.13, Jazzy's
for 3.10-3.12). CMake refuses to generate a package that links those targets, because the paths
do not exist here. This rewrites them, in the venv's ``share/*/cmake`` files only, to this
interpreter's include directory and numpy's (``numpy/_core`` of numpy 2 or ``numpy/core`` of
numpy 1). It is idempotent and writes nothing outside the venv.

Usage: python scripts/repair_ros_wheels.py VENV
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import numpy

# the manylinux image's interpreters: /opt/python/cp311-cp311, /opt/python/cp310-cp310, ...
BUILD_PREFIX = "/opt/python/cp3"
_PREFIX = r"/opt/python/cp3\d+-cp3\d+t?"
_NUMPY_INCLUDE = re.compile(_PREFIX + r"/lib/python3\.\d+t?/site-packages/numpy/_?core/include")
_PY_INCLUDE = re.compile(_PREFIX + r"/include/python3\.\d+t?")


def replacements() -> list[tuple[re.Pattern, str]]:
    return [
        (_NUMPY_INCLUDE, numpy.get_include()),
        (_PY_INCLUDE, sysconfig.get_paths()["include"]),
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
        for pattern, repl in replacements():
            new = pattern.sub(lambda _match, path=repl: path, new)
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
