"""Fuzzing of frame intake: random and mutated sensor_msgs/Image and CompressedImage payloads.

Every input goes the way the node takes it (``ros/node.py`` ``_on_image`` then, at request
time, ``frame_to_rgb``): ``cdr.parse_image``/``parse_compressed`` on the serialized bytes,
``image_conv.check_frame`` on the fields, ``image_conv.frame_to_rgb`` to convert. The only
allowed outcomes are a (h, w, 3) uint8 frame with h, w <= max_dim, a ``CdrError`` from the CDR
reader (the node then deserializes with rclpy, fuzzed here too) or a ``BadFrameError``; never
another exception, a crash, or an allocation beyond a bound (numpy and OpenCV's Python-side
arrays, measured with tracemalloc: at most a few times the input plus the decoded frame of the
checked dimensions).

Examples: ``FUZZ_EXAMPLES`` per test (default 400, about 3000 in all, well under a minute);
``make fuzz`` runs many more (and keeps hypothesis' example database in .cache/). Every crasher
found lives on as a regression case in ``test_regressions``.
"""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from internvl_ros.ros import cdr
from internvl_ros.ros import image_conv as ic

MAX_DIM = 256  # small, so that mutated headers often cross it
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared machine: timing is not what is tested
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    # CI: no example database (nothing written to the checkout); make fuzz keeps one
    database=DirectoryBasedExampleDatabase(os.environ["FUZZ_DB"]) if "FUZZ_DB" in os.environ
    else None,
)
# the bound on what one frame may allocate (numpy/OpenCV arrays, Python objects)
ALLOC_SLACK = 4 << 20
ALLOC_PER_INPUT_BYTE = 6
ALLOC_PER_PIXEL = 4 * 3 * 4  # a few float32 (h, w, 3) temporaries (YUV, Bayer)


NATIVE_SLACK = 16 << 20  # decoder tables, allocator arenas
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int | None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux: clear_refs 5); the RSS now, or
    None where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_kb("VmRSS:")
    except (OSError, KeyError):
        return None


def _peak_rss() -> int:
    return _status_kb("VmHWM:")


# ---------------------------------------------------------------------------------------------
# a plain-CDR writer (XCDR1, as every ROS 2 RMW writes these two messages)


class CdrWriter:
    def __init__(self, big_endian: bool = False):
        self.order = ">" if big_endian else "<"
        self.buf = bytearray(b"\x00\x00\x00\x00" if big_endian else b"\x00\x01\x00\x00")

    def _align(self, n: int) -> None:
        self.buf += b"\x00" * ((-(len(self.buf) - 4)) % n)

    def u32(self, v: int) -> CdrWriter:
        self._align(4)
        self.buf += struct.pack(self.order + "I", v & 0xFFFFFFFF)
        return self

    def i32(self, v: int) -> CdrWriter:
        self._align(4)
        self.buf += struct.pack(self.order + "i", v)
        return self

    def u8(self, v: int) -> CdrWriter:
        self.buf.append(v & 0xFF)
        return self

    def string(self, s: bytes) -> CdrWriter:
        self.u32(len(s) + 1)
        self.buf += s + b"\x00"
        return self

    def seq(self, data: bytes, declared: int | None = None) -> CdrWriter:
        self.u32(len(data) if declared is None else declared)
        self.buf += data
        return self


def image_cdr(*, sec=0, nanosec=0, frame_id=b"cam", height, width, encoding: bytes,
              is_bigendian=0, step, data: bytes, declared=None, big_endian=False) -> bytes:
    w = CdrWriter(big_endian).i32(sec).u32(nanosec).string(frame_id)
    w.u32(height).u32(width).string(encoding).u8(is_bigendian).u32(step).seq(data, declared)
    return bytes(w.buf)


def compressed_cdr(*, fmt: bytes, data: bytes, frame_id=b"cam", declared=None,
                   big_endian=False) -> bytes:
    w = CdrWriter(big_endian).i32(0).u32(0).string(frame_id).string(fmt).seq(data, declared)
    return bytes(w.buf)


# ---------------------------------------------------------------------------------------------
# the target: the node's intake path


def intake(raw: bytes, compressed: bool, max_dim: int = MAX_DIM):
    """What the node does with one serialized frame. Returns 'cdr' (the node would deserialize
    instead), a BadFrameError, or the (h, w, 3) frame; anything else raised is a finding."""
    parse = cdr.parse_compressed if compressed else cdr.parse_image
    try:
        view = parse(raw)
    except cdr.CdrError:
        return "cdr"
    return convert(view, max_dim, len(raw))


def convert(msg, max_dim: int, input_bytes: int):
    """check_frame on arrival, frame_to_rgb at request time, within the allocation bound."""
    try:
        info = ic.check_frame(msg, max_dim)
    except ic.BadFrameError as e:
        return e
    assert info.width <= max_dim and info.height <= max_dim
    rss0 = _reset_peak_rss()
    tracemalloc.start()
    try:
        try:
            rgb = ic.frame_to_rgb(msg, max_dim)
        except ic.BadFrameError as e:
            rgb = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = (ALLOC_SLACK + ALLOC_PER_INPUT_BYTE * input_bytes
             + ALLOC_PER_PIXEL * info.width * info.height)
    assert peak <= bound, f"{peak} bytes allocated for {info} from {input_bytes} input bytes"
    if rss0 is not None:  # native allocations too (OpenCV, libpng, libjpeg): the peak RSS
        grew = _peak_rss() - rss0
        assert grew <= bound + NATIVE_SLACK, \
            f"RSS peaked {grew} bytes above its start for {info} from {input_bytes} input bytes"
    if isinstance(rgb, np.ndarray):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
        # an EXIF orientation may turn it by 90 degrees
        assert rgb.shape[:2] in ((info.height, info.width), (info.width, info.height)), \
            (rgb.shape, info)
    return rgb


def through_rclpy(raw: bytes, compressed: bool, max_dim: int = MAX_DIM):
    """The node's other door: deserialize_message (on a CdrError, and for every frame a request
    describes), then the same checks."""
    intake_mod = pytest.importorskip("internvl_ros.ros.intake")
    sensor = pytest.importorskip("sensor_msgs.msg")
    try:
        msg = intake_mod.deserialize(raw, sensor.CompressedImage if compressed else sensor.Image)
    except ic.BadFrameError as e:  # the node drops the frame as 'corrupt'
        assert e.kind == "corrupt", e
        return e
    return convert(msg, max_dim, len(raw))


# ---------------------------------------------------------------------------------------------
# seeds: valid frames of every kind


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3 :, : w // 2] = (200, 30, 60)
    return img


def _encode(ext: str, img: np.ndarray, *params) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _seeds() -> dict[str, bytes]:
    img = _scene(24, 40)
    return {
        "jpeg": _encode(".jpg", img),
        "jpeg_progressive": _encode(".jpg", img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "jpeg_gray": _encode(".jpg", img[..., 0]),
        "jpeg_odd": _encode(".jpg", _scene(7, 5)),
        "png": _encode(".png", img),
        "png_gray": _encode(".png", img[..., 0]),
        "png_16": _encode(".png", img.astype(np.uint16) * 257),
        "png_rgba": _encode(".png", np.dstack([img, img[..., :1]])),
        "png_1x1": _encode(".png", img[:1, :1]),
        "jpeg_exif_rotated": with_exif_orientation(_encode(".jpg", img), 6),
        "png_exif_rotated": with_exif_orientation(_encode(".png", img), 8),
        **_apng_seed(),
    }


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The JPEG (APP1) or PNG (eXIf) with an EXIF orientation tag, as phone photos have."""
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation)
            + struct.pack("<I", 0))
    if data.startswith(ic.PNG_MAGIC):
        chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(
            ">I", zlib.crc32(b"eXIf" + tiff))
        return data[:33] + chunk + data[33:]
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _apng_seed() -> dict[str, bytes]:
    """An animated PNG (acTL/fcTL/fdAT chunks), where OpenCV supports writing one."""
    if not hasattr(cv2, "imencodeanimation"):
        return {}
    anim = cv2.Animation()
    anim.frames = [_scene(12, 16, seed=k) for k in range(3)]
    anim.durations = [100, 100, 100]
    ok, buf = cv2.imencodeanimation(".png", anim)
    return {"png_apng": buf.tobytes()} if ok else {}


SEEDS = _seeds()


def png_with_ihdr(data: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    """A PNG whose IHDR claims width x height (with a valid CRC when fix_crc)."""
    ihdr = bytearray(data[8 : 8 + 25])
    ihdr[8:16] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    if fix_crc:
        ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return data[:8] + bytes(ihdr) + data[33:]


def png_fix_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC, so that a mutated PNG gets past libpng's CRC checks and
    into the decoder (chunks that do not fit are left as they are)."""
    out, i = bytearray(data), 8
    while i + 12 <= len(out):
        (n,) = struct.unpack(">I", bytes(out[i : i + 4]))
        if i + 12 + n > len(out):
            break
        out[i + 8 + n : i + 12 + n] = struct.pack(">I", zlib.crc32(bytes(out[i + 4 : i + 8 + n])))
        i += 12 + n
    return bytes(out)


def png_with_chunk_length(data: bytes, which: int, length: int) -> bytes:
    """The PNG with its `which`-th chunk declaring `length` bytes (the data unchanged)."""
    out, i, k = bytearray(data), 8, 0
    while i + 12 <= len(out):
        (n,) = struct.unpack(">I", bytes(out[i : i + 4]))
        if k == which:
            out[i : i + 4] = struct.pack(">I", length & 0xFFFFFFFF)
            return bytes(out)
        i, k = i + 12 + n, k + 1
    return bytes(out)


def apng_with_fctl(data: bytes, which: int, fields: tuple) -> bytes:
    """An APNG whose `which`-th fcTL chunk has (width, height, x, y, dispose, blend)."""
    out, i, seen = bytearray(data), 8, 0
    while i + 12 <= len(out):
        (n,) = struct.unpack(">I", bytes(out[i : i + 4]))
        if bytes(out[i + 4 : i + 8]) == b"fcTL" and n >= 26:
            if seen == which:
                w, h, x, y, dispose, blend = fields
                out[i + 12 : i + 28] = struct.pack(">IIII", w, h, x, y)
                out[i + 32 : i + 34] = bytes([dispose, blend])
                return png_fix_crcs(bytes(out))
            seen += 1
        i += 12 + n
    return bytes(out)


def jpeg_with_sof(data: bytes, width: int, height: int, which: int = 0) -> bytes:
    """A JPEG whose `which`-th SOF segment claims width x height."""
    out = bytearray(data)
    i, seen = 2, 0
    while i + 4 <= len(out) and out[i] == 0xFF:
        marker = out[i + 1]
        seg = struct.unpack(">H", bytes(out[i + 2 : i + 4]))[0]
        if marker in (0xC0, 0xC1, 0xC2):
            if seen == which:
                out[i + 5 : i + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                return bytes(out)
            seen += 1
        if marker == 0xDA:
            break
        i += 2 + seg
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# strategies


ENCODINGS = list(ic.RAW_ENCODINGS)
encodings = st.one_of(
    st.sampled_from(ENCODINGS),
    st.sampled_from([e.upper() for e in ENCODINGS] + [f" {e} " for e in ENCODINGS]),
    st.sampled_from(["", "8UC3", "32FC1", "16UC1", "nv12", "yuv420", "jpeg", "rgb8\x00x",
                     "bayer_rggb16", "mono32", "\u00e9\u00e8", "rgb8" * 70]),
    st.text(max_size=40),
).map(lambda s: s.encode("utf-8", errors="surrogatepass"))
dims = st.one_of(st.integers(0, 40), st.integers(0, MAX_DIM + 2),
                 st.sampled_from([2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1]),
                 st.integers(0, 2**32 - 1))


@st.composite
def raw_images(draw):
    """A sensor_msgs/Image: consistent most of the time, any field off some of the time."""
    enc = draw(encodings)
    name = enc.decode("utf-8", errors="replace").strip().lower()
    channels, depth = ic.RAW_ENCODINGS.get(name, (draw(st.integers(1, 4)), 1))
    small = draw(st.booleans())
    w = draw(st.integers(1, 24) if small else dims)
    h = draw(st.integers(1, 24) if small else dims)
    row = w * channels * depth
    step = draw(st.one_of(st.just(row), st.integers(row, row + 9), dims)) & 0xFFFFFFFF
    size = h * step
    if size <= 64 * 1024 and draw(st.integers(0, 3)):
        n = size + draw(st.sampled_from([0, 0, 0, -1, 1, -step, step]))
    else:
        n = draw(st.integers(0, 4096))
    data = draw(st.binary(min_size=max(0, min(n, 64 * 1024)), max_size=max(0, min(n, 64 * 1024))))
    declared = draw(dims) if draw(st.integers(0, 9)) == 0 else None  # a lying length, rarely
    return image_cdr(
        sec=draw(st.integers(-(2**31), 2**31 - 1)), nanosec=draw(st.integers(0, 2**32 - 1)),
        frame_id=draw(st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b"x"))),
        height=h, width=w, encoding=enc, is_bigendian=draw(st.integers(0, 255)), step=step,
        data=data, declared=declared, big_endian=draw(st.booleans()))


@st.composite
def mutated(draw, data: bytes):
    """Byte-level mutations: flips, overwrites, truncation, junk, insertions."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete",
                                   "dup"]))
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xD9, 0xD8, 0xC0, 0xDA]))
        elif op == "truncate":
            del out[i:]
        elif op == "append":
            out += draw(st.binary(max_size=64))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[i : i + draw(st.integers(1, 16))]
        else:  # duplicate a slice (a repeated segment or chunk)
            j = draw(st.integers(i, min(len(out), i + 64)))
            out[j:j] = out[i:j]
    return bytes(out)


@st.composite
def compressed_payloads(draw):
    """JPEG/PNG data: valid seeds, header dimensions rewritten, truncated, mutated, junk."""
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = SEEDS[kind]
    how = draw(st.sampled_from(["valid", "dims", "mutate", "dims+mutate", "truncate", "junk",
                                "magic+junk", "chunk_length"]))
    if how in ("dims", "dims+mutate"):
        w, h = draw(dims), draw(dims)
        if kind.startswith("png"):
            data = png_with_ihdr(data, w, h, fix_crc=draw(st.booleans()))
        else:
            data = jpeg_with_sof(data, w, h)
    if how == "chunk_length" and kind.startswith("png"):
        data = png_with_chunk_length(data, draw(st.integers(0, 5)), draw(dims))
    if how in ("mutate", "dims+mutate"):
        data = draw(mutated(data))
        if kind.startswith("png") and draw(st.booleans()):
            data = png_fix_crcs(data)
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "junk":
        data = draw(st.binary(max_size=256))
    elif how == "magic+junk":
        magic = ic.PNG_MAGIC if kind.startswith("png") else ic.JPEG_MAGIC
        tail = b"\x00\x00\x00\x00IEND\xaeB`\x82" if kind.startswith("png") else b"\xff\xd9"
        data = magic + draw(st.binary(max_size=256)) + draw(st.sampled_from([b"", tail]))
    return data


@st.composite
def apng_payloads(draw):
    """Animated PNGs whose frame control chunks (fcTL) lie about sizes and offsets."""
    big = st.one_of(st.integers(0, 40), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
    fields = (draw(big), draw(big), draw(big), draw(big), draw(st.integers(0, 3)),
              draw(st.integers(0, 2)))
    data = apng_with_fctl(SEEDS["png_apng"], draw(st.integers(0, 2)), fields)
    return draw(mutated(data)) if draw(st.booleans()) else data


formats = st.one_of(st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8",
                                     "mono16; png compressed", "", "tiff", "bmp"]),
                    st.text(max_size=20))


# ---------------------------------------------------------------------------------------------
# the fuzz tests


def _allowed(out) -> None:
    assert isinstance(out, (str, ic.BadFrameError, np.ndarray)), out
    if isinstance(out, ic.BadFrameError):
        assert out.kind in ic.BadFrameError.KINDS and str(out), out




@FUZZ
@given(raw=raw_images())
def test_fuzz_raw_image_cdr(raw):
    _allowed(intake(raw, compressed=False))


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_raw_image_cdr(data):
    enc = data.draw(st.sampled_from(ENCODINGS))
    channels, depth = ic.RAW_ENCODINGS[enc]
    w, h = 2 * data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    step = w * channels * depth + data.draw(st.integers(0, 3))
    payload = data.draw(st.binary(min_size=h * step, max_size=h * step))
    good = image_cdr(height=h, width=w, encoding=enc.encode(), step=step, data=payload,
                     big_endian=data.draw(st.booleans()))
    out = intake(good, compressed=False)
    assert isinstance(out, np.ndarray) and out.shape == (h, w, 3)  # the seed itself is valid
    _allowed(intake(data.draw(mutated(good)), compressed=False))


@FUZZ
@given(payload=compressed_payloads(), fmt=formats, big_endian=st.booleans())
def test_fuzz_compressed_image_cdr(payload, fmt, big_endian):
    raw = compressed_cdr(fmt=fmt.encode("utf-8", errors="surrogatepass"), data=payload,
                         big_endian=big_endian)
    _allowed(intake(raw, compressed=True))


@FUZZ
@pytest.mark.skipif("png_apng" not in SEEDS, reason="this OpenCV cannot write animated PNG")
@given(payload=apng_payloads())
def test_fuzz_animated_png(payload):
    _allowed(intake(compressed_cdr(fmt=b"png", data=payload), compressed=True))


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_compressed_cdr(data):
    kind = data.draw(st.sampled_from(sorted(SEEDS)))
    good = compressed_cdr(fmt=b"jpeg" if "jpeg" in kind else b"png", data=SEEDS[kind])
    _allowed(intake(data.draw(mutated(good)), compressed=True))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300),
                     st.binary(max_size=300).map(lambda b: b"\x00\x01\x00\x00" + b),
                     st.binary(max_size=300).map(lambda b: b"\x00\x00\x00\x00" + b)),
       compressed=st.booleans())
def test_fuzz_arbitrary_bytes(raw, compressed):
    _allowed(intake(raw, compressed))


@FUZZ
@given(data=st.data())
def test_fuzz_duck_typed_messages(data):
    """The request-image path: message objects (no CDR), data as array/bytes/memoryview."""
    if data.draw(st.booleans()):
        payload = data.draw(compressed_payloads())
        msg = SimpleNamespace(format=data.draw(formats), data=payload)
    else:
        raw = data.draw(raw_images())
        try:
            view = cdr.parse_image(raw)
        except cdr.CdrError:
            return
        wrap = data.draw(st.sampled_from([bytes, bytearray, memoryview,
                                          lambda b: np.frombuffer(bytes(b), np.uint8)]))
        msg = SimpleNamespace(height=view.height, width=view.width, encoding=view.encoding,
                              is_bigendian=view.is_bigendian, step=view.step,
                              data=wrap(bytes(view.data)))
    _allowed(convert(msg, MAX_DIM, len(msg.data)))


# The rclpy door: deserialize_message reads the same bytes (a CdrError fallback, and every
# frame a request describes). Fewer examples: each one crosses into C.
RCLPY_FUZZ = settings(FUZZ, max_examples=max(50, EXAMPLES // 4))


@RCLPY_FUZZ
@given(data=st.data())
def test_fuzz_rclpy_deserialize(data):
    compressed = data.draw(st.booleans())
    if compressed:
        kind = data.draw(st.sampled_from(sorted(SEEDS)))
        raw = compressed_cdr(fmt=b"jpeg", data=SEEDS[kind])
    else:
        raw = data.draw(raw_images())
    if data.draw(st.booleans()):
        raw = data.draw(mutated(raw))
    _allowed(through_rclpy(raw, compressed))


# ---------------------------------------------------------------------------------------------
# regression cases: every crasher found, and the edges the bound depends on


def _expect_bad(out, kind: str | None = None) -> None:
    assert isinstance(out, ic.BadFrameError), out
    if kind is not None:
        assert out.kind == kind, (out.kind, str(out))


def test_header_only_payload_is_refused_without_reaching_fast_cdr():
    """Found by test_fuzz_rclpy_deserialize: four bytes, an encapsulation header whose options
    ask for padding (00 00 00 03) and nothing after it, crash Fast CDR's deserialization (a
    segfault of the whole node). The node's fallback door refuses them first. Run in a child
    process, so that a crash fails this test instead of ending the run."""
    pytest.importorskip("internvl_ros.ros.intake")
    code = """
from internvl_ros.ros import image_conv
from internvl_ros.ros.intake import deserialize
from sensor_msgs.msg import CompressedImage, Image
n = 0
for rep in (b"\\x00\\x00", b"\\x00\\x01"):
    for opt in range(4):
        for raw in (rep + bytes([0, opt]), rep + bytes([0, opt]) + bytes(3), rep[:1], b""):
            for t in (Image, CompressedImage):
                try:
                    deserialize(raw, t)
                except image_conv.BadFrameError as e:
                    assert e.kind == "corrupt", e
                    n += 1
print("refused", n)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (f"exit {out.returncode} (a negative code is a signal: "
                                 f"-11 is the Fast CDR segfault)", out.stderr[-2000:])
    assert out.stdout.split() == ["refused", str(2 * 4 * 4 * 2)], out.stdout


def test_seeds_decode():
    for name, data in SEEDS.items():
        out = intake(compressed_cdr(fmt=b"jpeg", data=data), compressed=True)
        assert isinstance(out, np.ndarray), (name, out)


def test_exif_orientation_is_not_a_corrupt_frame():
    """Found by the fuzz seeds: OpenCV turns an image by its EXIF orientation, so a photo
    (40x24, orientation 6 or 8) decoded to 24x40, which was refused as 'corrupt'. Frames are
    decoded as stored (IMREAD_IGNORE_ORIENTATION): what the camera driver meant, 40x24."""
    for name in ("jpeg_exif_rotated", "png_exif_rotated"):
        out = intake(compressed_cdr(fmt=b"jpeg", data=SEEDS[name]), compressed=True)
        assert isinstance(out, np.ndarray) and out.shape == (24, 40, 3), (name, out)


def test_one_pixel_frame_converts_on_every_opencv():
    """Found by the board leg's fuzzing: a 1x1 bgr8 frame made OpenCV 4.5.4's cvtColor refuse
    the strided row view (`_step >= minstep`), an exception that is not a BadFrameError."""
    raw = (b"\x00\x01\x00\x00" + b"\x00" * 8 + b"\x01\x00\x00\x00\x00\x00\x00\x00"
           + b"\x01\x00\x00\x00\x01\x00\x00\x00\x05\x00\x00\x00bgr8\x00\x00\x00\x00"
           + b"\x03\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00")
    out = intake(raw, compressed=False)
    assert isinstance(out, np.ndarray) and out.shape == (1, 1, 3), out


def test_png_chunk_longer_than_the_data_is_refused_before_decoding():
    """Found by atheris: a 69-byte PNG whose IDAT chunk declares 0xFF00000C bytes made OpenCV 5
    allocate 4 GB and spend 9 s before refusing it. Now refused from the chunk walk."""
    crasher = base64.b64decode(
        "AQABAAAAAAAAAAAAAAQAAABjYW0ABQAAAGpwZWcAAAAARQAAAIlQTkcNChoKAAAADUlIRFIAAAABAAAAAQgCCQAA"
        "cIisIf8AAAxJREFUCB1jONQUDwADrQGkbc6BBwAAAABJRU5ErkJggg==")
    t0 = time.monotonic()
    _expect_bad(intake(crasher[1:], compressed=True), "corrupt")
    assert time.monotonic() - t0 < 1.0
    for which in range(3):  # IHDR, IDAT, IEND
        for length in (2**31, 2**32 - 1, 10**6):
            data = png_with_chunk_length(SEEDS["png_rgba"], which, length)
            _expect_bad(intake(compressed_cdr(fmt=b"png", data=data), compressed=True))


def test_huge_header_dimensions_are_refused_before_decoding():
    for w, h in ((MAX_DIM + 1, 8), (8, MAX_DIM + 1), (2**16 - 1, 2**16 - 1)):
        _expect_bad(intake(compressed_cdr(fmt=b"jpeg", data=jpeg_with_sof(SEEDS["jpeg"], w, h)),
                           compressed=True), "too_large")
        png = png_with_ihdr(SEEDS["png"], w, h, fix_crc=True)
        _expect_bad(intake(compressed_cdr(fmt=b"png", data=png), compressed=True), "too_large")
    _expect_bad(intake(compressed_cdr(fmt=b"png", data=png_with_ihdr(
        SEEDS["png"], 2**32 - 1, 1, fix_crc=True)), compressed=True), "too_large")


def test_raw_size_fields_at_their_limits():
    for h, w, step in ((2**32 - 1, 2**32 - 1, 2**32 - 1), (1, 2**32 - 1, 3), (0, 0, 0)):
        _expect_bad(intake(image_cdr(height=h, width=w, encoding=b"rgb8", step=step, data=b""),
                           compressed=False))
    # declared sequence length beyond the bytes: a CdrError (the node deserializes instead)
    assert intake(image_cdr(height=1, width=1, encoding=b"rgb8", step=3, data=b"abc",
                            declared=2**32 - 1), compressed=False) == "cdr"
