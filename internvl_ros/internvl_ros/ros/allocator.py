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

Two more settings take effect only when a process starts, so ``restart_tuned`` runs
``internvl_node`` again, once, at start-up (exec: same pid, same arguments), with them added to
its environment. A setting of the user's own is left as it is. Measured in the soak
(docs/RELIABILITY.md):

- ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``. glibc gives each thread a cache of freed
  small blocks (up to 7 of each of 64 sizes, about 240 KB a thread), counts them as in use, and
  they pin the pages they sit in. Across the node's ~60 threads the caches filled slowly, one
  size at a time, for an hour or more: malloc's in-use memory grew 1.1 MB in 7 minutes while
  heaptrack found 0.2 MB of new live allocations. With the cache off it is flat.
- ``PYTHONMALLOC=malloc``. Python's own allocator takes 1 MiB arenas for small objects and
  gives one back only when every object in it is gone; with the live objects constant (19.4 MB)
  the node still went from 27 to 29 arenas in 7 minutes. On malloc, those objects share the
  heaps that ``Trimmer`` gives back page by page.

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


def restart_settings() -> dict[str, str]:
    """The environment the node restarts with: what is missing of the per-thread cache off and
    Python's objects on malloc (module docstring). Empty: nothing to restart for (the user's own
    settings, already restarted, or not glibc)."""
    if not _is_glibc() or RESTARTED in os.environ:
        return {}
    env = {}
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TCACHE not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, f"{TCACHE}=0")))
    if "PYTHONMALLOC" not in os.environ:
        env["PYTHONMALLOC"] = "malloc"
    return env


def restart_tuned() -> None:
    """Run this process again with ``restart_settings()`` (same pid, same arguments); returns
    only when there is nothing to restart for, the process was not started as the node, or
    exec failed (then the node runs as it is)."""
    env = restart_settings()
    argv = getattr(sys, "orig_argv", None)  # Python >= 3.10: the interpreter's options too
    if not env or not argv or not sys.executable or not _started_as_the_node():
        return
    saved = {k: os.environ.get(k) for k in (*env, RESTARTED)}
    os.environ.update(env, **{RESTARTED: ",".join(f"{k}={v}" for k, v in env.items())})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    except OSError:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    restarted = os.environ.pop(RESTARTED, "")
    if f"{TCACHE}=0" in restarted:
        said.append(f"{TCACHE}=0")
    elif TCACHE in os.environ.get("GLIBC_TUNABLES", ""):
        said.append(f"{TCACHE} left to the environment")
    if "PYTHONMALLOC=" in restarted:
        said.append("PYTHONMALLOC=malloc")
    elif "PYTHONMALLOC" in os.environ:
        said.append("PYTHONMALLOC left to the environment")
    if restarted:
        said.append("(restarted with them)")
    return "malloc: " + ", ".join(said)


TRIM_EVERY_S = 5.0


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
