"""Read the fields of a serialized sensor_msgs/Image or CompressedImage without deserializing it.

The node subscribes with ``raw=True``: rclpy hands over the CDR bytes, and a 1080p rgb8 frame is
never turned into Python objects unless a request needs it (then ``deserialize_message`` does it
once). On arrival this module reads the header fields (dimensions, encoding, step, data length)
in O(1) so ``image_conv.check_frame`` can validate the frame; ``data`` is a zero-copy memoryview.

Layout (XCDR1, what every ROS 2 RMW puts on the wire for these types): a 4-byte encapsulation
header (``00 00`` big endian or ``00 01`` little endian, then 2 option bytes), then the fields in
order, each aligned to its size relative to the end of the encapsulation header; a string is a
uint32 length (NUL included) and the bytes; a sequence<uint8> a uint32 count and the bytes.

``parse_image``/``parse_compressed`` raise ``CdrError`` when the bytes do not have that layout;
the node then falls back to ``deserialize_message`` (slower, authoritative), so an RMW that
serializes differently still works.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ENCAPSULATIONS = {b"\x00\x00": ">", b"\x00\x01": "<"}  # CDR_BE, CDR_LE
ENCAPSULATION_BYTES = 4  # representation id (2 bytes) and options (2 bytes)
MAX_TAIL_PADDING = 3  # some RMWs round the payload up to a multiple of 4


class CdrError(ValueError):
    """The bytes are not a plain-CDR message of the expected type."""


@dataclass(frozen=True)
class Stamp:
    sec: int
    nanosec: int


@dataclass(frozen=True)
class HeaderView:
    """std_msgs/Header fields, as read from the bytes."""

    stamp: Stamp
    frame_id: str


@dataclass(frozen=True)
class ImageView:
    """The fields of a serialized sensor_msgs/Image; ``data`` views the serialized bytes."""

    header: HeaderView
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: memoryview


@dataclass(frozen=True)
class CompressedImageView:
    """The fields of a serialized sensor_msgs/CompressedImage; ``data`` views the bytes."""

    header: HeaderView
    format: str
    data: memoryview


class _Reader:
    """Sequential reader over a CDR body (offsets are relative to the body's start)."""

    def __init__(self, raw: bytes):
        if len(raw) < ENCAPSULATION_BYTES:
            raise CdrError(f"{len(raw)} bytes: too short for a CDR encapsulation header")
        order = ENCAPSULATIONS.get(bytes(raw[:2]))
        if order is None:
            raise CdrError(f"encapsulation {bytes(raw[:2]).hex()} is not plain CDR (0000/0001)")
        self.raw = raw
        self.view = memoryview(raw)
        self.order = order
        self.pos = ENCAPSULATION_BYTES  # absolute offset; alignment is relative to it

    def _align(self, n: int) -> None:
        self.pos += (-(self.pos - 4)) % n

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.raw):
            raise CdrError(f"truncated: needs {self.pos + n} bytes, has {len(self.raw)}")

    def u32(self) -> int:
        self._align(4)
        self._need(4)
        (v,) = struct.unpack_from(self.order + "I", self.raw, self.pos)
        self.pos += 4
        return v

    def i32(self) -> int:
        self._align(4)
        self._need(4)
        (v,) = struct.unpack_from(self.order + "i", self.raw, self.pos)
        self.pos += 4
        return v

    def u8(self) -> int:
        self._need(1)
        v = self.raw[self.pos]
        self.pos += 1
        return v

    def string(self, limit: int = 4096) -> str:
        n = self.u32()  # includes the terminating NUL
        if n == 0:  # some writers send an empty string without its NUL
            return ""
        if n > limit:
            raise CdrError(f"string length {n} at offset {self.pos - 4} is implausible")
        self._need(n)
        s = bytes(self.view[self.pos : self.pos + n - 1])
        if self.raw[self.pos + n - 1] != 0:
            raise CdrError(f"string at offset {self.pos} is not NUL-terminated")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def bytes_seq(self) -> memoryview:
        n = self.u32()
        self._need(n)
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def header(self) -> HeaderView:
        sec = self.i32()
        nanosec = self.u32()
        return HeaderView(Stamp(sec, nanosec), self.string())

    def end(self) -> None:
        """The message must end here (up to a few bytes of padding)."""
        extra = len(self.raw) - self.pos
        if not 0 <= extra <= MAX_TAIL_PADDING:
            raise CdrError(f"{extra} bytes after the last field")


def parse_image(raw: bytes) -> ImageView:
    """The fields of a serialized sensor_msgs/Image. Raises CdrError."""
    r = _Reader(raw)
    header = r.header()
    height, width = r.u32(), r.u32()
    encoding = r.string(limit=256)
    is_bigendian = r.u8()
    step = r.u32()
    data = r.bytes_seq()
    r.end()
    return ImageView(header, height, width, encoding, is_bigendian, step, data)


def parse_compressed(raw: bytes) -> CompressedImageView:
    """The fields of a serialized sensor_msgs/CompressedImage. Raises CdrError."""
    r = _Reader(raw)
    header = r.header()
    fmt = r.string(limit=1024)
    data = r.bytes_seq()
    r.end()
    return CompressedImageView(header, fmt, data)
