"""Shared helpers of the benchmark scripts: paths, the timed Session wrapper, RSS, JSON I/O.

Nothing here imports torch, transformers or onnxruntime, so the runtime workers stay as lean as
the real runtime.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PKG_ROOT = REPO_ROOT / "internvl_ros"  # holds the `internvl_ros` Python package
CACHE_DIR = REPO_ROOT / ".cache" / "bench"
RESULTS_DIR = BENCH_DIR / "results"


def ensure_import_path() -> None:
    """Make `import internvl_ros` work from a plain checkout (no colcon install needed)."""
    if str(PKG_ROOT) not in sys.path:
        sys.path.insert(0, str(PKG_ROOT))


def child_env(threads: int = 2) -> dict:
    """Environment of the worker subprocesses: the package on PYTHONPATH, thread caps."""
    env = dict(os.environ)
    parts = [str(PKG_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("OMP_NUM_THREADS", str(threads))  # torch's OpenMP pool
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux keeps `ru_maxrss` across exec, so a worker would inherit the peak of the process that
    forked it; VmHWM (/proc/self/status) belongs to the address space of this program only.
    `ru_maxrss` (KiB on Linux) is the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def run_worker(script: str, task: str, args: dict, workdir: Path, timeout: float,
               threads: int = 2, log=print) -> dict:
    """Run `python bench/<script> <task> ARGS.json OUT.json` in a fresh process; return OUT."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{task}-{args.get('label', '')}".strip("-")
    in_path, out_path = workdir / f"{tag}.in.json", workdir / f"{tag}.out.json"
    write_json(in_path, args)
    if out_path.exists():
        out_path.unlink()
    cmd = [sys.executable, str(BENCH_DIR / script), task, str(in_path), str(out_path)]
    load0 = machine_load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(threads), cwd=str(REPO_ROOT), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    load = load_between(load0, machine_load(), wall)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"bench worker {script} {task} ({tag}) failed with exit code "
                           f"{proc.returncode}:\n{tail}")
    out = read_json(out_path)
    out["worker_wall_s"] = wall
    out["machine_load"] = load
    busy = "" if load is None else (f" (other processes used {100 * load['others_frac']:.0f}% "
                                    f"of the CPUs, steal {100 * load['steal_frac']:.0f}%)")
    log(f"  {tag}: done in {wall:.1f} s{busy}")
    return out


def machine_load():
    """CPU jiffies of the whole machine (/proc/stat) and CPU seconds of our children."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    v = [int(x) for x in fields]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"busy": sum(v[:3]) + v[5] + v[6], "steal": v[7] if len(v) > 7 else 0,
            "children_s": usage.ru_utime + usage.ru_stime}


def load_between(a, b, wall: float):
    """Share of the machine used by other processes (and stolen by the hypervisor) meanwhile:
    a benchmark on a shared machine is only as good as this is small."""
    if a is None or b is None or wall <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    busy = (b["busy"] - a["busy"]) / hz
    mine = b["children_s"] - a["children_s"]
    return {"others_frac": max(busy - mine, 0.0) / (wall * cpus),
            "steal_frac": (b["steal"] - a["steal"]) / hz / (wall * cpus),
            "worker_cpu_s": mine}


class Meter:
    """Totals over every `run()` of the wrapped sessions."""

    def __init__(self, by_input: bool = False):
        self.run_s = 0.0
        self.calls = 0
        self.bytes_fed = 0
        self.by_input = {} if by_input else None

    def snapshot(self) -> tuple:
        return self.run_s, self.calls, self.bytes_fed


class TimedSession:
    """A Session (internvl_ros.backends.base) wrapper: times `run()` and counts the bytes fed.

    `capture` keeps a copy of the first output of every run (the logits of the post model, the
    features of the ViT).
    """

    def __init__(self, inner, meter: Meter, capture: bool = False):
        self._inner = inner
        self.meter = meter
        self.capture = capture
        self.captured = []
        self.path = getattr(inner, "path", "?")
        self.dynamic_shapes = getattr(inner, "dynamic_shapes", True)
        self.num_shape_groups = getattr(inner, "num_shape_groups", 1)

    def get_inputs(self, shape_group: int = 0):
        return self._inner.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0):
        return self._inner.get_outputs(shape_group)

    def run(self, output_names, feed, shape_group: int = 0):
        nbytes = 0
        for v in feed.values():
            nbytes += v.nbytes
        t = time.perf_counter()
        out = self._inner.run(output_names, feed, shape_group=shape_group)
        dt = time.perf_counter() - t
        m = self.meter
        m.run_s += dt
        m.calls += 1
        m.bytes_fed += nbytes
        if m.by_input is not None:
            for k, v in feed.items():
                m.by_input[k] = m.by_input.get(k, 0) + v.nbytes
        if self.capture:
            self.captured.append(out[0].copy())
        return out

    def close(self) -> None:
        self._inner.close()


def wrap_pipeline(pipe, meter: Meter, capture_logits: bool = False,
                  capture_vit: bool = False) -> dict:
    """Replace the sessions of a constructed Pipeline by TimedSessions (from the outside: the
    pipeline looks its sessions up at call time). Returns {"post": ..., "vit": ...} wrappers."""
    llm = pipe.llm
    if hasattr(llm, "session"):  # the host layout: one KV session (bench/host.py)
        from host import wrap_host_llm

        wrapped = {"post": wrap_host_llm(llm, meter, capture_logits), "vit": None}
    else:
        llm.layers = [TimedSession(s, meter) for s in llm.layers]
        llm.post = TimedSession(llm.post, meter, capture=capture_logits)
        wrapped = {"post": llm.post, "vit": None}
    if pipe.vision is not None:
        pipe.vision.session = TimedSession(pipe.vision.session, Meter(), capture=capture_vit)
        wrapped["vit"] = pipe.vision.session
    return wrapped


def disable_eos(pipe) -> None:
    """Make every request run to max_new_tokens (the benchmark compares a fixed token count).

    The Generation copies `tokenizer.eos_token_ids` at construction; an empty tuple means no
    token stops it.
    """
    pipe.tokenizer.eos_token_ids = ()


def bench_image(seed: int = 0, height: int = 480, width: int = 640):
    """A deterministic RGB uint8 test image (gradients + noise + a few blocks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.int32)
    img += rng.integers(-20, 21, img.shape)
    for _ in range(6):
        r0, c0 = rng.integers(0, height - 60), rng.integers(0, width - 60)
        img[r0:r0 + 60, c0:c0 + 60] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)  # (H, W, 3)


#: the warm-up request: short (a short system prompt), it only warms kernels and allocators
WARMUP_SYSTEM = "You are a robot."
QUESTION = "Describe what is in front of the robot, and say whether the path is clear."
TEXT_QUESTION = "What should a robot check before it crosses a busy corridor?"


def serve_worker(tasks: dict, script: str, argv=None) -> int:
    """main() of a worker script: `python bench/<script> TASK ARGS.json OUT.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in tasks:
        print(f"usage: {script} {'|'.join(tasks)} ARGS.json OUT.json", file=sys.stderr)
        return 2
    write_json(argv[2], tasks[argv[0]](read_json(argv[1])))
    return 0
