"""The board's install steps keep apt's numpy 1.21.5 (README, "On an AX650N board").

Humble's message extensions and apt's cv2 are built against numpy 1.x: a pip step that upgrades
numpy to 2 breaks them. pyaxengine's wheel asks numpy>=1.22 and ml_dtypes 0.6 needs numpy 2, so
requirements/board.txt holds numpy<2 and ml_dtypes<0.6, and the README installs pyaxengine (and
onnxruntime) with --no-deps.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

BOARD_NUMPY = "1.21.5"  # Ubuntu 22.04's python3-numpy
BOARD_TXT = REPO_ROOT / "requirements" / "board.txt"


def python310() -> str:
    if sys.version_info[:2] == (3, 10):
        return sys.executable
    found = subprocess.run([str(REPO_ROOT / "scripts" / "find_python.sh"), "3.10"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"no CPython 3.10 here (the board's Python): {found.stderr.strip()}")
    return found.stdout.strip()


def pip(venv_python, *args) -> subprocess.CompletedProcess:
    run = subprocess.run([venv_python, "-m", "pip", "--disable-pip-version-check", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_board_requirements_keep_numpy_1_21_5(tmp_path):
    subprocess.run([python310(), "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    py = str(tmp_path / "venv" / "bin" / "python")
    pip(py, "install", "--quiet", f"numpy=={BOARD_NUMPY}")  # as apt has it
    pip(py, "install", "--quiet", "--dry-run", "--report", str(tmp_path / "report.json"),
        "-r", str(BOARD_TXT))
    report = json.loads((tmp_path / "report.json").read_text())
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
              for i in report["install"]}
    assert "numpy" not in chosen, f"pip would install numpy {chosen.get('numpy')}"
    assert chosen["ml-dtypes"].startswith("0.5."), chosen  # the last that accepts numpy 1.x
    for name in ("tokenizers", "rosbags", "rosbags-image", "cffi"):
        assert name in chosen, f"{name} missing from requirements/board.txt"


def board_section_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## On an AX650N board", 1)[1].split("\n## ", 1)[0]
    return [line.split("#", 1)[0].strip() for line in section.splitlines()
            if re.match(r"\s*(sudo\s+)?pip3?\s+install", line)]


def test_readme_board_pip_steps_cannot_upgrade_numpy():
    commands = board_section_commands()
    assert any("requirements/board.txt" in c for c in commands), commands
    assert any("axengine" in c for c in commands), commands
    for command in commands:
        words = shlex.split(command)
        if "-r" in words:
            assert words[words.index("-r") + 1].endswith("requirements/board.txt"), command
        else:  # a wheel whose metadata asks numpy>=1.22 (pyaxengine) or >=1.21.6 (onnxruntime)
            assert "--no-deps" in words, f"may upgrade numpy: {command}"
        assert not {"-U", "--upgrade"} & set(words), command
