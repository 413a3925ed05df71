"""Image intake: the subscription (auto QoS) and the ``FrameStore`` that owns the latest frame.

A frame is parsed once, on arrival: ``cdr.parse_image``/``parse_compressed`` read its header
fields in O(1) from the serialized bytes (``data`` stays a zero-copy view into them), and
``image_conv.check_frame`` validates them. A request then decodes that same view to RGB on the
worker thread (``Frame.decode``); nothing deserializes the message a second time. Only an RMW
whose bytes are not plain CDR falls back to ``deserialize_message``, once, on arrival.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from rclpy.qos import ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from internvl_ros.ros import cdr, compat, image_conv, qos
from internvl_ros.ros.diagnostics import Stats, Throttle
from internvl_ros.ros.worker import RequestError

WARN_PERIOD_S = 5.0  # bad-frame warnings: at most one per kind per period


def deserialize(raw: bytes, msg_type):
    """rclpy's ``deserialize_message``, for frames that are not plain CDR: the message, or
    ``BadFrameError('corrupt')``.

    Bytes holding nothing past the 4-byte encapsulation header never reach it: Fast CDR (in
    Kilted and Jazzy) crashes the whole process on such a payload when its option bytes ask for
    padding (``00 00 00 03``; found by test_fuzz_frames), and no Image or CompressedImage is that
    short in any encoding."""
    if len(raw) <= cdr.ENCAPSULATION_BYTES:
        raise image_conv.BadFrameError(
            "corrupt", f"{len(raw)} bytes: no message after the encapsulation header")
    try:
        return deserialize_message(raw, msg_type)
    except Exception as e:
        raise image_conv.BadFrameError("corrupt", f"cannot deserialize the message: {e}") from e


def copy_header(h) -> Header:
    """A std_msgs/Header from a Header or a cdr.HeaderView."""
    out = Header(frame_id=h.frame_id)
    out.stamp.sec, out.stamp.nanosec = h.stamp.sec, h.stamp.nanosec
    return out


class Frame:
    """A received frame: its serialized bytes, parsed once (a view, or the deserialized message
    when the bytes were not plain CDR). ``seq`` numbers frames in arrival order; ``error`` is set
    (and the data dropped) when it fails to decode, so it is never tried again."""

    def __init__(self, view, info: image_conv.FrameInfo, arrival: float, seq: int, where: str,
                 on_bad: Callable[[image_conv.BadFrameError, str], None], camera: str = ""):
        self._view = view  # holds the bytes alive through its memoryview
        self.camera = camera  # the name from the cameras parameter ("" for the single camera)
        self.info = info
        self.arrival = arrival
        self.seq = seq
        self.where = where
        self.error: str | None = None
        self._on_bad = on_bad

    @property
    def key(self) -> tuple:
        """The frame's identity, (topic, header stamp, arrival): the pipeline's frame cache
        lets a later request on this frame skip the ViT."""
        view = self._view
        stamp = None if view is None else (view.header.stamp.sec, view.header.stamp.nanosec)
        return (self.where, stamp, self.arrival)

    @property
    def kept_serialized(self) -> bool:
        return isinstance(self._view, (cdr.ImageView, cdr.CompressedImageView))

    def decode(self, max_dim: int) -> tuple:
        """(rgb (h, w, 3) uint8, Header); raises RequestError (and marks the frame bad)."""
        view = self._view
        if view is None:
            raise RequestError(f"the frame from {self.where} could not be decoded and was "
                               f"dropped ({self.error})")
        try:
            rgb = image_conv.frame_to_rgb(view, max_dim)
        except image_conv.BadFrameError as e:
            self.error, self._view = f"{e.kind}: {e}", None
            self._on_bad(e, self.where)
            raise RequestError(
                f"could not decode the image from {self.where} [{e.kind}]: {e}") from e
        return rgb, copy_header(view.header)


class RequestImage:
    """The image a request carries (validated when the request arrived)."""

    camera = ""  # no camera: Caption.camera stays empty

    def __init__(self, msg):
        self.msg = msg

    def decode(self, max_dim: int) -> tuple:
        try:
            rgb = image_conv.frame_to_rgb(self.msg, max_dim)
        except image_conv.BadFrameError as e:
            raise RequestError(
                f"could not decode the image from the request [{e.kind}]: {e}") from e
        return rgb, copy_header(self.msg.header)


class FrameStore:
    """One camera: the latest frame, its lock and staleness, and the accounting of bad frames
    (the node's totals in ``stats``, this camera's in ``received``/``dropped``)."""

    def __init__(self, transport: str, topic: str, stats: Stats, logger, camera: str = ""):
        self.camera = camera
        self.received = self.dropped = 0
        self.msg_type = CompressedImage if transport == "compressed" else Image
        self.topic = topic
        self._parse = cdr.parse_compressed if transport == "compressed" else cdr.parse_image
        self._stats = stats
        self._log = logger
        self._warn = Throttle(WARN_PERIOD_S)
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._seq = itertools.count(1)
        self.last_arrival: float | None = None

    def latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    def put(self, raw: bytes, max_dim: int) -> Frame | None:
        """Parse and validate a serialized frame; keep it as the latest (None if dropped)."""
        self._stats.bump("frames_received")
        self.received += 1  # (one intake callback at a time writes it)
        now = time.monotonic()
        self.last_arrival = now
        try:
            view = self._parse(raw)  # header fields in O(1); data is a view, not a copy
        except cdr.CdrError as e:  # an RMW that serializes differently: deserialize (slower)
            if self._warn("cdr") is not None:
                self._log.info(f"frames on {self.topic} are not plain CDR ({e}); deserializing "
                               f"each one instead")
            try:
                view = deserialize(raw, self.msg_type)
            except image_conv.BadFrameError as e2:
                self.drop(e2, self.topic)
                return None
        try:
            info = image_conv.check_frame(view, max_dim)
        except image_conv.BadFrameError as e:
            self.drop(e, self.topic)
            return None
        frame = Frame(view, info, now, next(self._seq), self.topic, self.drop, self.camera)
        with self._lock:
            self._latest = frame
        return frame

    def choose(self, max_age: float) -> Frame:
        """The latest frame for a request; RequestError when there is none, or it is bad or
        older than ``max_age`` seconds."""
        frame = self.latest()
        if frame is None:
            raise RequestError(
                f"no frame received yet on {self.topic} ({self.msg_type.__name__}): is the "
                f"camera publishing there? Remap '{self.camera + '/' if self.camera else ''}"
                f"image' to its topic, or send an image in the request")
        if frame.error is not None:
            raise RequestError(
                f"the latest frame on {self.topic} could not be decoded and was dropped "
                f"({frame.error}); the next valid frame will be used: is the camera sending "
                f"valid images?")
        age = time.monotonic() - frame.arrival
        if age > max_age:
            raise RequestError(
                f"the latest frame on {self.topic} is stale: it arrived {age:.1f} s ago "
                f"(max_frame_age {max_age:g} s); is the camera still publishing? A request may "
                f"pass max_frame_age < 0 to accept any age")
        return frame

    def drop(self, e: image_conv.BadFrameError, where: str) -> None:
        """Count a bad frame and warn (at most once per kind per WARN_PERIOD_S)."""
        self._stats.drop(e.kind, f"bad frame on {where}: {e}")
        with self._lock:
            self.dropped += 1
        held = self._warn(e.kind)
        if held is not None:
            more = f" ({held} more since the last warning)" if held else ""
            self._log.warning(f"dropped a bad frame on {where} [{e.kind}]: {e}{more}")

    def describe_latest(self) -> tuple[str, float]:
        """('WxH encoding', age in s) of the latest frame for diagnostics; ('none', -1)."""
        frame = self.latest()
        if frame is None:
            return "none", -1.0
        text = f"{frame.info.width}x{frame.info.height} {frame.info.encoding}"
        if frame.error:
            text += " (corrupt, dropped)"
        return text, time.monotonic() - frame.arrival


def image_topic(node, transport: str, base: str = "image") -> str:
    """Resolved topic of ``base`` ('image', or '<camera>/image'); '<base>/compressed' follows a
    remap of ``base`` like image_transport."""
    if transport == "raw":
        return compat.resolve_topic(node, base)
    remapped = compat.resolve_topic(node, f"{base}/compressed")
    if remapped != compat.resolve_topic(node, f"{base}/compressed", only_expand=True):
        return remapped  # <base>/compressed itself was remapped
    return compat.resolve_topic(node, base).rstrip("/") + "/compressed"


class Cameras:
    """The node's cameras, in the order of the ``cameras`` parameter: one ``FrameStore`` and
    one ``ImageIntake`` each. No names: the single camera "" on ``image``."""

    def __init__(self, node, names: tuple[str, ...], transport: str, stats: Stats, logger,
                 callback_group, param: Callable[[str], object]):
        self.named = bool(names)
        self.stores: dict[str, FrameStore] = {}
        self.intakes: dict[str, ImageIntake] = {}
        for name in names or ("",):
            topic = image_topic(node, transport, f"{name}/image" if name else "image")
            store = FrameStore(transport, topic, stats, logger, camera=name)
            self.stores[name] = store
            self.intakes[name] = ImageIntake(node, store, callback_group, param)

    @property
    def names(self) -> list[str]:
        return list(self.stores)

    def store(self, camera: str) -> FrameStore:
        """The camera called ``camera`` ("" is the first); RequestError naming the known ones."""
        if not camera:
            return next(iter(self.stores.values()))
        store = self.stores.get(camera) if self.named else None
        if store is None:
            known = (f"this node's cameras are: {', '.join(self.stores)}" if self.named else
                     "this node has one camera (parameter cameras is empty): leave camera "
                     "empty")
            raise RequestError(f"unknown camera '{camera}'; {known}")
        return store

    def choose(self, camera: str, max_age: float) -> Frame:
        """The frame a request about ``camera`` describes: its latest, if fresh (RequestError
        says why not). The one place a request's camera frame is picked."""
        return self.store(camera).choose(max_age)

    def start(self) -> None:
        for intake in self.intakes.values():
            intake.start()

    def stop(self) -> None:
        for intake in self.intakes.values():
            intake.stop()

    def warnings(self) -> list[str]:
        return [w for intake in self.intakes.values() for w in intake.warnings()]


class ImageIntake:
    """The image subscription: started on activate, stopped on deactivate.

    With ``qos_reliability: auto`` it matches the publishers' reliability and re-checks every
    second; it warns when publishers exist but no frame arrives.
    """

    def __init__(self, node, store: FrameStore, callback_group, param: Callable[[str], object]):
        self._node = node
        self.store = store
        self._group = callback_group
        self._p = param
        self._sub = None
        self.reliability: ReliabilityPolicy | None = None
        self._pub_key: tuple | None = None
        self._starve_pubs: tuple = ()
        self._pubs_seen_since = 0.0
        self.no_frame_warned = False
        self.mixed_warning: str | None = None
        self._timer = None

    @property
    def topic(self) -> str:
        return self.store.topic

    def start(self) -> None:
        self._pub_key, self._starve_pubs, self.no_frame_warned = None, (), False
        self.check_publishers()  # subscribes
        if self._timer is None:
            self._timer = self._node.create_timer(1.0, self.check_publishers,
                                                  callback_group=self._group)
        else:
            self._timer.reset()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._sub is not None:
            self._node.destroy_subscription(self._sub)
            self._sub, self.reliability = None, None

    def _subscribe(self, reliability: ReliabilityPolicy, why: str) -> None:
        if self._sub is not None:
            self._node.destroy_subscription(self._sub)
        profile = qos.image_qos(reliability, int(self._p("qos_depth")))
        # raw: the callback gets the serialized bytes (parsed in place, see the module doc)
        self._sub = self._node.create_subscription(
            self.store.msg_type, self.topic, self._on_image, profile,
            callback_group=self._group, raw=True,
        )
        self.reliability = reliability
        self._node.get_logger().info(
            f"subscribed to {self.topic} ({self.store.msg_type.__name__}, "
            f"{qos.reliability_name(reliability)}, depth {profile.depth}): {why}")

    def _on_image(self, raw: bytes) -> None:
        self.store.put(raw, int(self._p("max_image_dim")))

    def check_publishers(self) -> None:
        """Match the publishers' reliability (auto), and warn when they send us nothing."""
        try:
            infos = self._node.get_publishers_info_by_topic(self.topic)
        except Exception:  # the context is going down
            return
        mode = self._p("qos_reliability")
        if mode != "auto":
            if self._sub is None:
                self._subscribe(ReliabilityPolicy[mode.upper()], f"qos_reliability is {mode}")
        else:
            key = tuple(sorted(int(i.qos_profile.reliability) for i in infos))
            if key != self._pub_key or self._sub is None:
                self._pub_key = key
                want, why = qos.choose_reliability(key)
                if want != self.reliability:
                    self._subscribe(want, f"auto: {why}")
                self.mixed_warning = qos.mixed_reliability_warning(infos)
                if self.mixed_warning:
                    self._node.get_logger().warning(f"{self.topic}: {self.mixed_warning}")
        self._warn_if_starved(infos)

    def _warn_if_starved(self, infos) -> None:
        """Publishers present for a while, but nothing arrives: name their QoS, point to docs.

        Warns once per episode; a frame arriving, or a change of publishers, starts a new one.
        """
        limit = float(self._p("no_frame_warn_after"))
        now = time.monotonic()
        pubs = tuple(sorted((i.node_namespace, i.node_name, int(i.qos_profile.reliability))
                            for i in infos))
        if pubs != self._starve_pubs:
            self._starve_pubs, self._pubs_seen_since, self.no_frame_warned = pubs, now, False
        if not pubs:
            return
        last = self.store.last_arrival
        if last is not None and now - last < max(limit, 1.0):
            self.no_frame_warned = False
            return
        since = max(self._pubs_seen_since, last or 0.0)
        if limit > 0 and now - since > limit and not self.no_frame_warned:
            self.no_frame_warned = True
            self._node.get_logger().warning(
                f"{len(infos)} publisher(s) on {self.topic} but no frame received for "
                f"{now - since:.1f} s. Publishers: {qos.describe_publishers(infos)}; this "
                f"subscription: {qos.reliability_name(self.reliability)}. Large frames over "
                f"best-effort Fast DDS are lost unless both sides use "
                f"config/fastdds_large_data.xml, or use reliable QoS: see {qos.DOC_HINT}.")

    def warnings(self) -> list[str]:
        out = []
        if self.no_frame_warned:
            out.append(f"publishers on {self.topic} but no frames ({qos.DOC_HINT})")
        if self.mixed_warning:
            out.append(f"reliable and best-effort publishers on {self.topic} ({qos.DOC_HINT})")
        return out
