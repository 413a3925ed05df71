"""Draw a caption and its grounded boxes onto a frame (for rviz2, rqt_image_view, Foxglove).

    bgr = annotate(rgb, "A red cup on a table.", boxes)   # (H, W, 3) uint8 BGR, a new array

The caption goes in a darkened banner across the top, word-wrapped to the image width, with a
font scaled to the image so it stays readable from 640x480 to 1920x1080 and beyond. Boxes are
outlined with their labels. The source frame is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .grounding import Box

FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOUR = (255, 255, 255)  # BGR
BOX_COLOURS = ((0, 200, 255), (80, 255, 80), (255, 160, 40), (200, 80, 255), (0, 80, 255))
MAX_LINES = 6


def _scale(width: int) -> tuple[float, int]:
    """Font scale and stroke for an image `width` pixels wide: about 70 characters a line."""
    scale = max(0.4, width / 1300.0)
    return scale, max(1, int(round(scale * 1.6)))


def wrap(text: str, max_width: int, scale: float, thickness: int) -> list[str]:
    """Split `text` into lines no wider than `max_width` pixels (long words are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while cv2.getTextSize(word, FONT, scale, thickness)[0][0] > max_width and len(word) > 1:
                # cut an over-long word where it still fits
                cut = len(word) - 1
                while cut > 1 and cv2.getTextSize(word[:cut], FONT, scale, thickness)[0][0] \
                        > max_width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only: other characters become '?'."""
    return text.encode("ascii", "replace").decode("ascii")


def annotate(rgb: np.ndarray, caption: str, boxes: Sequence[Box] = (),
             rgb_input: bool = True) -> np.ndarray:
    """A BGR copy of `rgb` (H, W, 3) uint8 with the caption banner and the boxes drawn."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb_input else rgb.copy()  # (H, W, 3)
    h, w = img.shape[:2]
    scale, thick = _scale(w)
    margin = max(4, int(8 * scale))
    (_, text_h), baseline = cv2.getTextSize("Ag", FONT, scale, thick)
    line_h = text_h + baseline + margin // 2

    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        p1 = (int(round(box.x_min)), int(round(box.y_min)))
        p2 = (int(round(box.x_max)), int(round(box.y_max)))
        cv2.rectangle(img, p1, p2, colour, max(2, thick))
        if box.label:
            label = _ascii(box.label)[:60]
            (tw, th), bl = cv2.getTextSize(label, FONT, scale * 0.8, thick)
            y = p1[1] - bl - 2 if p1[1] - th - bl - 2 >= 0 else p1[1] + th + 2
            cv2.rectangle(img, (p1[0], y - th - 2), (p1[0] + tw + 4, y + bl), colour, -1)
            cv2.putText(img, label, (p1[0] + 2, y), FONT, scale * 0.8, (0, 0, 0), thick,
                        cv2.LINE_AA)

    lines = wrap(_ascii(caption), w - 2 * margin, scale, thick)
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [lines[MAX_LINES - 1] + " ..."]
    banner = min(h, margin + line_h * len(lines))
    region = img[:banner]  # (banner, W, 3) view
    region[:] = (region.astype(np.uint16) * 3 // 10).astype(np.uint8)  # darken to 30%
    for k, line in enumerate(lines):
        y = margin // 2 + text_h + k * line_h
        cv2.putText(img, line, (margin, y), FONT, scale, TEXT_COLOUR, thick, cv2.LINE_AA)
    return img
