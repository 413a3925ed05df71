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
Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 256 << 10
ENV = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, ARENA_MAX),
       "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD)}


def tune() -> str:
    """Apply the settings; returns a line for the log saying what was set."""
    if platform.libc_ver()[0] != "glibc":
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
    return "malloc: " + ", ".join(said)
