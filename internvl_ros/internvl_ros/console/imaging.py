"""Images for the page: downscaled JPEG previews, checked uploads and the example scenes."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np

from internvl_ros.core.errors import ImageDecodeError
from internvl_ros.ros.image_conv import frame_to_rgb

PREVIEW_WIDTH = 640
JPEG_QUALITY = 80
MAX_UPLOAD_DIM = 8192


def preview_jpeg(rgb: np.ndarray, max_width: int = PREVIEW_WIDTH) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes, at most ``max_width`` wide (aspect kept)."""
    h, w = rgb.shape[:2]
    if w > max_width:
        rgb = cv2.resize(rgb, (max_width, max(1, round(h * max_width / w))),
                         interpolation=cv2.INTER_AREA)  # (h', max_width, 3)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ImageDecodeError("could not encode the preview as JPEG")
    return buf.tobytes()


def decode_upload(data: bytes, max_dim: int = MAX_UPLOAD_DIM) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (H, W, 3), JPEG or PNG only.

    The header is checked before decoding (signature, dimensions against ``max_dim``, end
    marker), exactly as the node checks a compressed camera frame, so a small file that
    would decode to a huge image is refused without decoding it. Raises ImageDecodeError with
    the reason.
    """
    msg = SimpleNamespace(format="upload", data=data)  # a CompressedImage, duck-typed
    return frame_to_rgb(msg, max_dim)


def example_images() -> dict[str, tuple[str, np.ndarray]]:
    """{id: (label, RGB)} of the shipped examples: synthetic scenes drawn by the project (the
    demo bag's renderer), so nothing is downloaded and nothing needs a licence."""
    from internvl_ros.tools.demo_bag import render_frame

    return {f"example-{i + 1}": (f"example {i + 1}: synthetic scene, frame {index}",
                                 render_frame(index))
            for i, index in enumerate((0, 14, 31))}
