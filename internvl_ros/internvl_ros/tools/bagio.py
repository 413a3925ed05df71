"""Reading and writing camera bags with `rosbags` (no rclpy).

Reads rosbag2 (sqlite3 and mcap) and ROS 1 bags; writes rosbag2. Image messages come back as
rosbags dataclasses; `image_fields` flattens them into plain fields that both rclpy messages and
the ROS 2 typestore can be built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_ros.core.errors import InternVLError

IMAGE_TYPES = {
    "sensor_msgs/msg/Image": "raw",
    "sensor_msgs/msg/CompressedImage": "compressed",
    # ROS 1 bags name the types without /msg/
    "sensor_msgs/Image": "raw",
    "sensor_msgs/CompressedImage": "compressed",
}


class BagError(InternVLError):
    """A bag is missing, unreadable, or lacks the requested topic."""


@dataclass(frozen=True)
class BagFrame:
    """One image message of a bag, flattened."""

    index: int  # position among the topic's messages (after --start)
    bag_time_ns: int  # receive time recorded in the bag
    kind: str  # "raw" | "compressed"
    stamp_sec: int
    stamp_nanosec: int
    frame_id: str
    # raw
    height: int = 0
    width: int = 0
    encoding: str = ""
    is_bigendian: int = 0
    step: int = 0
    # compressed
    format: str = ""
    data: bytes = b""

    @property
    def stamp_ns(self) -> int:
        return self.stamp_sec * 1_000_000_000 + self.stamp_nanosec


def _open_reader(path: Path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    if not path.exists():
        raise BagError(f"bag not found: {path}. Give the path of a rosbag2 folder (or its "
                       "metadata.yaml parent) or of a ROS 1 .bag file.")
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as exc:  # rosbags raises several unrelated types
        raise BagError(f"cannot read bag {path}: {exc}. Is it a rosbag2 (sqlite3/mcap) folder "
                       "or a ROS 1 .bag file?") from exc
    return reader


def list_topics(path: Path) -> dict[str, str]:
    """Topic name -> message type of every topic in the bag."""
    reader = _open_reader(Path(path))
    try:
        return {name: info.msgtype or "?" for name, info in reader.topics.items()}
    finally:
        reader.close()


def _describe_topics(topics: dict[str, str]) -> str:
    return "\n".join(f"  {name}  [{typ}]" for name, typ in sorted(topics.items())) or "  (none)"


class ImageBag:
    """The image frames of one topic of a bag, in recorded order."""

    def __init__(self, path: str | Path, topic: str | None = None) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        topics = {name: info.msgtype or "?" for name, info in self._reader.topics.items()}
        if topic is None:
            candidates = [t for t, typ in topics.items() if typ in IMAGE_TYPES]
            if len(candidates) != 1:
                self.close()
                why = "has no image topic" if not candidates else "has several image topics"
                raise BagError(f"bag {self.path} {why}; choose one with --topic. Its topics:\n"
                               + _describe_topics(topics))
            topic = candidates[0]
        if topic not in topics:
            self.close()
            raise BagError(f"topic {topic} is not in bag {self.path}. Its topics:\n"
                           + _describe_topics(topics))
        if topics[topic] not in IMAGE_TYPES:
            self.close()
            raise BagError(f"topic {topic} in bag {self.path} has type {topics[topic]}, not "
                           "sensor_msgs/msg/Image or CompressedImage. Its topics:\n"
                           + _describe_topics(topics))
        self.topic = topic
        self.msgtype = topics[topic]
        self.kind = IMAGE_TYPES[self.msgtype]
        self._connections = [c for c in self._reader.connections if c.topic == topic]
        self.message_count = sum(c.msgcount for c in self._connections)
        self.start_ns = self._reader.start_time
        self.end_ns = self._reader.end_time

    def frames(self, start: float = 0.0, duration: float | None = None) -> Iterator[BagFrame]:
        """Frames from `start` seconds after the bag's start, for `duration` seconds."""
        t0 = self.start_ns + int(start * 1e9)
        t1 = None if duration is None else t0 + int(duration * 1e9)
        for index, (conn, t_ns, raw) in enumerate(
            self._reader.messages(connections=self._connections, start=t0, stop=t1)
        ):
            try:
                msg = self._reader.deserialize(raw, conn.msgtype)
            except Exception as exc:
                raise BagError(f"message {index} of {self.topic} in {self.path} does not "
                               f"deserialize as {conn.msgtype}: {exc}") from exc
            yield image_fields(msg, index, t_ns, self.kind)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> ImageBag:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_fields(msg, index: int, bag_time_ns: int, kind: str) -> BagFrame:
    """Flatten a rosbags Image/CompressedImage (ROS 1 or 2) into a `BagFrame`."""
    header = msg.header
    stamp = header.stamp
    sec = int(getattr(stamp, "sec", getattr(stamp, "secs", 0)))
    nsec = int(getattr(stamp, "nanosec", getattr(stamp, "nsecs", 0)))
    data = np.asarray(msg.data, dtype=np.uint8).tobytes()
    if kind == "compressed":
        return BagFrame(index, bag_time_ns, kind, sec, nsec, header.frame_id,
                        format=msg.format, data=data)
    return BagFrame(index, bag_time_ns, kind, sec, nsec, header.frame_id,
                    height=int(msg.height), width=int(msg.width), encoding=msg.encoding,
                    is_bigendian=int(msg.is_bigendian), step=int(msg.step), data=data)


def ros2_typestore(extra_msg_files: dict[str, Path] | None = None):
    """The ROS 2 Humble typestore, plus message definitions read from .msg files."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    if extra_msg_files:
        types = {}
        for name, path in extra_msg_files.items():
            types.update(get_types_from_msg(Path(path).read_text(encoding="utf-8"), name))
        store.register(types)
    return store


def frame_to_rosbags(store, frame: BagFrame):
    """A ROS 2 rosbags message (Image or CompressedImage) built from a frame."""
    header = store.types["std_msgs/msg/Header"](
        stamp=store.types["builtin_interfaces/msg/Time"](sec=frame.stamp_sec,
                                                         nanosec=frame.stamp_nanosec),
        frame_id=frame.frame_id,
    )
    data = np.frombuffer(frame.data, dtype=np.uint8)
    if frame.kind == "compressed":
        return store.types["sensor_msgs/msg/CompressedImage"](
            header=header, format=frame.format, data=data)
    return store.types["sensor_msgs/msg/Image"](
        header=header, height=frame.height, width=frame.width, encoding=frame.encoding,
        is_bigendian=frame.is_bigendian, step=frame.step, data=data)


def msgtype_of(kind: str) -> str:
    return "sensor_msgs/msg/CompressedImage" if kind == "compressed" else "sensor_msgs/msg/Image"
