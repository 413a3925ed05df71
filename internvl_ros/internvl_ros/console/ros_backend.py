"""ROS mode: the console as a client of a running internvl_node.

- the node is found in the graph from ``--node`` (its full name, or a namespace holding one);
- image sources are discovered from the graph too: the node's image subscriptions (its camera,
  or cameras) and the images it publishes (an annotated view, when it has one). Nothing is
  assumed beyond the message types, so a node without an annotated topic simply has none;
- frames are received serialized (``raw=True``) and only deserialized, converted and encoded
  when the page asks for one (a few times a second, downscaled), from the sources the page
  shows; a source nobody looked at for 10 s is unsubscribed. QoS matches the publishers, like
  the node's ``qos_reliability: auto`` (docs/NODE.md, "Large images and QoS");
- questions go to the node's ``~/describe`` action, with feedback streamed to the page and
  cancel; the history comes from ``~/caption_stamped``, the status panel from ``/diagnostics``.

All graph work and (un)subscribing happen on the executor thread; HTTP threads only read the
latest state and ask for a refresh.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from internvl_ros.core.errors import ImageDecodeError

from .imaging import preview_jpeg
from .server import Ask, ConsoleError, History

IMAGE_TYPES = {"sensor_msgs/msg/Image": "Image",
               "sensor_msgs/msg/CompressedImage": "CompressedImage"}
IDLE_UNSUBSCRIBE_S = 10.0
DIAG_STALE_S = 5.0
SERVER_LOST_S = 5.0
MAX_FRAME_DIM = 16384
LEVELS = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}


# ---------------------------------------------------------------------------------------------
# graph logic (pure functions, unit-tested)


def normalize_name(name: str) -> str:
    """'/internvl' from 'internvl', '/robot/' -> '/robot'."""
    name = "/" + name.strip().strip("/")
    return name if name != "/" else "/"


def resolve_node(target: str, nodes: set[str]) -> str | None:
    """The full name of the InternVL node that ``--node target`` means, or None if not up.

    ``target`` is a node's full name (``/internvl``, ``/robot/internvl``) or a namespace that
    holds one node named ``internvl`` (``/robot``: ``/robot/internvl``; the first in sorted
    order if the namespace has several below it).
    """
    target = normalize_name(target)
    if target in nodes:
        return target
    base = "" if target == "/" else target
    if f"{base}/internvl" in nodes:
        return f"{base}/internvl"
    below = sorted(n for n in nodes if n.startswith(base + "/") and n.endswith("/internvl"))
    return below[0] if below else None


def image_sources(subscriptions, publications) -> list[dict]:
    """Image sources from a node's (topic, [types]) subscriptions and publications.

    Subscriptions are the cameras it describes; publications of image types are views it
    produces (an annotated image), listed first because they show what the node sees.
    """
    out = []
    for topics, kind in ((publications, "annotated"), (subscriptions, "camera")):
        for topic, types in sorted(topics):
            msg = next((IMAGE_TYPES[t] for t in types if t in IMAGE_TYPES), None)
            if msg is not None and all(s["id"] != topic for s in out):
                label = f"{topic} ({'published by the node' if kind == 'annotated' else kind})"
                out.append({"id": topic, "label": label, "kind": kind, "type": msg})
    return out


def level_name(level) -> str:
    n = level[0] if isinstance(level, bytes | bytearray) else int(level)
    return LEVELS.get(n, str(n))


# ---------------------------------------------------------------------------------------------


@dataclass
class _FrameSub:
    topic: str
    msg_class: type
    reliability: object
    sub: object = None
    latest: tuple[bytes, float, int] | None = None  # (cdr bytes, received monotonic, seq)
    cache: tuple[int, bytes, dict] | None = None  # (seq, jpeg, meta)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RosBackend:
    mode = "ros"

    def __init__(self, node: str = "/internvl", ros_args: list[str] | None = None,
                 preview_width: int = 640, idle_unsubscribe_s: float = IDLE_UNSUBSCRIBE_S):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        from internvl_ros_interfaces.msg import Caption

        self._rclpy = rclpy
        self._caption_type = Caption
        self.target = normalize_name(node)
        self.preview_width = preview_width
        self.idle_unsubscribe_s = idle_unsubscribe_s
        self._ctx = rclpy.Context()
        rclpy.init(args=ros_args, context=self._ctx)
        self._node = rclpy.create_node(f"internvl_console_{os.getpid()}", context=self._ctx)
        self._executor = SingleThreadedExecutor(context=self._ctx)
        self._executor.add_node(self._node)
        self._lock = threading.Lock()
        self.fqn = self.target  # until the node is found
        self.found = False
        self._sources: list[dict] = []
        self._subs: dict[str, _FrameSub] = {}
        self._wanted: dict[str, float] = {}
        self._history = History()
        self._caption_sub = None
        self._caption_topic = None
        self._action_clients: dict[str, object] = {}
        self._diags: dict[str, tuple[object, float]] = {}
        self._spin_errors = 0
        self._pending: dict[str, tuple[Ask, str]] = {}  # questions in flight: (ask, node)
        self._server_lost: dict[str, float] = {}  # node -> when its action server went away
        self._node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self._wake = self._node.create_guard_condition(self._tick)
        self._node.create_timer(1.0, self._tick)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="console-ros", daemon=True)
        self._thread.start()
        self._wake.trigger()

    # ------------------------------------------------------------------ executor thread

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        while not self._stop.is_set() and self._ctx.ok():
            try:
                self._executor.spin_once(timeout_sec=0.2)
            except ExternalShutdownException:
                break
            except Exception as e:  # e.g. a take of a just-destroyed subscription (Humble)
                self._spin_errors += 1
                if self._spin_errors <= 3:
                    sys.stderr.write(f"internvl-console: executor: {type(e).__name__}: {e}\n")

    def _tick(self) -> None:
        node = self._node
        names = {f"{ns.rstrip('/')}/{n}" for n, ns in node.get_node_names_and_namespaces()}
        fqn = resolve_node(self.target, names)
        sources: list[dict] = []
        if fqn is not None:
            ns, _, name = fqn.rpartition("/")
            ns = ns or "/"
            try:
                sources = image_sources(
                    node.get_subscriber_names_and_types_by_node(name, ns),
                    node.get_publisher_names_and_types_by_node(name, ns))
            except Exception:  # the node left between the two calls
                sources = []
        with self._lock:
            self.found = fqn is not None
            if fqn is not None:
                self.fqn = fqn
            self._sources = sources
        self._ensure_caption_sub()
        self._maintain_frame_subs({s["id"]: s for s in sources})
        self._fail_orphaned_asks()

    def _fail_orphaned_asks(self) -> None:
        """Questions whose node went away (crashed, stopped) fail after SERVER_LOST_S, rather
        than waiting for a result that cannot come."""
        with self._lock:
            pending = list(self._pending.items())
        now = time.monotonic()
        for key, (ask, fqn) in pending:
            if ask.finished:
                with self._lock:
                    self._pending.pop(key, None)
            elif self._action(fqn).server_is_ready():
                self._server_lost.pop(fqn, None)
            elif now - self._server_lost.setdefault(fqn, now) > SERVER_LOST_S:
                ask.finish(False, f"the describe action server of {fqn} went away before it "
                                  "answered (did the node stop?)")

    def _ensure_caption_sub(self) -> None:
        topic = f"{self.fqn}/caption_stamped"
        if topic == self._caption_topic:
            return
        if self._caption_sub is not None:
            self._node.destroy_subscription(self._caption_sub)
        self._caption_sub = self._node.create_subscription(
            self._caption_type, topic, self._on_caption, 10)
        self._caption_topic = topic

    def _maintain_frame_subs(self, sources: dict[str, dict]) -> None:
        from rclpy.qos import ReliabilityPolicy

        from internvl_ros.ros.qos import choose_reliability, image_qos

        now = time.monotonic()
        with self._lock:
            wanted = {t for t, at in self._wanted.items() if now - at < self.idle_unsubscribe_s}
            self._wanted = {t: at for t, at in self._wanted.items() if t in wanted}
        for topic in list(self._subs):
            if topic not in wanted or topic not in sources:
                self._drop_sub(topic)
        for topic in wanted & set(sources):
            infos = self._node.get_publishers_info_by_topic(topic)
            rel, _ = choose_reliability([i.qos_profile.reliability for i in infos])
            current = self._subs.get(topic)
            if current is not None and ReliabilityPolicy(current.reliability) == rel:
                continue
            if current is not None:
                self._drop_sub(topic)
            fs = _FrameSub(topic, self._msg_class(sources[topic]["type"]), rel)
            fs.sub = self._node.create_subscription(
                fs.msg_class, topic, lambda data, fs=fs: self._on_frame(fs, data),
                image_qos(rel, 1), raw=True)
            with self._lock:
                self._subs[topic] = fs

    def _drop_sub(self, topic: str) -> None:
        with self._lock:
            fs = self._subs.pop(topic, None)
        if fs is not None and fs.sub is not None:
            self._node.destroy_subscription(fs.sub)

    @staticmethod
    def _msg_class(name: str):
        from sensor_msgs.msg import CompressedImage, Image

        return CompressedImage if name == "CompressedImage" else Image

    def _on_frame(self, fs: _FrameSub, data: bytes) -> None:
        seq = fs.latest[2] + 1 if fs.latest else 1
        fs.latest = (data, time.monotonic(), seq)

    def _on_caption(self, m) -> None:
        stamp = m.header.stamp.sec + m.header.stamp.nanosec * 1e-9
        self._history.add(prompt=m.prompt, text=m.text, source=m.source,
                          finish_reason=m.finish_reason, stamp=stamp,
                          frame_id=m.header.frame_id, ttft=m.timings.ttft,
                          tokens_per_second=m.timings.tokens_per_second)

    def _on_diag(self, arr) -> None:
        now = time.monotonic()
        with self._lock:
            for st in arr.status:
                self._diags[st.name.split(":", 1)[-1].strip()] = (st, now)

    # ------------------------------------------------------------------ page data (HTTP threads)

    def info(self) -> dict:
        with self._lock:
            return {"title": self.fqn, "node": self.fqn, "found": self.found, "uploads": False}

    def sources(self) -> dict:
        with self._lock:
            sources = [dict(s) for s in self._sources]
        return {"sources": sources, "default": sources[0]["id"] if sources else None}

    def frame(self, source: str) -> tuple[bytes, dict] | None:
        with self._lock:
            known = any(s["id"] == source for s in self._sources)
            if known:
                self._wanted[source] = time.monotonic()
            fs = self._subs.get(source)
            fqn, found = self.fqn, self.found
        if not known:
            why = (f"{fqn} has no image topic named '{source}'" if found else
                   f"node {fqn} not found in the ROS graph yet (is internvl_node running, "
                   "on this ROS_DOMAIN_ID? see --node)")
            raise ConsoleError(HTTPStatus.NOT_FOUND, why)
        if fs is None:
            self._wake.trigger()  # subscribe now, not at the next tick
            return None
        latest = fs.latest
        if latest is None:
            return None
        data, received, seq = latest
        with fs.lock:
            if fs.cache is None or fs.cache[0] != seq:
                fs.cache = (seq, *self._convert(fs, data))
            _, jpeg, meta = fs.cache
        return jpeg, {**meta, "age_s": round(time.monotonic() - received, 3)}

    def _convert(self, fs: _FrameSub, data: bytes) -> tuple[bytes, dict]:
        from rclpy.serialization import deserialize_message

        from internvl_ros.ros.image_conv import frame_to_rgb

        try:
            msg = deserialize_message(data, fs.msg_class)
            rgb = frame_to_rgb(msg, MAX_FRAME_DIM)  # (h, w, 3)
        except ImageDecodeError as e:
            raise ConsoleError(HTTPStatus.UNPROCESSABLE_ENTITY,
                               f"the latest frame on {fs.topic} cannot be shown: {e}") from None
        h, w = rgb.shape[:2]
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        meta = {"label": fs.topic, "width": w, "height": h,
                "encoding": getattr(msg, "encoding", None) or getattr(msg, "format", ""),
                "stamp": stamp, "frame_id": msg.header.frame_id}
        return preview_jpeg(rgb, self.preview_width), meta

    def history(self, after: int) -> list[dict]:
        return self._history.after(after)

    def status(self) -> dict:
        with self._lock:
            fqn, found, got = self.fqn, self.found, self._diags.get(self.fqn)
            n_sources = len(self._sources)
        console = [["console node", self._node.get_fully_qualified_name()],
                   ["node found", "yes" if found else "no"],
                   ["image sources", str(n_sources)],
                   ["describe action", "ready" if self._action(fqn).server_is_ready()
                    else "not available"]]
        if got is None:
            return {"level": "STALE" if found else "ERROR", "name": fqn,
                    "message": (f"no diagnostics from {fqn} yet" if found else
                                f"node {fqn} not found (is internvl_node running? --node)"),
                    "values": console, "age_s": None}
        st, t = got
        age = time.monotonic() - t
        level, message = level_name(st.level), st.message
        if age > DIAG_STALE_S:
            level, message = "STALE", f"no diagnostics for {age:.0f} s (last: {st.message})"
        return {"level": level, "message": message, "name": st.name, "age_s": round(age, 2),
                "values": [[kv.key, kv.value] for kv in st.values] + console}

    def upload(self, data: bytes, content_type: str) -> dict:
        raise ConsoleError(HTTPStatus.NOT_FOUND,
                           "uploads are for offline mode (--model-dir); here the node "
                           "describes its camera")

    # ------------------------------------------------------------------ asking

    def _action(self, fqn: str):
        from rclpy.action import ActionClient

        from internvl_ros_interfaces.action import Describe

        with self._lock:
            client = self._action_clients.get(fqn)
            if client is None:
                client = ActionClient(self._node, Describe, f"{fqn}/describe")
                self._action_clients[fqn] = client
        return client

    def start_ask(self, prompt: str, source: str | None, max_new_tokens: int = 0) -> Ask:
        from internvl_ros_interfaces.action import Describe

        ask = Ask(prompt)
        fqn = self.fqn
        client = self._action(fqn)
        if not client.wait_for_server(timeout_sec=3.0):
            ask.finish(False, f"no describe action server at {fqn}/describe: is internvl_node "
                              "running, on this ROS_DOMAIN_ID? (see --node)")
            return ask

        def on_feedback(fb):
            ask.delta(fb.feedback.text, fb.feedback.generated_tokens)

        def on_result(fut):
            try:
                r = fut.result().result
            except Exception as e:
                ask.finish(False, f"the action failed: {type(e).__name__}: {e}")
                return
            t = r.timings
            ask.finish(r.success, r.message, text=r.caption, finish_reason=r.finish_reason,
                       ttft=t.ttft, tokens_per_second=t.tokens_per_second,
                       tokens=t.generated_tokens)

        def on_goal(fut):
            try:
                handle = fut.result()
            except Exception as e:
                ask.finish(False, f"sending the goal failed: {type(e).__name__}: {e}")
                return
            if not handle.accepted:
                ask.finish(False, f"{fqn} rejected the goal")
                return
            handle.get_result_async().add_done_callback(on_result)
            ask.set_canceller(handle.cancel_goal_async)

        goal = Describe.Goal(prompt=prompt, max_new_tokens=max_new_tokens)
        with self._lock:
            self._pending[ask.id] = (ask, fqn)
        client.send_goal_async(goal,
                               feedback_callback=on_feedback).add_done_callback(on_goal)
        return ask

    # ------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        try:
            self._executor.shutdown(timeout_sec=1.0)
            self._node.destroy_node()
        finally:
            self._rclpy.try_shutdown(context=self._ctx)
