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
import threading
import time
from pathlib import Path

import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO_ROOT = TEST_DIR.parent.parent
LAUNCH_FILE = TEST_DIR.parent / "launch" / "internvl.launch.py"


def _launch_file_constant(name: str, default):
    """A literal constant of the launch file (which imports launch: not installable here)."""
    for node in ast.parse(LAUNCH_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    return default


# The variables the launch file sets for the large-data profile: tests that need the profile set
# exactly these, so they check what a user gets (test_board_fastdds.py checks the launch file
# really sets these).
PROFILES_FILE_VARIABLES: tuple[str, ...] = _launch_file_constant("PROFILES_FILE_VARIABLES", ())

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


def mapped_library(name_prefix: str) -> Path | None:
    """The shared library this process has loaded whose file name starts with `name_prefix`."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and Path(fields[5]).name.startswith(name_prefix):
            return Path(fields[5])
    return None


def localhost_discovery_env() -> dict[str, str]:
    """The variable that keeps discovery on this host, in the spelling the installed rcl reads.

    ROS_AUTOMATIC_DISCOVERY_RANGE came with Iron; Jazzy's rcl warns that ROS_LOCALHOST_ONLY is
    deprecated (on stderr, before anything a child prints) and Kilted ignores it. Humble knows
    only ROS_LOCALHOST_ONLY.
    """
    from rclpy.impl.implementation_singleton import rclpy_implementation  # noqa: F401 (loads rcl)

    rcl = mapped_library("librcl.so")
    if rcl is None:
        raise RuntimeError("rclpy is loaded but librcl.so is not mapped: cannot tell the distro")
    if b"ROS_AUTOMATIC_DISCOVERY_RANGE" in rcl.read_bytes():
        return {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    return {"ROS_LOCALHOST_ONLY": "1"}


@pytest.fixture(scope="module")
def ros_domain(monkeypatch_module) -> int:
    """An isolated ROS domain for this module, exported to the environment of subprocesses."""
    domain = _next_domain_id()
    monkeypatch_module.setenv("ROS_DOMAIN_ID", str(domain))
    for name in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY"):
        monkeypatch_module.delenv(name, raising=False)
    for name, value in localhost_discovery_env().items():
        monkeypatch_module.setenv(name, value)
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


@pytest.fixture(scope="module")
def own_context(ros_domain):
    """An rclpy context of its own (not the default one) on the module's domain, for nodes made
    in the test's process; shut down afterwards."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


# ---------------------------------------------------------------------------------------------
# the tiny model, on both backends


@pytest.fixture(scope="module")
def host_dir() -> Path:
    """Tiny model "a" exported for onnxruntime (built once per machine, then cached)."""
    from internvl_ros.export.testing import tiny_model_dirs

    return tiny_model_dirs("a")[1]


@pytest.fixture(scope="module")
def axera_limits() -> dict:
    """The axengine double's limits for `axera_dir`: smaller than the published build's
    (2047 / 1152), so that a test reaches them with short prompts. A module overrides this
    fixture for other limits."""
    return {"kv_cache_len": 511, "max_prefill": 512}


@pytest.fixture(scope="module")
def axera_dir(host_dir, axera_limits, tmp_path_factory) -> Path:
    """`host_dir` laid out as the AXERA-TECH download, for the axengine double
    (backends/fake_axengine.py), with `axera_limits`."""
    from internvl_ros.backends import fake_axengine

    root = tmp_path_factory.mktemp("axera")
    fake_axengine.make_fake_axera_dir(host_dir, root, **axera_limits)
    return root


# ---------------------------------------------------------------------------------------------
# waiting on rclpy futures and on conditions (tests over DDS)

CALL_TIMEOUT = 60.0


def answered(fut, timeout: float) -> bool:
    """Whether an rclpy future is done within `timeout` seconds (waits on its callback, so it
    works while another thread spins)."""
    done = threading.Event()
    fut.add_done_callback(lambda _: done.set())
    return done.wait(timeout)


def wait_future(fut, timeout: float = CALL_TIMEOUT):
    """The result of an rclpy future; AssertionError if there is none within `timeout` s."""
    assert answered(fut, timeout), f"no answer within {timeout} s"
    return fut.result()


def wait_for(pred, timeout: float, what: str) -> None:
    """Poll `pred()` every 50 ms until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
