"""Shared pytest fixtures.

ROS tests run real processes over DDS. Each test module gets its own ROS_DOMAIN_ID, and
discovery stays on this host, so parallel runs and other machines don't see each other.

The suite runs in two legs (README): the default one, and the board leg (`make test-board`:
Python 3.10, numpy 1.21, Jazzy), which has no torch. There, a test module that imports torch or
transformers, and a test that needs them for a reference (export, tiny-model building; cached
transformers references are reused, see export/testing.py), are skipped with that reason: they
run in the default leg.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import os
import sys
from pathlib import Path

import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO_ROOT = TEST_DIR.parent.parent

# Reference libraries: the runtime never imports them (test_no_torch.py).
REFERENCE_LIBS = ("torch", "transformers")
MISSING_REFERENCE_LIBS = [m for m in REFERENCE_LIBS if importlib.util.find_spec(m) is None]
_NO_REFERENCE = (f"needs {' and '.join(MISSING_REFERENCE_LIBS)}, which this leg does not have "
                 "(the board leg has no CPU torch for Python 3.10); it runs in the default leg")
# Only an import from these folders is a missing reference (elsewhere it is a runtime bug).
_REFERENCE_DIRS = (TEST_DIR, REPO_ROOT / "internvl_ros" / "internvl_ros" / "export")


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_bytes())
    roots = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


class _ReferenceModule(pytest.Module):
    """A test module that imports a reference library this leg lacks: one skip, with the reason."""

    def collect(self):
        pytest.skip(f"{self.path.name} {_NO_REFERENCE}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if MISSING_REFERENCE_LIBS and set(MISSING_REFERENCE_LIBS) & _top_level_imports(module_path):
        return _ReferenceModule.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    exc = call.excinfo.value if call.excinfo else None
    if (MISSING_REFERENCE_LIBS and isinstance(exc, ModuleNotFoundError)
            and exc.name in MISSING_REFERENCE_LIBS):
        tb = call.excinfo.traceback
        importer = Path(tb[-1].path).resolve()
        # a tiny model this leg lacks is a setup error (scripts/share_tiny_models.py), no skip
        if (any(importer.is_relative_to(d) for d in _REFERENCE_DIRS)
                and not any(entry.name == "tiny_model_dirs" for entry in tb)):
            report.outcome = "skipped"
            report.longrepr = (str(importer), tb[-1].lineno + 1,
                               f"Skipped: {_NO_REFERENCE}")
    return report

_domain_counter = itertools.count()


def _next_domain_id() -> int:
    # ROS recommends domains 0..101: above that, Fast DDS ports reach Linux's ephemeral range.
    # Spread by pid, so that two pytest runs on one machine rarely share a domain; 0 (the
    # default) is left to interactive use.
    return 1 + (os.getpid() * 13 + next(_domain_counter) * 7) % 101


@pytest.fixture(scope="module")
def ros_domain(monkeypatch_module) -> int:
    """An isolated ROS domain for this module, exported to the environment of subprocesses."""
    domain = _next_domain_id()
    monkeypatch_module.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch_module.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch_module.setenv("ROS_LOCALHOST_ONLY", "1")  # Humble spelling of the same
    monkeypatch_module.setenv("PYTHONUNBUFFERED", "1")
    return domain


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def rclpy_context(ros_domain):
    """The default rclpy context, initialised on the module's domain; shut down afterwards."""
    import rclpy

    rclpy.init(domain_id=ros_domain)
    yield rclpy.get_default_context()
    rclpy.try_shutdown()


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
