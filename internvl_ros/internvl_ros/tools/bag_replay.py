"""Replay a camera bag into a running internvl_node and collect its captions.

    internvl-bag-replay BAG [--topic T] [--rate R] [--loop] [--start S --duration D]
                        [--describe-every N | --continuous] [--prompt P]
                        [--output captions.jsonl] [--record OUT_BAG]

Reads rosbag2 (sqlite3, mcap) and ROS 1 bags with `rosbags`, publishes the frames with the
bag's timing (scaled by --rate) and their original header stamps, and drives the node:
- `--describe-every N` (default 10) calls `<node>/describe` on every N-th frame. By default the
  frame travels inside the request, and the replay waits for the answer before going on, so every
  described frame gets exactly one caption, reproducibly (regression tests). `--live` instead
  asks about the node's latest frame without pausing the replay, as a robot would.
- `--continuous` only listens to the node's `caption_stamped` topic (its `caption_rate_hz` mode).
Each caption becomes one JSON line: source stamp, frame index, prompt, text and timings.

Exit status: 0 ok; 2 bad arguments, or a missing or unreadable bag, or a missing topic;
3 the node did not answer within --timeout; 130 interrupted (Ctrl-C or SIGTERM: the replay
stops, --record and --output are closed, the summary is printed).
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import queue
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from internvl_ros.tools.bagio import (
    BagError,
    BagFrame,
    ImageBag,
    frame_to_rosbags,
    msgtype_of,
    ros2_typestore,
)

EXIT_OK, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 2, 3, 130
DISCOVERY_SETTLE_S = 1.0  # after the service appears, for the node to discover us in turn


class NodeTimeout(Exception):
    """The node did not answer in time."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="internvl-bag-replay", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bag", type=Path, help="rosbag2 folder (sqlite3 or mcap) or ROS 1 .bag file")
    p.add_argument("--topic", help="image topic in the bag (default: its only image topic)")
    p.add_argument("--publish-topic", help="topic to publish on (default: the bag's topic name)")
    p.add_argument("--node", default="/internvl", help="the node's name (default /internvl)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    p.add_argument("--loop", action="store_true", help="replay the bag again and again")
    p.add_argument("--start", type=float, default=0.0, help="seconds to skip at the bag's start")
    p.add_argument("--duration", type=float, help="seconds of the bag to play")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--describe-every", type=int, default=10, metavar="N",
                      help="call Describe on every N-th frame (default 10)")
    mode.add_argument("--continuous", action="store_true",
                      help="don't call Describe; record the node's continuous captions")
    p.add_argument("--live", action="store_true",
                   help="describe the node's latest frame without pausing, instead of sending "
                        "the frame in the request and waiting")
    p.add_argument("--camera", default="",
                   help="with --live: the node's camera to describe (its `cameras` parameter; "
                        "default: its first)")
    p.add_argument("--prompt", default="", help="prompt (default: the node's default_prompt)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the node's setting")
    p.add_argument("--output", type=Path, help="write captions as JSON lines to this file")
    p.add_argument("--record", type=Path, help="write a rosbag2 with the images and captions")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the node (service discovery and each answer)")
    p.add_argument("--drain", type=float, default=3.0,
                   help="with --continuous, seconds to keep listening after the last frame")
    p.add_argument("--quiet", action="store_true", help="don't print captions to stdout")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be > 0")
    if args.describe_every < 1:
        p.error("--describe-every must be >= 1")
    if args.start < 0 or (args.duration is not None and args.duration <= 0):
        p.error("--start must be >= 0 and --duration > 0")
    return args


class Progress:
    """A progress bar on a terminal, plain lines otherwise (both on stderr)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.frames = 0
        self.captions = 0
        self._last_line = 0.0

    def update(self, frames: int | None = None, captions: int | None = None) -> None:
        if frames is not None:
            self.frames = frames
        if captions is not None:
            self.captions = captions
        now = time.monotonic()
        if self.tty:
            if self.total:
                done = int(30 * min(self.frames, self.total) / self.total)
                bar = "#" * done + "." * (30 - done)
                text = f"[{bar}] {self.frames}/{self.total} frames, {self.captions} captions"
            else:
                text = f"{self.frames} frames, {self.captions} captions"
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
        elif now - self._last_line > 2.0:
            self._last_line = now
            print(f"progress: {self.frames} frames published, {self.captions} captions",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        print(f"progress: {self.frames} frames published, {self.captions} captions",
              file=sys.stderr, flush=True)


def _msg_fields(cls) -> list[str]:
    """The message fields of a rosbags message class (not its __msgtype__ marker)."""
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("__")]


class Recorder:
    """Writes the replayed images and the node's captions to a rosbag2 (sqlite3).

    rosbags' sqlite3 writer must be used from the thread that opened it, and messages come from
    the replay loop and from the executor thread: one writer thread owns the bag, fed by a queue.
    """

    def __init__(self, path: Path, image_topic: str, kind: str, node: str) -> None:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("internvl_ros_interfaces")) / "msg"
        self.store = ros2_typestore({
            "internvl_ros_interfaces/msg/Timings": share / "Timings.msg",
            "internvl_ros_interfaces/msg/Detection": share / "Detection.msg",
            "internvl_ros_interfaces/msg/Caption": share / "Caption.msg",
        })
        self.kind = kind
        self.topics = {
            "image": (image_topic, msgtype_of(kind)),
            "caption": (f"{node}/caption", "std_msgs/msg/String"),
            "stamped": (f"{node}/caption_stamped", "internvl_ros_interfaces/msg/Caption"),
        }
        # bounded: when sqlite falls behind a fast replay, the replay waits instead of growing
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path, ready), daemon=True)
        self.thread.start()
        ready.wait()
        if self.error:
            raise BagError(f"cannot write {path}: {self.error}")

    def _run(self, path: Path, ready: threading.Event) -> None:
        from rosbags.rosbag2 import Writer

        try:
            writer = Writer(path, version=9)
            writer.open()
            conns = {key: writer.add_connection(topic, msgtype, typestore=self.store)
                     for key, (topic, msgtype) in self.topics.items()}
        except Exception as exc:  # reported to the caller by __init__
            self.error = exc
            ready.set()
            return
        ready.set()
        try:
            while (item := self.queue.get()) is not None:
                key, t_ns, msg = item
                writer.write(conns[key], t_ns,
                             self.store.serialize_cdr(msg, self.topics[key][1]))
        except Exception as exc:
            self.error = exc
        finally:
            writer.close()

    def _put(self, key: str, msg) -> None:
        self.queue.put((key, time.time_ns(), msg))

    def frame(self, frame: BagFrame) -> None:
        self._put("image", frame_to_rosbags(self.store, frame))

    def caption_text(self, text: str) -> None:
        self._put("caption", self.store.types["std_msgs/msg/String"](data=text))

    def caption_stamped(self, ros_msg) -> None:
        t = self.store.types
        timings_cls = t["internvl_ros_interfaces/msg/Timings"]
        detection_cls = t["internvl_ros_interfaces/msg/Detection"]
        caption_cls = t["internvl_ros_interfaces/msg/Caption"]
        timings = timings_cls(**{name: getattr(ros_msg.timings, name)
                                 for name in _msg_fields(timings_cls)})
        detections = [detection_cls(**{name: getattr(d, name)
                                       for name in _msg_fields(detection_cls)})
                      for d in ros_msg.detections]
        header = t["std_msgs/msg/Header"](
            stamp=t["builtin_interfaces/msg/Time"](sec=ros_msg.header.stamp.sec,
                                                   nanosec=ros_msg.header.stamp.nanosec),
            frame_id=ros_msg.header.frame_id)
        detection_cls = t["internvl_ros_interfaces/msg/Detection"]
        detections = [detection_cls(**{name: getattr(d, name)
                                       for name in _msg_fields(detection_cls)})
                      for d in ros_msg.detections]
        fields = {name: getattr(ros_msg, name) for name in _msg_fields(caption_cls)
                  if name not in ("header", "timings", "detections")}
        self._put("stamped", caption_cls(header=header, timings=timings, detections=detections,
                                         **fields))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise BagError(f"recording failed: {self.error}")


def timings_dict(timings) -> dict:
    """A Timings message as {field: value}: every field the message has, by its own names."""
    return {name: getattr(timings, name) for name in timings.get_fields_and_field_types()}


def to_ros_image(frame: BagFrame):
    """An rclpy Image/CompressedImage from a bag frame."""
    from sensor_msgs.msg import CompressedImage, Image

    msg = CompressedImage() if frame.kind == "compressed" else Image()
    msg.header.stamp.sec = frame.stamp_sec
    msg.header.stamp.nanosec = frame.stamp_nanosec
    msg.header.frame_id = frame.frame_id
    msg.data = array.array("B", frame.data)
    if frame.kind == "compressed":
        msg.format = frame.format
    else:
        msg.height, msg.width, msg.encoding = frame.height, frame.width, frame.encoding
        msg.is_bigendian, msg.step = frame.is_bigendian, frame.step
    return msg


class Replay:
    """Publishes the frames, drives the node, and collects captions."""

    def __init__(self, args: argparse.Namespace, bag: ImageBag) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from internvl_ros_interfaces.msg import Caption
        from internvl_ros_interfaces.srv import Describe

        self.args = args
        self.bag = bag
        self.node_name = "/" + args.node.strip("/")
        self.node = rclpy.create_node("internvl_bag_replay")
        self.topic = args.publish_topic or bag.topic
        msg_cls = CompressedImage if bag.kind == "compressed" else Image
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = self.node.create_publisher(msg_cls, self.topic, qos)
        self.client = self.node.create_client(Describe, f"{self.node_name}/describe")
        self.Describe = Describe
        self.lock = threading.Lock()
        # what the summary needs of each caption (the full records go to --output)
        self.records: list[dict] = []
        self.n_ok = 0
        self.stamp_to_index: dict[int, int] = {}
        self.pending: list = []
        self.out = args.output.open("w", encoding="utf-8") if args.output else None
        self.recorder = (Recorder(args.record, self.topic, bag.kind, self.node_name)
                         if args.record else None)
        if args.continuous or self.recorder:
            self.node.create_subscription(Caption, f"{self.node_name}/caption_stamped",
                                          self._on_caption_stamped, 10)
        if self.recorder:
            self.node.create_subscription(
                String, f"{self.node_name}/caption",
                lambda m: self.recorder.caption_text(m.data), 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.spin_thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.spin_thread.start()
        total = None if args.loop else bag.message_count
        if total and args.start == 0 and args.duration is None:
            self.progress = Progress(total)
        else:
            self.progress = Progress(None)

    # -- captions ---------------------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        with self.lock:
            self.records.append({"success": record["success"], "timings": {
                k: record["timings"][k] for k in ("ttft", "tokens_per_second")}})
            self.n_ok += int(record["success"])
            n_ok = self.n_ok
            if self.out:
                self.out.write(json.dumps(record) + "\n")
                self.out.flush()
        if not self.args.quiet:
            cam = f"[{self.args.camera}] " if self.args.camera else ""
            if record["success"]:
                print(f"{cam}[frame {record['frame_index']}, stamp {record['stamp']['sec']}."
                      f"{record['stamp']['nanosec']:09d}] {record['text']}", flush=True)
            else:
                print(f"{cam}[frame {record['frame_index']}] failed: {record['message']}",
                      flush=True)
        self.progress.update(captions=n_ok)

    def _record(self, source: str, stamp, success: bool, text: str, message: str,
                finish_reason: str, timings, prompt: str) -> dict:
        stamp_ns = stamp.sec * 1_000_000_000 + stamp.nanosec
        with self.lock:
            index = self.stamp_to_index.get(stamp_ns)
        return {
            "frame_index": index,
            "stamp": {"sec": stamp.sec, "nanosec": stamp.nanosec},
            "stamp_ns": stamp_ns,
            "topic": self.topic,
            "source": source,
            "prompt": prompt,
            "success": success,
            "text": text,
            "message": message,
            "finish_reason": finish_reason,
            "timings": timings_dict(timings),
        }

    def _on_caption_stamped(self, msg) -> None:
        try:
            self._handle_caption_stamped(msg)
        except Exception as exc:  # an exception here would stop the executor thread
            print(f"internvl-bag-replay: dropped a caption: {exc}", file=sys.stderr)

    def _handle_caption_stamped(self, msg) -> None:
        if self.recorder:
            self.recorder.caption_stamped(msg)
        if self.args.continuous and msg.source == "continuous":
            self._emit(self._record("continuous", msg.header.stamp, True, msg.text, "ok",
                                    msg.finish_reason, msg.timings, msg.prompt))

    # -- the node ---------------------------------------------------------------------------
    def wait_for_node(self) -> None:
        if self.args.continuous:
            deadline = time.monotonic() + self.args.timeout
            while self.pub.get_subscription_count() == 0:
                if time.monotonic() > deadline:
                    raise NodeTimeout(f"nothing subscribes to {self.topic} after "
                                      f"{self.args.timeout:.0f} s")
                time.sleep(0.05)
            return
        if not self.client.wait_for_service(timeout_sec=self.args.timeout):
            raise NodeTimeout(f"service {self.node_name}/describe is not available after "
                              f"{self.args.timeout:.0f} s")
        if self.recorder:  # the node's captions must reach us from the first one on
            deadline = time.monotonic() + min(5.0, self.args.timeout)
            while (self.node.count_publishers(f"{self.node_name}/caption_stamped") == 0
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        if not self.args.live:
            # Each request carries its frame: the node's subscription does not matter. But the
            # node must have discovered our client too, or Fast DDS drops its first response
            # ("failed to send response (timeout)"); rclpy cannot tell when it has.
            time.sleep(min(DISCOVERY_SETTLE_S, self.args.timeout))
            return
        # Give the node's image subscription a moment to match our publisher.
        deadline = time.monotonic() + min(5.0, self.args.timeout)
        while self.pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The node may re-subscribe once it sees our (reliable) publisher: let it settle
        # before frames count, or the first request finds no frame.
        time.sleep(1.5)

    def _request(self, frame: BagFrame):
        # any frame age: a replay may pause (waiting for answers) longer than the node's limit
        req = self.Describe.Request(prompt=self.args.prompt, camera=self.args.camera,
                                    max_new_tokens=self.args.max_new_tokens, max_frame_age=-1.0)
        if not self.args.live:
            if frame.kind == "compressed":
                req.compressed_image = to_ros_image(frame)
            else:
                req.image = to_ros_image(frame)
        return req

    def _response_record(self, frame: BagFrame, response) -> dict:
        stamp = response.image_header.stamp
        if not response.success and stamp.sec == 0 and stamp.nanosec == 0:
            stamp = type(stamp)(sec=frame.stamp_sec, nanosec=frame.stamp_nanosec)
        return self._record("service", stamp, response.success, response.caption,
                            response.message, response.finish_reason, response.timings,
                            self.args.prompt)

    def describe(self, frame: BagFrame) -> float:
        """Ask about `frame`; returns the seconds spent waiting (to shift the replay clock)."""
        future = self.client.call_async(self._request(frame))
        if self.args.live:
            future.add_done_callback(lambda f: self._emit(self._response_record(frame,
                                                                                f.result())))
            self.pending = [f for f in self.pending if not f.done()] + [future]
            return 0.0
        t0 = time.monotonic()
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(self.args.timeout):
            self.client.remove_pending_request(future)
            raise NodeTimeout(f"{self.node_name}/describe did not answer within "
                              f"{self.args.timeout:.0f} s (frame {frame.index})")
        self._emit(self._response_record(frame, future.result()))
        return time.monotonic() - t0

    # -- the replay loop --------------------------------------------------------------------
    def run(self) -> None:
        self.wait_for_node()
        published = 0
        while True:
            t_wall0 = time.monotonic()
            t_bag0 = None
            for frame in self.bag.frames(self.args.start, self.args.duration):
                if t_bag0 is None:
                    t_bag0 = frame.bag_time_ns
                due = t_wall0 + (frame.bag_time_ns - t_bag0) / 1e9 / self.args.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with self.lock:
                    self.stamp_to_index[frame.stamp_ns] = published
                self.pub.publish(to_ros_image(frame))
                if self.recorder:
                    self.recorder.frame(frame)
                published += 1
                self.progress.update(frames=published)
                # live: the node describes its latest frame, so ask once it has N of them
                nth = published if self.args.live else published - 1
                if not self.args.continuous and nth % self.args.describe_every == 0:
                    t_wall0 += self.describe(_renumber(frame, published - 1))
            if not self.args.loop or t_bag0 is None:
                break
        self.finish()

    def finish(self) -> None:
        deadline = time.monotonic() + (self.args.drain if self.args.continuous
                                       else self.args.timeout)
        while self.pending and time.monotonic() < deadline:
            self.pending = [f for f in self.pending if not f.done()]
            time.sleep(0.05)
        if self.pending:
            raise NodeTimeout(f"{len(self.pending)} Describe call(s) got no answer within "
                              f"{self.args.timeout:.0f} s")
        if self.args.continuous:
            time.sleep(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.progress.close()
        self.executor.shutdown(timeout_sec=2.0)
        self.spin_thread.join(timeout=2.0)
        self.node.destroy_node()
        if self.out:
            self.out.close()
        if self.recorder:
            self.recorder.close()


def _renumber(frame: BagFrame, index: int) -> BagFrame:
    """The frame with its replay index (which keeps counting across --loop)."""
    if frame.index == index:
        return frame
    return dataclasses.replace(frame, index=index)


def summary_table(records: list[dict], frames: int) -> str:
    """A markdown table: frames, captions, median and p95 TTFT, tokens/s."""
    ok = [r for r in records if r["success"]]
    ttft = sorted(r["timings"]["ttft"] for r in ok)
    tps = [r["timings"]["tokens_per_second"] for r in ok if r["timings"]["tokens_per_second"] > 0]

    def pct(values: list[float], q: float) -> str:
        if not values:
            return "-"
        k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return f"{values[k]:.3f}"

    rows = [
        ("frames published", str(frames)),
        ("captions", str(len(ok))),
        ("failed requests", str(len(records) - len(ok))),
        ("median TTFT (s)", f"{statistics.median(ttft):.3f}" if ttft else "-"),
        ("p95 TTFT (s)", pct(ttft, 0.95)),
        ("decode tokens/s (mean)", f"{statistics.fmean(tps):.1f}" if tps else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM stop the replay cleanly (rclpy's own handlers are off, see _replay);
    # SIGINT also when this process was started with it ignored, as rclpy's handler did
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        return _replay(args)
    except KeyboardInterrupt:  # before the replay started, or a second one while cleaning up
        print("\ninternvl-bag-replay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _replay(args: argparse.Namespace) -> int:
    try:
        bag = ImageBag(args.bag, args.topic)
    except BagError as exc:
        print(f"internvl-bag-replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.record and args.record.exists():
        print(f"internvl-bag-replay: {args.record} exists already; choose a new --record path",
              file=sys.stderr)
        return EXIT_USAGE

    import rclpy

    from internvl_ros.ros import compat

    # Without rclpy's signal handlers: they would shut the context down under the replay (a
    # traceback from the spin thread and one from the main thread); Ctrl-C is a
    # KeyboardInterrupt here instead, answered below.
    compat.init()
    replay = None
    status = EXIT_OK
    try:
        replay = Replay(args, bag)
        replay.run()
    except NodeTimeout as exc:
        print(f"\ninternvl-bag-replay: the node did not answer: {exc}. Is internvl_node "
              f"running as {args.node}, on this ROS_DOMAIN_ID, with a model loaded?",
              file=sys.stderr)
        status = EXIT_TIMEOUT
    except BagError as exc:
        print(f"\ninternvl-bag-replay: {exc}", file=sys.stderr)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninternvl-bag-replay: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        if replay is not None:
            replay.close()
            if status in (EXIT_OK, EXIT_INTERRUPTED):
                print(summary_table(replay.records, replay.progress.frames), flush=True)
        bag.close()
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
