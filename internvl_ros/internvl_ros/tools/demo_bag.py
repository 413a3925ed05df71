"""Write a short synthetic camera bag: moving shapes and text, raw and/or compressed.

    python -m internvl_ros.tools.demo_bag OUT_BAG [--frames 30] [--fps 10] [--storage mcap]

Used by `make demo` and by the replay tests. Frames are deterministic for a given index.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from internvl_ros.tools.bagio import BagFrame, frame_to_rosbags, msgtype_of, ros2_typestore

RAW_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
STAMP0_NS = 1_700_000_000_000_000_000  # an arbitrary, recognisable epoch for header stamps


def render_frame(index: int, width: int = 640, height: int = 480) -> np.ndarray:
    """A (height, width, 3) RGB uint8 scene: sky, floor, a moving ball, a box and a label."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2] = (135, 190, 235)  # sky
    img[height // 2:] = (90, 110, 90)  # floor
    t = index / 10.0
    cx = int(width * (0.2 + 0.6 * (0.5 + 0.5 * np.sin(t))))
    cy = int(height * 0.6)
    cv2.circle(img, (cx, cy), height // 10, (220, 40, 40), -1)  # red ball
    bx = int(width * (0.8 - 0.5 * (index % 20) / 20))
    cv2.rectangle(img, (bx, height // 3), (bx + width // 8, height // 3 + height // 6),
                  (40, 60, 200), -1)  # blue box
    cv2.putText(img, f"frame {index}", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.2,
                (255, 255, 255), 2, cv2.LINE_AA)
    return img


def encode_raw(rgb: np.ndarray, encoding: str) -> tuple[bytes, int]:
    """(data, step) of an RGB image in a sensor_msgs/Image encoding."""
    if encoding == "rgb8":
        out = rgb
    elif encoding == "bgr8":
        out = rgb[..., ::-1]
    elif encoding == "mono8":
        out = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif encoding == "rgba8":
        out = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    else:
        raise ValueError(f"demo bags support rgb8, bgr8, mono8 and rgba8, not {encoding}")
    out = np.ascontiguousarray(out)
    return out.tobytes(), out.strides[0]


def make_frame(index: int, kind: str, width: int, height: int, fps: float,
               encoding: str = "rgb8", jpeg_quality: int = 90) -> BagFrame:
    rgb = render_frame(index, width, height)
    stamp = STAMP0_NS + int(index * 1e9 / fps)
    sec, nsec = divmod(stamp, 1_000_000_000)
    if kind == "compressed":
        ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        return BagFrame(index, stamp, kind, sec, nsec, "camera_optical_frame",
                        format="jpeg", data=buf.tobytes())
    data, step = encode_raw(rgb, encoding)
    return BagFrame(index, stamp, kind, sec, nsec, "camera_optical_frame", height=height,
                    width=width, encoding=encoding, is_bigendian=0, step=step, data=data)


def write_demo_bag(path: str | Path, frames: int = 30, fps: float = 10.0, width: int = 640,
                   height: int = 480, storage: str = "mcap",
                   kinds: Sequence[str] = ("raw", "compressed"),
                   raw_encodings: Sequence[str] = ("rgb8",)) -> Path:
    """Write the bag; raw frames cycle through `raw_encodings`. Returns the bag path."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = Path(path)
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    store = ros2_typestore()
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {kind: writer.add_connection(RAW_TOPIC if kind == "raw" else COMPRESSED_TOPIC,
                                             msgtype_of(kind), typestore=store)
                 for kind in kinds}
        for i in range(frames):
            for kind in kinds:
                enc = raw_encodings[i % len(raw_encodings)]
                frame = make_frame(i, kind, width, height, fps, encoding=enc)
                msg = frame_to_rosbags(store, frame)
                writer.write(conns[kind], frame.bag_time_ns,
                             store.serialize_cdr(msg, msgtype_of(kind)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="bag folder to create (must not exist)")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--kinds", default="raw,compressed", help="comma list of raw,compressed")
    p.add_argument("--encodings", default="rgb8", help="comma list of raw encodings to cycle")
    args = p.parse_args(argv)
    if args.output.exists():
        print(f"demo_bag: {args.output} exists already; remove it or choose another path",
              file=sys.stderr)
        return 2
    write_demo_bag(args.output, args.frames, args.fps, args.width, args.height, args.storage,
                   tuple(args.kinds.split(",")), tuple(args.encodings.split(",")))
    print(f"demo_bag: wrote {args.frames} frames to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
