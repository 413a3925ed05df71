"""Turn the fields of sensor_msgs/Image and sensor_msgs/CompressedImage into RGB uint8 arrays.

numpy and OpenCV; rclpy is never imported here. Messages are duck-typed: anything with the fields of
``sensor_msgs/Image`` (``height``, ``width``, ``encoding``, ``is_bigendian``, ``step``, ``data``)
or ``sensor_msgs/CompressedImage`` (``format``, ``data``) works, so tests can pass plain objects.

Two steps, so that a 30 Hz camera stays cheap:

- ``check_frame(msg, max_dim)`` validates on arrival in O(1) (header fields, data size, the
  magic bytes, dimensions and end marker of compressed data) and raises ``BadFrameError``.
- ``frame_to_rgb(msg, max_dim)`` converts at request time, always the same way, so pixels do
  not depend on which packages are installed: our own step strips row padding and fixes byte
  order, then OpenCV converts colour order, YUV 4:2:2 and Bayer (``cv2.cvtColor``) and decodes
  JPEG/PNG (``cv2.imdecode``, EXIF orientation ignored).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from internvl_ros.core.errors import ImageDecodeError

# encoding -> (channels, bytes per channel)
RAW_ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
    "rgb16": (3, 2),
    "bgr16": (3, 2),
    "yuv422": (2, 1),  # UYVY: U0 Y0 V0 Y1
    "uyvy": (2, 1),
    "yuyv": (2, 1),  # YUYV: Y0 U0 Y1 V0
    "yuv422_yuy2": (2, 1),
    "bayer_rggb8": (1, 1),
    "bayer_bggr8": (1, 1),
    "bayer_gbrg8": (1, 1),
    "bayer_grbg8": (1, 1),
}
YUV422_ENCODINGS = ("yuv422", "uyvy", "yuyv", "yuv422_yuy2")
COMPRESSED_FORMATS = ("jpeg", "png")

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadFrameError(ImageDecodeError):
    """A frame that cannot be described. ``kind`` is one of ``KINDS`` (used for counting)."""

    KINDS = ("size", "encoding", "empty", "too_large", "corrupt")

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FrameInfo:
    """What ``check_frame`` learned about a frame without decoding it."""

    width: int
    height: int
    encoding: str  # raw encoding, or "jpeg" / "png" for compressed frames
    compressed: bool


def is_compressed(msg) -> bool:
    """True for a CompressedImage-like message (it has ``format`` and no ``encoding``)."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def _as_bytes_view(data) -> np.ndarray:
    """A zero-copy uint8 view of a message's ``data`` (array.array, bytes, memoryview, list)."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a list of ints
        return np.asarray(data, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# validation (cheap, on arrival)


def check_frame(msg, max_dim: int) -> FrameInfo:
    """Validate a raw or compressed frame without converting it; raise ``BadFrameError``."""
    if is_compressed(msg):
        return check_compressed(msg, max_dim)
    return check_image(msg, max_dim)


def check_image(msg, max_dim: int) -> FrameInfo:
    """Validate the header of a sensor_msgs/Image against its data."""
    enc = str(msg.encoding).strip().lower()
    w, h, step = int(msg.width), int(msg.height), int(msg.step)
    if enc not in RAW_ENCODINGS:
        raise BadFrameError(
            "encoding",
            f"unsupported encoding '{msg.encoding}' ({w}x{h}); supported: "
            f"{', '.join(RAW_ENCODINGS)}; publish one of them or use image/compressed",
        )
    if w <= 0 or h <= 0:
        raise BadFrameError("empty", f"image has zero size: width={w} height={h}")
    if w > max_dim or h > max_dim:
        raise BadFrameError(
            "too_large",
            f"image {w}x{h} exceeds max_image_dim={max_dim}; resize it upstream or raise "
            "the max_image_dim parameter",
        )
    channels, depth = RAW_ENCODINGS[enc]
    row = w * channels * depth
    if enc in YUV422_ENCODINGS:
        row = w * 2
        if w % 2:
            raise BadFrameError("size", f"{enc} needs an even width, got width={w}")
    if step < row:
        raise BadFrameError(
            "size", f"step={step} is smaller than width*bytes_per_pixel={row} ({enc}, width={w})"
        )
    n = len(msg.data)
    if n != h * step:
        raise BadFrameError(
            "size",
            f"data has {n} bytes but height*step = {h}*{step} = {h * step} ({w}x{h} {enc})",
        )
    return FrameInfo(w, h, enc, False)


def compressed_kind(msg) -> str:
    """'jpeg' or 'png' from the magic bytes (the ``format`` string is only a hint)."""
    head = bytes(_as_bytes_view(msg.data)[:8])
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    fmt = str(getattr(msg, "format", ""))
    raise BadFrameError(
        "corrupt" if any(k in fmt.lower() for k in COMPRESSED_FORMATS) else "encoding",
        f"compressed data (format '{fmt}', {len(msg.data)} bytes) is neither JPEG nor PNG; "
        "supported formats: jpeg, png",
    )


def _png_size(buf: np.ndarray) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; checks the IEND trailer."""
    if len(buf) < 33 or bytes(buf[12:16]) != b"IHDR":
        raise BadFrameError("corrupt", f"PNG data ({len(buf)} bytes) has no IHDR chunk")
    w, h = struct.unpack(">II", bytes(buf[16:24]))
    if bytes(buf[-12:]) != b"\x00\x00\x00\x00IEND\xaeB`\x82":
        raise BadFrameError("corrupt", f"PNG data ({len(buf)} bytes) is truncated: no IEND chunk")
    return w, h


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(buf: np.ndarray) -> tuple[int, int]:
    """(width, height) from the first SOF segment; checks the EOI marker at the end."""
    tail = bytes(buf[-64:]).rstrip(b"\x00")  # some encoders pad after EOI
    if not tail.endswith(b"\xff\xd9"):
        raise BadFrameError("corrupt", f"JPEG data ({len(buf)} bytes) is truncated: no EOI marker")
    data = buf[: min(len(buf), 1 << 20)]  # headers sit at the front (a view: no copy)
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = int(data[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", bytes(data[i + 2 : i + 4]))
        if seg_len < 2:
            break
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                break
            h, w = struct.unpack(">HH", bytes(data[i + 5 : i + 9]))
            return w, h
        if marker == 0xDA:  # start of scan before any SOF
            break
        i += 2 + seg_len
    raise BadFrameError("corrupt", f"JPEG data ({len(buf)} bytes) has no valid frame header")


def check_compressed(msg, max_dim: int) -> FrameInfo:
    """Validate a CompressedImage: magic bytes, header dimensions, end marker."""
    buf = _as_bytes_view(msg.data)
    if len(buf) == 0:
        raise BadFrameError("empty", f"compressed image (format '{msg.format}') has no data")
    kind = compressed_kind(msg)
    w, h = _png_size(buf) if kind == "png" else _jpeg_size(buf)
    if w <= 0 or h <= 0:
        raise BadFrameError("empty", f"{kind} header says zero size: width={w} height={h}")
    if w > max_dim or h > max_dim:
        raise BadFrameError(
            "too_large",
            f"{kind} image {w}x{h} exceeds max_image_dim={max_dim}; resize it upstream or "
            "raise the max_image_dim parameter",
        )
    return FrameInfo(w, h, kind, True)


# ---------------------------------------------------------------------------------------------
# conversion (at request time)


def pack_rows(msg) -> np.ndarray:
    """The pixel bytes of a validated Image without row padding, in native byte order.

    Returns (h, w, channels) uint8 or uint16; YUV 4:2:2 comes back as (h, w, 2) uint8.
    """
    enc = str(msg.encoding).strip().lower()
    channels, depth = RAW_ENCODINGS[enc]
    w, h, step = int(msg.width), int(msg.height), int(msg.step)
    buf = _as_bytes_view(msg.data)
    rows = buf[: h * step].reshape(h, step)[:, : w * channels * depth]  # (h, w*c*depth)
    if depth == 1:
        return np.ascontiguousarray(rows).reshape(h, w, channels)
    dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
    px = np.ascontiguousarray(rows).view(dtype).reshape(h, w, channels)
    return px.astype(np.uint16)  # native order


def _u16_to_u8(x: np.ndarray) -> np.ndarray:
    """Scale 16-bit to 8-bit the way cv_bridge does (x * 255 / 65535, rounded)."""
    return ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# encoding -> the OpenCV conversion of its (h, w, channels) pixels to RGB. ROS names a Bayer
# pattern by its first two rows, OpenCV by the second and third pixels of its second row, so
# bayer_rggb8 is OpenCV's BayerBG (the mapping cv_bridge uses).
_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB,
    "bgr16": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "mono16": cv2.COLOR_GRAY2RGB,
    "yuv422": cv2.COLOR_YUV2RGB_UYVY,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuyv": cv2.COLOR_YUV2RGB_YUYV,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUYV,
    "bayer_rggb8": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr8": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg8": cv2.COLOR_BayerGB2RGB,
}


def image_to_rgb(msg) -> np.ndarray:
    """Convert a validated sensor_msgs/Image to (h, w, 3) RGB uint8.

    One converter: our own row packing (padding, byte order), 16 -> 8 bit scaling like
    cv_bridge, then OpenCV's cvtColor (colour order, YUV 4:2:2, Bayer demosaic).
    """
    enc = str(msg.encoding).strip().lower()
    px = pack_rows(msg)  # (h, w, c), uint8 or native uint16
    if px.dtype == np.uint16:
        px = _u16_to_u8(px)
    code = _TO_RGB.get(enc)
    if code is None:  # rgb8, rgb16
        return np.ascontiguousarray(px)
    if px.shape[2] == 1:
        px = px[..., 0]  # (h, w): what cvtColor takes for gray and Bayer
    if px.shape[:2] == (1, 1):
        # OpenCV 4.5.4 (the board's) reads a (1, 1, c) array as c rows of one channel and
        # refuses it (`_step >= minstep`; found by test_fuzz_frames in the board leg)
        return cv2.cvtColor(np.repeat(px, 2, axis=0), code)[:1]
    return cv2.cvtColor(px, code)


def _check_png_chunks(buf: np.ndarray) -> None:
    """Every PNG chunk up to IEND must fit in the data. OpenCV 5's PNG reader allocates a
    chunk's declared length before reading it: a 69-byte PNG whose IDAT declared 4 GB took
    4 GB and 9 s to refuse. O(chunks), so checked before decoding rather than on arrival."""
    view, i = memoryview(buf), 8
    while i + 12 <= len(view):
        (length,) = struct.unpack_from(">I", view, i)
        kind = bytes(view[i + 4 : i + 8])
        if length > len(view) - i - 12:
            raise BadFrameError(
                "corrupt", f"PNG data ({len(view)} bytes) is corrupt: its chunk {kind!r} at "
                f"offset {i} declares {length} bytes, past the end of the data")
        if kind == b"IEND":
            return
        i += 12 + length
    raise BadFrameError("corrupt", f"PNG data ({len(view)} bytes) is corrupt: no IEND chunk "
                        "where its chunks lead")


def compressed_to_rgb(msg, max_dim: int) -> np.ndarray:
    """Decode a validated CompressedImage (JPEG or PNG) to (h, w, 3) RGB uint8."""
    info = check_compressed(msg, max_dim)  # never decode a header we have not checked
    buf = np.ascontiguousarray(_as_bytes_view(msg.data))
    if info.encoding == "png":
        _check_png_chunks(buf)
    # 8-bit, 3 channels, also for gray/16-bit; as stored: camera drivers mean the pixels as
    # they are, and an EXIF orientation tag would rotate them away from the header's size
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        raise BadFrameError("corrupt", f"{info.encoding} data ({len(buf)} bytes) is corrupt: "
                            f"{str(e).strip().splitlines()[-1]}") from None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise BadFrameError("corrupt", f"{info.encoding} data ({len(buf)} bytes) is corrupt")
    # numpy, not cvtColor: OpenCV 4.5.4 (the board's) returns an EXIF-tagged JPEG decoded with
    # IMREAD_IGNORE_ORIENTATION as an array whose row step its own cvtColor then refuses
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    if rgb.shape[:2] != (info.height, info.width):
        raise BadFrameError(
            "corrupt",
            f"{info.encoding} decoded to {rgb.shape[1]}x{rgb.shape[0]} but its header says "
            f"{info.width}x{info.height}",
        )
    return rgb


def frame_to_rgb(msg, max_dim: int) -> np.ndarray:
    """Validate and convert a raw or compressed frame to (h, w, 3) RGB uint8."""
    if is_compressed(msg):
        return compressed_to_rgb(msg, max_dim)
    check_image(msg, max_dim)
    return image_to_rgb(msg)
