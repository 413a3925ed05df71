"""Annotated frames: the caption banner and the boxes are drawn on a copy, in BGR."""

from __future__ import annotations

import numpy as np
import pytest

from internvl_ros.core.annotate import _scale, annotate, wrap
from internvl_ros.core.grounding import Box

CAPTION = ("A robot arm holds a red cup above a wooden table, next to a laptop showing a map "
           "of the warehouse and two boxes of screws; the light comes from a window on the left.")


@pytest.mark.parametrize("w, h", [(640, 480), (1920, 1080)])
def test_banner_and_boxes_drawn_on_a_copy(w, h):
    rgb = np.full((h, w, 3), (10, 120, 200), np.uint8)
    rgb[..., 0] = np.arange(w, dtype=np.uint8)[None, :]  # some texture
    before = rgb.copy()
    box = Box("cup", w * 0.5, h * 0.5, w * 0.75, h * 0.9)
    out = annotate(rgb, CAPTION, [box])
    assert np.array_equal(rgb, before), "the source frame must not change"
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    bgr = before[..., ::-1]
    # the banner: darkened, with white text pixels in it
    top = out[: h // 20]
    assert (top.astype(int).sum(-1) < bgr[: h // 20].astype(int).sum(-1)).mean() > 0.5
    # text pixels: bright in the darkened banner (antialiased, so not all of them pure white)
    assert (out[: h // 5] > 150).all(-1).sum() > 100, "caption text not drawn"
    # the box outline: its left edge differs from the source, mid-height
    x0, y = int(box.x_min), int((box.y_min + box.y_max) / 2)
    assert not np.array_equal(out[y, x0], bgr[y, x0])
    # far from banner and box, pixels are the source's (in BGR)
    assert np.array_equal(out[h - 5, 5], bgr[h - 5, 5])


@pytest.mark.parametrize("w", [640, 1920])
def test_caption_wraps_within_the_image(w):
    import cv2

    scale, thick = _scale(w)
    lines = wrap(CAPTION + " " + "x" * 300, w - 20, scale, thick)
    assert len(lines) > 1
    for line in lines:
        assert cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] <= w - 20
    assert " ".join(lines).replace(" ", "") == (CAPTION + "x" * 300).replace(" ", "")


def test_odd_text_and_boxes_outside_the_image():
    rgb = np.zeros((48, 64, 3), np.uint8)
    out = annotate(rgb, "中文 <script>\n\n", [Box("", -10, -10, 500, 500), Box("é", 0, 0, 0, 0)])
    assert out.shape == (48, 64, 3)
