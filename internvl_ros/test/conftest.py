"""Shared pytest fixtures.

ROS tests run real processes over DDS. Each test module gets its own ROS_DOMAIN_ID, and
discovery stays on this host, so parallel runs and other machines don't see each other.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO_ROOT = TEST_DIR.parent.parent

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
