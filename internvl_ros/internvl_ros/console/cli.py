"""internvl-console: a web page to watch the camera, ask the robot and see the answer stream.

    internvl-console [--node /internvl] [--host 127.0.0.1] [--port 8080]
    internvl-console --model-dir DIR [--backend onnxruntime|axengine]   # offline, no ROS
    ros2 run internvl_ros console --node /robot/internvl

Open the printed address in a browser. It listens on loopback only unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from .server import ConsoleServer, is_loopback, serve


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args: list[str] = []
    if "--ros-args" in argv:  # `ros2 run` / launch may append ROS arguments
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    p = argparse.ArgumentParser(prog="internvl-console", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks one)")
    p.add_argument("--node", default="/internvl",
                   help="the InternVL node: its full name or a namespace holding it "
                        "(default /internvl)")
    p.add_argument("--model-dir", help="offline mode: run this model here, no ROS")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "axengine"],
                   help="offline mode: inference backend")
    p.add_argument("--provider", default=None, help="offline mode: backend provider")
    p.add_argument("--threads", type=int, default=None, help="offline mode: onnxruntime threads")
    p.add_argument("--max-tiles", type=int, default=1, help="offline mode: tiles per image")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="offline mode: most tokens per answer (ROS mode: the node's parameter)")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="offline mode: largest accepted upload in MB (default 10)")
    p.add_argument("--preview-width", type=int, default=640,
                   help="ROS mode: live view width in pixels (frames are downscaled to it)")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a TCP port")
    if args.max_upload_mb <= 0 or args.max_new_tokens < 1 or args.preview_width < 16:
        p.error("--max-upload-mb, --max-new-tokens and --preview-width must be positive")
    return args, ros_args


def make_backend(args: argparse.Namespace, ros_args: list[str]):
    if args.model_dir:
        from .offline_backend import OfflineBackend

        return OfflineBackend(args.model_dir, backend=args.backend, provider=args.provider,
                              num_threads=args.threads, max_tiles=args.max_tiles,
                              max_new_tokens=args.max_new_tokens)
    from .ros_backend import RosBackend

    return RosBackend(args.node, ros_args=["internvl-console", *ros_args],
                      preview_width=args.preview_width)


def main(argv: Sequence[str] | None = None) -> int:
    args, ros_args = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored
    try:
        backend = make_backend(args, ros_args)
    except Exception as e:  # a model dir that does not load, rclpy that cannot start
        print(f"internvl-console: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        try:
            server = ConsoleServer(args.host, args.port, backend,
                                   max_upload_bytes=int(args.max_upload_mb * 1e6),
                                   verbose=args.verbose)
        except OSError as e:
            print(f"internvl-console: error: cannot listen on {args.host}:{args.port}: "
                  f"{e.strerror or e}; choose another --port", file=sys.stderr)
            return 2
        what = (f"offline, model {args.model_dir}" if args.model_dir
                else f"ROS, node {backend.target}")
        print(f"internvl-console: serving {server.url} ({what}); Ctrl-C to stop", flush=True)
        if not is_loopback(args.host):
            print(f"internvl-console: warning: listening on {args.host}: anyone who can reach "
                  "this machine can see the camera and ask the robot", flush=True)
        serve(server)
        return 0
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
