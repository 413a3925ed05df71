"""The node's malloc settings (ros/allocator.py): at most 2 glibc arenas however many threads
allocate, glibc's per-thread cache off and Python's objects on malloc (the node runs itself again
with both), the trimmer, and the user's own settings left alone. Each case runs in a fresh
process, since mallopt must come before the threads and glibc reads its tunables only at start."""

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


def child_env(**env) -> dict:
    """This environment without any malloc setting, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
            and k not in ("GLIBC_TUNABLES", "PYTHONMALLOC")}
    return {**full, **env}


def probe(mode: str, **env) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=child_env(**env),
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


# Started as the node would be (a script named internvl_node): restart_tuned, then two probes.
# (1) 7 small blocks are freed: with glibc's per-thread cache on they stay in it (counted as in
# use); with it off they go to the arena's fast bins, which mallinfo2 counts as free.
# (2) 20,000 small Python objects are made: on pymalloc they take its own mmapped arenas, on
# malloc they take malloc's in-use memory.
NODE_PROBE = """
import ctypes, os, sys
print("start", os.getpid(), flush=True)
from internvl_ros.ros import allocator
allocator.restart_tuned()
line = allocator.tune()
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
blocks = [libc.malloc(72) for _ in range(7)]
before = libc.mallinfo2().fsmblks
for b in blocks:
    libc.free(b)
freed = libc.mallinfo2().fsmblks - before
before = libc.mallinfo2().uordblks
objects = [(i, str(i)) for i in range(20000)]
print(os.getpid())
print(freed)
print(libc.mallinfo2().uordblks - before)
print(os.environ.get("GLIBC_TUNABLES", ""))
print(os.environ.get("PYTHONMALLOC", ""))
print(line)
"""
ON_MALLOC = 20000 * 64  # bytes malloc hands out for the objects, at the least


def node_probe(tmp_path, name: str = "internvl_node", **env) -> dict:
    script = tmp_path / name
    script.write_text(NODE_PROBE)
    out = subprocess.run([sys.executable, str(script)], env=child_env(**env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    starts = [line.split()[1] for line in lines if line.startswith("start ")]
    rest = [line for line in lines if not line.startswith("start ")]
    assert len(rest) == 6, out.stdout
    return {"starts": starts, "pid": rest[0], "freed_to_fastbins": int(rest[1]),
            "objects_on_malloc": int(rest[2]), "tunables": rest[3], "pythonmalloc": rest[4],
            "line": rest[5]}


def test_the_node_restarts_itself_once_with_the_start_up_settings(tmp_path):
    r = node_probe(tmp_path)
    assert r["starts"] == [r["pid"], r["pid"]], r  # once more, as the same process (exec)
    assert r["tunables"] == "glibc.malloc.tcache_count=0" and r["pythonmalloc"] == "malloc", r
    assert r["line"] == ("malloc: MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=262144, "
                         "glibc.malloc.tcache_count=0, PYTHONMALLOC=malloc, "
                         "(restarted with them)"), r
    assert r["freed_to_fastbins"] >= 7 * 72, r  # the freed blocks are free, not cached
    assert r["objects_on_malloc"] >= ON_MALLOC, r


def test_a_program_that_is_not_the_node_keeps_the_defaults(tmp_path):
    """And the probes can fail: the freed blocks stay in the cache, the objects off malloc."""
    r = node_probe(tmp_path, name="some_other_program")
    assert r["starts"] == [r["pid"]], r
    assert r["tunables"] == "" and r["pythonmalloc"] == "", r
    assert r["line"] == "malloc: MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=262144", r
    assert r["freed_to_fastbins"] == 0, r
    assert r["objects_on_malloc"] < ON_MALLOC / 4, r


def test_the_users_own_start_up_settings_win(tmp_path):
    r = node_probe(tmp_path, GLIBC_TUNABLES="glibc.malloc.tcache_count=7:glibc.malloc.arena_max=3",
                   PYTHONMALLOC="pymalloc")
    assert r["starts"] == [r["pid"]], r  # nothing left to restart for
    assert r["tunables"] == "glibc.malloc.tcache_count=7:glibc.malloc.arena_max=3", r
    assert r["line"] == ("malloc: MALLOC_ARENA_MAX left to the environment, "
                         "MALLOC_MMAP_THRESHOLD_=262144, glibc.malloc.tcache_count left to the "
                         "environment, PYTHONMALLOC left to the environment"), r
    assert r["freed_to_fastbins"] == 0 and r["objects_on_malloc"] < ON_MALLOC / 4, r
    # other tunables of the user's are kept, and the cache setting is added to them
    r = node_probe(tmp_path, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert r["starts"] == [r["pid"], r["pid"]], r
    assert r["tunables"] == "glibc.malloc.mmap_threshold=1048576:glibc.malloc.tcache_count=0", r
    assert r["freed_to_fastbins"] >= 7 * 72 and r["objects_on_malloc"] >= ON_MALLOC, r


# 800 blocks of 64 KiB (heap, not mmap) written and freed but the last, which keeps the heap's
# top in use: free() cannot give back the 50 MB below it, malloc_trim can.
TRIM_PROBE = """
import ctypes
from internvl_ros.ros import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
blocks = [libc.malloc(64 << 10) for _ in range(800)]
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks[:-1]:
    libc.free(b)
before = anon_mb()
trim = allocator.Trimmer(every_s=3600)
trim()
after = anon_mb()
trim()  # within every_s: not again
print(before, after, trim.trims)
"""


def test_the_trimmer_gives_freed_heap_memory_back_at_most_every_interval():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, trims = out.stdout.split()
    assert float(before) - float(after) > 40, out.stdout  # 50 MB freed in the heap given back
    assert int(trims) == 1, out.stdout
