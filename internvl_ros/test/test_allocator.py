"""The node's malloc settings (ros/allocator.py): at most 2 glibc arenas however many threads
allocate, and the user's own MALLOC_* variables left alone. Each case runs in a fresh process,
since mallopt must come before the threads."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's (mallopt, malloc_info)")

# 12 threads each allocate, then malloc_info counts the arenas ("<heap nr=...>")
PROBE = """
import ctypes, sys, tempfile, threading
import numpy as np
line = None
if sys.argv[1] == "tune":
    from internvl_ros.ros import allocator
    line = allocator.tune()
go = threading.Barrier(12)
def work():
    go.wait()  # all alive at once, each asking malloc for its own memory
    blocks = [np.ones(1000 + i) for i in range(50)]
    go.wait()
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    xml = open(f.name).read()
print(xml.count("<heap nr="))
print(line)
"""


def probe(mode: str, **env) -> tuple[int, str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**full, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heaps, line = out.stdout.strip().splitlines()
    return int(heaps), line


def test_tune_caps_the_arenas():
    untuned, _ = probe("plain")
    tuned, line = probe("tune")
    assert untuned > 2, f"glibc gave {untuned} arenas to 12 threads: the probe shows nothing"
    assert tuned <= 2, (tuned, line)
    assert line == "malloc: MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=262144", line


def test_the_users_own_settings_win():
    heaps, line = probe("tune", MALLOC_ARENA_MAX="4")
    assert "MALLOC_ARENA_MAX left to the environment" in line, line
    assert "MALLOC_MMAP_THRESHOLD_=262144" in line, line
    assert 2 < heaps <= 4, heaps  # glibc's own reading of the variable
    _, line = probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert line == ("malloc: MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_ left to the "
                    "environment"), line
