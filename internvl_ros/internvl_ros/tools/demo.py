"""The demo behind `make demo`: a bag replayed into the node, captions printed as they arrive.

    python -m internvl_ros.tools.demo [--model-dir DIR] [--backend onnxruntime|axengine]
                                      [--bag BAG] [--topic T] [--describe-every N]
                                      [--two-cameras]

Without --model-dir it builds the tiny random model (its captions show the pipeline working,
not what a model understands); without --bag it writes a synthetic bag of moving shapes and text,
raw and compressed. It starts internvl_node, runs internvl-bag-replay against it, and ends with
a table of frames, captions, median and p95 TTFT, and tokens/s. Child processes are cleaned up
on exit and on Ctrl-C. `make demo` maps MODEL_DIR, BACKEND, BAG and TOPIC to these options.

--two-cameras (TWO_CAMERAS=1 make demo) shows one node serving two cameras: the node runs with
config/internvl_two_cameras.yaml (cameras [front, rear], publish_annotated), the bag is replayed
twice at once, to /demo/front/image_raw and /demo/rear/image_raw, and each replay asks about its
own camera (`--live --camera`); the annotated frames are on /internvl/<camera>/annotated_image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PACKAGE_DIR = Path(__file__).resolve().parents[2]


def log(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def default_cache() -> Path:
    return Path(os.environ.get("INTERNVL_DEMO_CACHE", REPO_ROOT / ".cache" / "demo"))


def ensure_tiny_model(cache: Path) -> Path:
    """Build (once) the tiny random model and its ONNX export; returns the ONNX model dir."""
    from internvl_ros.export.testing import tiny_model_dirs

    log("using the tiny random model (built once, cached under .cache/)")
    _hf_dir, onnx_dir = tiny_model_dirs("a")
    return Path(onnx_dir)


def ensure_bag(cache: Path, frames: int) -> Path:
    from internvl_ros.tools.demo_bag import write_demo_bag

    bag = cache / f"synthetic-{frames}f"
    if not (bag / "metadata.yaml").exists():
        if bag.exists():
            shutil.rmtree(bag)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache)) / "bag"
        write_demo_bag(tmp, frames=frames, fps=10.0, storage="mcap")
        tmp.rename(bag)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        log(f"wrote a synthetic bag: {frames} frames of 640x480, raw and jpeg, to {bag}")
    return bag


def _pump(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


CAMERAS = ("front", "rear")  # --two-cameras (config/internvl_two_cameras.yaml)


def camera_topic(camera: str) -> str:
    return f"/demo/{camera}/image_raw"


def start_node(model_dir: Path, backend: str, topic: str, compressed: bool,
               max_new_tokens: int, verbose: bool, *extra: str) -> subprocess.Popen:
    params = PACKAGE_DIR / "config" / "internvl.yaml"
    cmd = [
        "internvl_node", "--ros-args",
        "--params-file", str(params),
        "-p", f"model_dir:={model_dir}",
        "-p", f"backend:={backend}",
        "-p", f"max_new_tokens:={max_new_tokens}",
        "-p", f"image_transport:={'compressed' if compressed else 'raw'}",
        "-r", f"{'image/compressed' if compressed else 'image'}:={topic}", *extra,
    ]
    log("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    prefix = "[node] " if verbose else None
    if prefix:
        threading.Thread(target=_pump, args=(proc.stdout, prefix), daemon=True).start()
    else:  # drain silently, but keep the last lines for errors
        threading.Thread(target=_drain, args=(proc,), daemon=True).start()
    return proc


def _drain(proc: subprocess.Popen) -> None:
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
    proc.tail = tail  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait()


def replay_two_cameras(args, bag: Path, topic: str, compressed: bool,
                       node: subprocess.Popen) -> int:
    """The bag replayed to both cameras' topics at once; each replay asks about its camera."""
    replays = []
    for cam in CAMERAS:
        publish = camera_topic(cam) + ("/compressed" if compressed else "")
        cmd = ["internvl-bag-replay", str(bag), "--topic", topic, "--publish-topic", publish,
               "--live", "--camera", cam, "--describe-every", str(args.describe_every),
               "--prompt", args.prompt, "--timeout", str(args.timeout)]
        if args.output:
            cmd += ["--output", str(args.output.with_suffix(f".{cam}.jsonl"))]
        log(f"replaying for camera {cam}: " + " ".join(cmd))
        replays.append(subprocess.Popen(cmd))
    try:
        status = max(r.wait() for r in replays)
    finally:
        for r in replays:
            if r.poll() is None:
                r.send_signal(signal.SIGINT)
                r.wait()
    if status != 0:
        log(f"a replay failed with status {status}")
        if node.poll() is not None:
            log(f"the node exited with status {node.returncode}")
        return status
    log("done: each camera was described from its own topic (annotated frames on "
        "/internvl/front/annotated_image and /internvl/rear/annotated_image)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR") or None)
    p.add_argument("--backend", default=os.environ.get("BACKEND") or "onnxruntime",
                   choices=["onnxruntime", "axengine"])
    p.add_argument("--bag", default=os.environ.get("BAG") or None)
    p.add_argument("--topic", default=os.environ.get("TOPIC") or None,
                   help="image topic of the bag (default /camera/image_raw for the synthetic bag)")
    p.add_argument("--frames", type=int, default=40, help="frames of the synthetic bag")
    p.add_argument("--describe-every", type=int, default=8)
    p.add_argument("--prompt", default="Describe what the robot sees.")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--output", type=Path, help="also write the captions as JSON lines here")
    p.add_argument("--verbose", action="store_true", help="show the node's log")
    p.add_argument("--two-cameras", action="store_true",
                   default=bool(os.environ.get("TWO_CAMERAS")),
                   help="one node, two cameras: replay the bag to two topics at once and ask "
                        "each camera about its own frames (env TWO_CAMERAS=1)")
    p.add_argument("--keep-running", action="store_true",
                   default=bool(os.environ.get("KEEP_RUNNING")),
                   help="afterwards, keep the node up (a continuous caption every 5 s) and loop "
                        "the bag until Ctrl-C, e.g. for internvl-console (env KEEP_RUNNING=1)")
    args = p.parse_args(argv)

    cache = default_cache()
    node = None
    interrupted = False

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        model_dir = Path(args.model_dir) if args.model_dir else ensure_tiny_model(cache)
        bag = Path(args.bag) if args.bag else ensure_bag(cache, args.frames)
        topic = args.topic or (None if args.bag else "/camera/image_raw")

        from internvl_ros.tools.bagio import BagError, ImageBag

        try:
            with ImageBag(bag, topic) as image_bag:
                topic, compressed = image_bag.topic, image_bag.kind == "compressed"
        except BagError as exc:
            log(str(exc))
            return 2

        extra = ["-p", "caption_rate_hz:=0.2"] if args.keep_running else []
        if args.two_cameras:
            extra += ["--params-file", str(PACKAGE_DIR / "config" / "internvl_two_cameras.yaml")]
            extra += [a for cam in CAMERAS for a in ("-r", f"{cam}/image:={camera_topic(cam)}")]
        node = start_node(model_dir, args.backend, topic, compressed, args.max_new_tokens,
                          args.verbose, *extra)
        if args.two_cameras:
            return replay_two_cameras(args, bag, topic, compressed, node)
        replay_cmd = [
            "internvl-bag-replay", str(bag), "--topic", topic,
            "--describe-every", str(args.describe_every), "--prompt", args.prompt,
            "--timeout", str(args.timeout),
        ]
        if args.output:
            replay_cmd += ["--output", str(args.output)]
        log("replaying: " + " ".join(replay_cmd))
        status = subprocess.call(replay_cmd)
        if status != 0:
            log(f"the replay failed with status {status}")
            if node.poll() is not None:
                log(f"the node exited with status {node.returncode}; its last lines:")
                for line in getattr(node, "tail", []):
                    sys.stdout.write("  " + line)
            return status
        if args.keep_running:
            log("the node keeps running and the bag loops; in another shell: `source env.sh && "
                "internvl-console`, then open http://127.0.0.1:8080/ (Ctrl-C here stops)")
            loop = subprocess.Popen(["internvl-bag-replay", str(bag), "--topic", topic, "--loop",
                                     "--continuous", "--quiet", "--timeout", str(args.timeout)])
            try:
                return loop.wait()
            finally:  # also on SIGTERM, which only this process receives
                if loop.poll() is None:
                    loop.send_signal(signal.SIGINT)
                    loop.wait()
        log("done (KEEP_RUNNING=1 make demo keeps the node up, to watch it with internvl-console)")
        return 0
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
        return 130
    finally:
        rc = stop(node)
        if node is not None and not interrupted and rc not in (0, None):
            log(f"the node exited with status {rc} on shutdown")


if __name__ == "__main__":
    sys.exit(main())
