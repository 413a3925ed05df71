"""Image conversion: each encoding vs ground truth, padding, byte order, bad frames."""

from __future__ import annotations

import array
from types import SimpleNamespace as Msg

import cv2
import numpy as np
import pytest

from internvl_ros.core.errors import ImageDecodeError, InternVLError
from internvl_ros.ros import image_conv as ic

H, W = 480, 640  # real-sized frames
MAX_DIM = 4096


def ground_truth(h: int = H, w: int = W) -> np.ndarray:
    """A smooth RGB image with distinct channels (so swaps and demosaic errors show)."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = xx * 255 // (w - 1)
    g = yy * 255 // (h - 1)
    b = 255 - (xx + yy) * 255 // (w + h - 2)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)  # (h, w, 3)


def pack_yuv422(rgb: np.ndarray, layout: str) -> np.ndarray:
    """RGB to packed YUV 4:2:2, BT.601 limited range; (h, w, 3) -> (h, w, 2) uint8.

    By hand: OpenCV 4.5.4 (the board's) has no COLOR_RGB2YUV_UYVY/_YUYV, only the decoders.
    """
    f = rgb.astype(np.float64)
    y = 16 + f @ [0.257, 0.504, 0.098]  # (h, w)
    pair = (f[:, 0::2] + f[:, 1::2]) / 2  # (h, w/2, 3): chroma is shared by pixel pairs
    u = 128 + pair @ [-0.148, -0.291, 0.439]  # (h, w/2)
    v = 128 + pair @ [0.439, -0.368, -0.071]
    chroma = np.stack([u, v], axis=-1).reshape(u.shape[0], -1)  # (h, w): U0 V0 U1 V1 ...
    first, second = (chroma, y) if layout == "uyvy" else (y, chroma)  # UYVY or YUYV
    packed = np.stack([first, second], axis=-1)  # (h, w, 2)
    return np.clip(np.rint(packed), 0, 255).astype(np.uint8)


def raw_msg(px: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Msg:
    """An Image-like message from (h, w, c) pixels, with `pad` bytes of junk after each row."""
    h, w = px.shape[:2]
    if px.dtype == np.uint16:
        px = px.astype(">u2" if bigendian else "<u2")
    rows = np.ascontiguousarray(px).reshape(h, -1).view(np.uint8)  # (h, w*bpp)
    junk = np.full((h, pad), 0xAB, np.uint8)
    data = np.concatenate([rows, junk], axis=1)  # (h, step)
    return Msg(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(bigendian),
        step=data.shape[1],
        data=array.array("B", data.tobytes()),  # what rclpy hands us
    )


def compressed_msg(data: bytes, fmt: str) -> Msg:
    return Msg(format=fmt, data=array.array("B", data))


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image through a Bayer filter, pattern like 'rggb'. (h, w, 3) -> (h, w, 1)."""
    out = np.zeros(rgb.shape[:2], np.uint8)
    for k, p in enumerate(pattern):
        out[k // 2 :: 2, k % 2 :: 2] = rgb[k // 2 :: 2, k % 2 :: 2, "rgb".index(p)]
    return out[..., None]


# ---------------------------------------------------------------------------------------------
# raw encodings


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_color_8bit(encoding, pad):
    rgb = ground_truth()
    px = rgb[..., ::-1] if encoding.startswith("bgr") else rgb
    if encoding.endswith("a8"):
        px = np.concatenate([px, np.full((H, W, 1), 77, np.uint8)], axis=-1)
    msg = raw_msg(px, encoding, pad=pad)
    assert ic.check_frame(msg, MAX_DIM) == ic.FrameInfo(W, H, encoding, False)
    out = ic.image_to_rgb(msg)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 5])
def test_mono8(pad):
    gray = ground_truth()[..., 1:2]  # (h, w, 1)
    out = ic.image_to_rgb(raw_msg(gray, "mono8", pad=pad))
    np.testing.assert_array_equal(out, np.repeat(gray, 3, axis=2))


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 6])
def test_mono16_scaled_like_cv_bridge(bigendian, pad):
    rng = np.random.default_rng(1)
    v = rng.integers(0, 65536, size=(H, W, 1), dtype=np.uint16)
    msg = raw_msg(v, "mono16", pad=pad, bigendian=bigendian)
    out = ic.image_to_rgb(msg)
    expect = np.rint(v.astype(np.float64) * 255.0 / 65535.0)
    assert np.abs(out.astype(np.float64) - expect).max() <= 1  # byte order wrong -> ~255 off
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("bigendian", [False, True])
def test_rgb16(bigendian):
    rgb = ground_truth()
    px = rgb.astype(np.uint16) * 257  # exact inverse of the 16 -> 8 bit scale
    out = ic.image_to_rgb(raw_msg(px, "rgb16", pad=2, bigendian=bigendian))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize(
    "encoding,code",
    [
        ("yuv422", "uyvy"),
        ("uyvy", "uyvy"),
        ("yuyv", "yuyv"),
        ("yuv422_yuy2", "yuyv"),
    ],
)
def test_yuv422(encoding, code, pad):
    rgb = ground_truth()
    packed = pack_yuv422(rgb, code)  # (h, w, 2)
    out = ic.image_to_rgb(raw_msg(packed, encoding, pad=pad))
    # chroma is shared by pixel pairs, and the round trip through limited-range YUV loses a bit
    assert np.abs(out.astype(int) - rgb).max() <= 4


def test_yuv422_byte_order_matters():
    """UYVY read as YUYV is visibly wrong: the test above would catch a swapped layout."""
    rgb = ground_truth()
    packed = pack_yuv422(rgb, "uyvy")
    wrong = ic.image_to_rgb(raw_msg(packed, "yuyv"))
    assert np.abs(wrong.astype(int) - rgb).mean() > 20


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer(pattern, pad):
    rgb = ground_truth()
    out = ic.image_to_rgb(raw_msg(mosaic(rgb, pattern), f"bayer_{pattern}8", pad=pad))
    inner = (slice(2, -2), slice(2, -2))  # demosaic borders differ between implementations
    assert np.abs(out[inner].astype(int) - rgb[inner]).max() <= 3
    # the wrong pattern gives the wrong colours
    other = {"rggb": "bggr", "bggr": "rggb", "gbrg": "grbg", "grbg": "gbrg"}[pattern]
    wrong = ic.image_to_rgb(raw_msg(mosaic(rgb, pattern), f"bayer_{other}8"))
    assert np.abs(wrong[inner].astype(int) - rgb[inner]).mean() > 20


@pytest.mark.parametrize("encoding,channels,code", [
    ("yuv422", 2, cv2.COLOR_YUV2RGB_UYVY),
    ("yuyv", 2, cv2.COLOR_YUV2RGB_YUYV),
    ("bayer_rggb8", 1, cv2.COLOR_BayerBG2RGB),
    ("bayer_gbrg8", 1, cv2.COLOR_BayerGR2RGB),
    ("bgra8", 4, cv2.COLOR_BGRA2RGB),
])
def test_one_converter_opencv_whatever_is_installed(encoding, channels, code):
    """Pixels are OpenCV's cvtColor of the unpadded rows, exactly: no library cascade."""
    px = np.random.default_rng(3).integers(0, 256, (H, W, channels), dtype=np.uint8)
    out = ic.image_to_rgb(raw_msg(px, encoding, pad=6))
    np.testing.assert_array_equal(out, cv2.cvtColor(px if channels > 1 else px[..., 0], code))


def test_real_sensor_msgs_image():
    from sensor_msgs.msg import Image

    rgb = ground_truth()
    m = raw_msg(rgb[..., ::-1], "bgr8", pad=4)
    msg = Image(height=m.height, width=m.width, encoding=m.encoding, step=m.step, data=m.data)
    assert not ic.is_compressed(msg)
    np.testing.assert_array_equal(ic.frame_to_rgb(msg, MAX_DIM), rgb)


# ---------------------------------------------------------------------------------------------
# compressed


def encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 else rgb)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8"])
def test_jpeg(fmt):
    rgb = ground_truth()
    msg = compressed_msg(encode(rgb, ".jpg"), fmt)
    assert ic.check_frame(msg, MAX_DIM) == ic.FrameInfo(W, H, "jpeg", True)
    out = ic.frame_to_rgb(msg, MAX_DIM)
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 3  # lossy, but the channels are in order


def test_png_color_gray_and_16bit():
    rgb = ground_truth()
    np.testing.assert_array_equal(
        ic.frame_to_rgb(compressed_msg(encode(rgb, ".png"), "png"), MAX_DIM), rgb
    )
    gray = rgb[..., 1]
    out = ic.frame_to_rgb(compressed_msg(encode(gray, ".png"), "png"), MAX_DIM)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    deep = gray.astype(np.uint16) * 257
    out = ic.frame_to_rgb(compressed_msg(encode(deep, ".png"), "png"), MAX_DIM)
    assert np.abs(out[..., 0].astype(int) - gray).max() <= 1


def with_exif_orientation(jpg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment (after SOI) whose Orientation tag is ``orientation``."""
    ifd = (1).to_bytes(2, "little") + (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little")
    ifd += (1).to_bytes(4, "little") + orientation.to_bytes(2, "little") + bytes(2)
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + ifd + bytes(4)  # no next IFD
    payload = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + (2 + len(payload)).to_bytes(2, "big") + payload + jpg[2:]


def test_exif_rotated_jpeg_is_accepted_as_stored():
    """A camera driver means the pixels as stored; decoding must not rotate them (which made
    the decoded size differ from the header's, and the frame was dropped as corrupt)."""
    rgb = ground_truth()  # 640x480, not square
    msg = compressed_msg(with_exif_orientation(encode(rgb, ".jpg"), 6), "jpeg")  # 90 degrees
    rotated = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
    assert rotated.shape[:2] == (W, H)  # what a plain imdecode does with it
    out = ic.frame_to_rgb(msg, MAX_DIM)
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 3


def test_jpeg_size_parser_skips_app_segments():
    """A JPEG with EXIF/ICC-style APP segments before SOF still reports its size."""
    jpg = encode(ground_truth(), ".jpg")
    app = b"\xff\xe1" + (2 + 300).to_bytes(2, "big") + bytes(300)
    msg = compressed_msg(jpg[:2] + app + jpg[2:], "jpeg")
    assert ic.check_frame(msg, MAX_DIM) == ic.FrameInfo(W, H, "jpeg", True)
    assert ic.frame_to_rgb(msg, MAX_DIM).shape == (H, W, 3)


# ---------------------------------------------------------------------------------------------
# bad frames


def _good_raw() -> Msg:
    return raw_msg(ground_truth(), "rgb8")


def _with(msg: Msg, **kw) -> Msg:
    return Msg(**{**vars(msg), **kw})


def bad_frames() -> list[tuple[str, str, Msg]]:
    good = _good_raw()
    jpg = encode(ground_truth(), ".jpg")
    png = encode(ground_truth(), ".png")
    huge_png = bytearray(png)
    huge_png[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")
    return [
        ("short data", "size", _with(good, data=good.data[:-100])),
        ("long data", "size", _with(good, data=good.data + array.array("B", [0] * 3))),
        ("height lies", "size", _with(good, height=H + 1)),
        ("step too small", "size", _with(good, step=W * 3 - 1, data=good.data[: H * (W * 3 - 1)])),
        ("odd yuv width", "size", raw_msg(np.zeros((4, 5, 2), np.uint8), "yuv422")),
        ("unknown encoding", "encoding", _with(good, encoding="32FC1")),
        ("zero width", "empty", Msg(height=H, width=0, encoding="rgb8", is_bigendian=0,
                                    step=0, data=array.array("B"))),
        ("zero height", "empty", Msg(height=0, width=W, encoding="rgb8", is_bigendian=0,
                                     step=W * 3, data=array.array("B"))),
        ("too large", "too_large", _with(good, width=MAX_DIM + 1)),
        ("empty compressed", "empty", compressed_msg(b"", "jpeg")),
        ("garbage jpeg", "corrupt", compressed_msg(bytes(range(256)) * 40, "jpeg")),
        ("unknown compressed", "encoding", compressed_msg(b"GIF89a" + bytes(100), "gif")),
        ("truncated jpeg", "corrupt", compressed_msg(jpg[: len(jpg) // 2], "jpeg")),
        ("truncated png", "corrupt", compressed_msg(png[: len(png) // 2], "png")),
        ("png bomb header", "too_large", compressed_msg(bytes(huge_png), "png")),
    ]


@pytest.mark.parametrize("name,kind,msg", bad_frames(), ids=[b[0] for b in bad_frames()])
def test_bad_frames_are_refused_with_a_reason(name, kind, msg):
    with pytest.raises(ic.BadFrameError) as e:
        ic.check_frame(msg, MAX_DIM)
    assert e.value.kind == kind
    assert isinstance(e.value, ImageDecodeError) and isinstance(e.value, InternVLError)
    assert len(str(e.value)) > 20
    with pytest.raises(ic.BadFrameError):
        ic.frame_to_rgb(msg, MAX_DIM)


def test_corrupt_jpeg_body_fails_at_decode():
    """A JPEG with a sound header but a broken scan passes the cheap check on arrival and fails
    at decode time with the same error type."""
    jpg = bytearray(encode(ground_truth(), ".jpg"))
    sos = jpg.index(b"\xff\xda")
    jpg[sos + 5] = 0x77  # the scan names a component the frame does not have
    msg = compressed_msg(bytes(jpg), "jpeg")
    assert ic.check_frame(msg, MAX_DIM).width == W
    with pytest.raises(ic.BadFrameError) as e:
        ic.frame_to_rgb(msg, MAX_DIM)
    assert e.value.kind == "corrupt"


def test_check_is_cheap_and_does_not_copy():
    """Validation reads the header and a few bytes; a full-HD frame is checked in well under a
    millisecond on average (it runs at camera rate in the subscription callback)."""
    import time

    msg = raw_msg(np.zeros((1080, 1920, 3), np.uint8), "rgb8")
    jpg = compressed_msg(encode(ground_truth(1080, 1920), ".jpg"), "jpeg")
    t0 = time.perf_counter()
    for _ in range(200):
        ic.check_frame(msg, MAX_DIM)
        ic.check_frame(jpg, MAX_DIM)
    per_call = (time.perf_counter() - t0) / 400
    assert per_call < 1e-3, per_call


# ---------------------------------------------------------------------------------------------
# serialized frames (the node subscribes raw and reads the CDR header itself)


def _ros_image(frame_id: str, encoding: str, pad: int, bigendian: bool):
    from sensor_msgs.msg import Image

    px = ground_truth(6, 10)
    if encoding == "mono16":
        px = px[..., :1].astype(np.uint16) * 257
    elif encoding == "bgra8":
        px = np.concatenate([px, px[..., :1]], axis=2)  # (h, w, 4)
    m = raw_msg(px, encoding, pad=pad, bigendian=bigendian)
    msg = Image(height=m.height, width=m.width, encoding=encoding, step=m.step, data=m.data,
                is_bigendian=m.is_bigendian)
    msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec = frame_id, -3, 999
    return msg


@pytest.mark.parametrize("frame_id", ["", "c", "ca", "cam", "cam0", "camera_optical_frame"])
@pytest.mark.parametrize("encoding,pad,bigendian",
                         [("rgb8", 0, False), ("bgra8", 3, False), ("mono16", 1, True)])
def test_cdr_image_fields_match_the_message(frame_id, encoding, pad, bigendian):
    """Every string length (so every alignment) reads back the fields rclpy serialized."""
    from rclpy.serialization import serialize_message

    from internvl_ros.ros import cdr

    msg = _ros_image(frame_id, encoding, pad, bigendian)
    raw = serialize_message(msg)
    v = cdr.parse_image(raw)
    assert (v.height, v.width, v.encoding, v.is_bigendian, v.step) == (
        msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step)
    assert (v.header.frame_id, v.header.stamp.sec, v.header.stamp.nanosec) == (frame_id, -3, 999)
    assert bytes(v.data) == msg.data.tobytes() and v.data.obj is raw  # a view, not a copy
    assert ic.check_frame(v, MAX_DIM) == ic.check_frame(msg, MAX_DIM)
    np.testing.assert_array_equal(ic.frame_to_rgb(v, MAX_DIM), ic.frame_to_rgb(msg, MAX_DIM))


@pytest.mark.parametrize("fmt", ["", "png", "rgb8; jpeg compressed bgr8"])
def test_cdr_compressed_fields_match_the_message(fmt):
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CompressedImage

    from internvl_ros.ros import cdr

    png = encode(ground_truth(), ".png")
    msg = CompressedImage(format=fmt, data=array.array("B", png))
    msg.header.frame_id = "cam2"
    v = cdr.parse_compressed(serialize_message(msg))
    assert v.format == fmt and v.header.frame_id == "cam2" and bytes(v.data) == png
    assert ic.check_frame(v, MAX_DIM) == ic.FrameInfo(W, H, "png", True)


def _cdr_be_image(frame_id: str, h: int, w: int, enc: str, step: int, data: bytes) -> bytes:
    """A big-endian (CDR_BE) sensor_msgs/Image, written by hand: no RMW here writes one."""
    import struct

    out = bytearray(b"\x00\x00\x00\x00")

    def align(n):
        out.extend(bytes((-(len(out) - 4)) % n))

    def u32(v):
        align(4)
        out.extend(struct.pack(">I", v))

    def string(s):
        u32(len(s) + 1)
        out.extend(s.encode() + b"\x00")

    u32(7)
    u32(8)
    string(frame_id)
    u32(h)
    u32(w)
    string(enc)
    out.append(0)
    u32(step)
    u32(len(data))
    out.extend(data)
    return bytes(out)


def test_cdr_big_endian_and_bad_bytes():
    from internvl_ros.ros import cdr

    data = bytes(range(2 * 9))
    v = cdr.parse_image(_cdr_be_image("ab", 2, 3, "rgb8", 9, data))
    assert (v.height, v.width, v.encoding, v.step, bytes(v.data)) == (2, 3, "rgb8", 9, data)
    assert v.header.stamp.sec == 7 and v.header.frame_id == "ab"
    good = _cdr_be_image("ab", 2, 3, "rgb8", 9, data)
    assert cdr.parse_image(good + b"\x00" * 3)  # trailing alignment padding is fine
    for bad in (good[:-1],  # truncated data
                good[:20],  # truncated header
                b"\x00\x07" + good[2:],  # XCDR2 encapsulation: not read here
                good + bytes(8),  # trailing bytes: not this type
                b""):
        with pytest.raises(cdr.CdrError):
            cdr.parse_image(bad)
    with pytest.raises(cdr.CdrError):  # a CompressedImage is not an Image
        from rclpy.serialization import serialize_message
        from sensor_msgs.msg import CompressedImage

        cdr.parse_image(serialize_message(CompressedImage(format="jpeg")))


def test_cdr_bad_frame_is_still_a_bad_frame():
    """A frame whose header disagrees with its data parses, and check_frame refuses it."""
    from rclpy.serialization import serialize_message

    from internvl_ros.ros import cdr

    msg = _ros_image("cam", "rgb8", 0, False)
    msg.data = msg.data[:-5]
    with pytest.raises(ic.BadFrameError) as e:
        ic.check_frame(cdr.parse_image(serialize_message(msg)), MAX_DIM)
    assert e.value.kind == "size"
