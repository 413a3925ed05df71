"""glibc malloc settings for a node that runs for hours (``tune``, called by ``main`` first).

The node's process runs about 60 threads (DDS, the executor, the worker). glibc gives threads up
to 8 arenas per core, each keeping the memory freed into it, and its dynamic mmap threshold
moves large blocks (frames, logits, image tiles) from mmap onto those arenas once the first
one is freed, where they stay. In the soak (issue 16, docs/RELIABILITY.md) the raw-camera node
sat about 110 MB higher, and grew in steps, with glibc's defaults than with at most 2 arenas and
a fixed 256 KiB mmap threshold (blocks that large are mmapped and given back when freed).

``tune`` sets those two with ``mallopt`` before any thread starts. A setting the user makes
with glibc's own variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, or the same in
``GLIBC_TUNABLES``) is left to glibc.

glibc also gives each thread a cache of freed small blocks (tcache: up to 7 blocks of each of
64 sizes, about 240 KB a thread). malloc counts those blocks as in use, and they pin the pages
they sit in. With ~60 threads the caches fill slowly, one size at a time, for an hour or more: in
the soak that was most of the node's remaining growth (malloc's in-use memory +1.1 MB in 7
minutes while heaptrack found +0.2 MB of live allocations; flat with the cache off, and the
answer latency within the spread of earlier runs: docs/RELIABILITY.md).
glibc reads that setting only when a process starts, so ``restart_without_tcache`` runs
``internvl_node`` again, once, with ``glibc.malloc.tcache_count=0`` added to ``GLIBC_TUNABLES``
(same pid, same arguments). A ``tcache_count`` of the user's own is left as it is.

``Trimmer`` gives the free memory inside glibc's heaps back to the system (``malloc_trim``),
at most every ``TRIM_EVERY_S``, when the worker has nothing to do: what a request freed in the
middle of a heap otherwise stays resident until a later request happens to reuse it.

Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 256 << 10
ENV = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, ARENA_MAX),
       "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD)}
TCACHE = "glibc.malloc.tcache_count"
RESTARTED = "_INTERNVL_MALLOC_RESTARTED"  # set for the restarted process, read by tune()


def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def _started_as_the_node() -> bool:
    """The process is ``internvl_node`` (or ``python -m internvl_ros.ros.main``), not a program
    that imported ``main``: only then is running it again the same as starting the node."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is None:
        return False
    return argv0.name == "internvl_node" or argv0.resolve() == Path(__file__).with_name("main.py")


def restart_without_tcache() -> None:
    """Run this process again with glibc's per-thread cache off (module docstring); returns
    only when that is not to be done: not glibc, not started as the node, the user's own
    ``tcache_count``, already restarted, or exec failed (then the node runs as it is)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    argv = getattr(sys, "orig_argv", None)  # Python >= 3.10: the interpreter's options too
    if (not _is_glibc() or TCACHE in tunables or RESTARTED in os.environ or not argv
            or not sys.executable or not _started_as_the_node()):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, f"{TCACHE}=0")))
    os.environ[RESTARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    except OSError:
        os.environ.pop(RESTARTED)
        if tunables:
            os.environ["GLIBC_TUNABLES"] = tunables
        else:
            os.environ.pop("GLIBC_TUNABLES")


def tune() -> str:
    """Apply the settings; returns a line for the log saying what was set."""
    if not _is_glibc():
        return "malloc: not glibc, left as it is"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        return f"malloc: glibc's mallopt not found ({e}), left as it is"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    said = []
    for var, (param, value) in ENV.items():
        tunable = "glibc.malloc." + var[len("MALLOC_"):].rstrip("_").lower()
        if var in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", ""):
            said.append(f"{var} left to the environment")
        elif mallopt(param, value) == 1:
            said.append(f"{var}={value}")
        else:
            said.append(f"{var} not set (mallopt refused)")
    if os.environ.pop(RESTARTED, None):
        said.append(f"{TCACHE}=0 (restarted with it)")
    elif TCACHE in os.environ.get("GLIBC_TUNABLES", ""):
        said.append(f"{TCACHE} left to the environment")
    return "malloc: " + ", ".join(said)


TRIM_EVERY_S = 30.0


class Trimmer:
    """``malloc_trim(0)`` (free pages of every arena back to the system), at most once every
    ``every_s`` seconds; a no-op without glibc. Takes well under a millisecond for the node's
    heaps (0.2 to 0.5 ms measured in the soak), holding each arena's lock meanwhile."""

    def __init__(self, every_s: float = TRIM_EVERY_S):
        self.every_s = every_s
        self.trims = 0
        self._last = -float("inf")
        self._trim = None
        if _is_glibc():
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
                self._trim.argtypes, self._trim.restype = (ctypes.c_size_t,), ctypes.c_int
            except (OSError, AttributeError):
                self._trim = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self._trim is None or now - self._last < self.every_s:
            return
        self._last = now
        self._trim(0)
        self.trims += 1
