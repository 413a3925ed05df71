"""InternVL grounding: the `locate` prompt, and `<ref>…</ref><box>[[…]]</box>` spans in answers.

InternVL answers a grounding question with spans like

    <ref>the red cup</ref><box>[[120, 455, 310, 700]]</box>
    <ref>chairs</ref><box>[[10, 20, 30, 40], [50, 60, 70, 80]]</box>

Box coordinates are x1, y1, x2, y2 normalised to 0..1000 over the whole source image (InternVL
scales its grounding data that way), so tiling does not change them: a box maps to pixels by
x * width / 1000 and y * height / 1000, whatever grid the image was tiled into.

`parse_grounding` never raises on model output: malformed spans are skipped and counted, and the
markup is removed from the text either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
GROUNDING_TOKENS = (REF_START, REF_END, BOX_START, BOX_END)
#: InternVL's coordinate scale: boxes are in [0, SCALE] along each axis of the source image
SCALE = 1000.0
#: InternVL's grounding question; the phrase goes between <ref> and </ref> (inserted by id)
LOCATE_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes: "
MAX_PHRASE_CHARS = 512

_NUMBER = r"-?\d+(?:\.\d+)?"
# a ref (optional) followed by a box; the box body is checked separately so a bad one is counted
_SPAN = re.compile(r"(?:<ref>(?P<label>.*?)</ref>\s*)?<box>(?P<body>.*?)</box>", re.DOTALL)
_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_TAG = re.compile(r"</?(?:ref|box|quad)>")


@dataclass(frozen=True)
class Box:
    """One grounded box in source-image pixels (x right, y down; min <= max)."""

    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def to_dict(self) -> dict:
        return {"label": self.label, "x_min": self.x_min, "y_min": self.y_min,
                "x_max": self.x_max, "y_max": self.y_max}


@dataclass(frozen=True)
class Grounding:
    """An answer split into plain text and boxes."""

    text: str  # the answer with the markup removed (ref phrases kept as words)
    boxes: tuple[Box, ...]
    malformed: int  # spans that looked like boxes but could not be read


def parse_grounding(text: str, width: int, height: int) -> Grounding:
    """Find every ref/box span in `text`; map boxes to a `width` x `height` source image."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"grounding needs the source image size, got {width}x{height}")
    boxes: list[Box] = []
    malformed = 0
    pieces: list[str] = []
    pos = 0
    for m in _SPAN.finditer(text):
        pieces.append(text[pos:m.start()])
        pos = m.end()
        label = (m.group("label") or "").strip()
        if label:
            pieces.append(label)
        found, bad = _read_boxes(m.group("body"))
        malformed += bad
        for x1, y1, x2, y2 in found:
            boxes.append(_to_pixels(label, x1, y1, x2, y2, width, height))
    pieces.append(text[pos:])
    rest = "".join(pieces)
    # unmatched tags (a ref without a box is fine: its phrase stays; a lone <box> is malformed)
    malformed += len(re.findall(r"<box>", rest))
    clean = _TAG.sub("", rest)
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip()
    return Grounding(clean, tuple(boxes), malformed)


def _read_boxes(body: str) -> tuple[list[tuple[float, ...]], int]:
    """The [x1, y1, x2, y2] lists inside one <box>…</box>, and how many items were unreadable."""
    body = body.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return [], 1
    inner = body[1:-1].strip()
    found, bad = [], 0
    # split the outer list into its bracketed items; anything left between them is an error
    pos = 0
    for m in re.finditer(r"\[[^\[\]]*\]", inner):
        gap = inner[pos:m.start()].strip().strip(",").strip()
        if gap:
            bad += 1
        pos = m.end()
        nums = _BOX.fullmatch(m.group(0))
        if nums is None:
            bad += 1
            continue
        x1, y1, x2, y2 = (float(v) for v in nums.groups())
        found.append((x1, y1, x2, y2))
    if inner[pos:].strip().strip(","):
        bad += 1
    if not found and not bad:
        bad = 1  # "<box>[]</box>"
    return found, bad


def _to_pixels(label: str, x1: float, y1: float, x2: float, y2: float,
               width: int, height: int) -> Box:
    def px(v: float, size: int) -> float:
        return float(min(max(v, 0.0), SCALE) * size / SCALE)

    xa, xb = sorted((px(x1, width), px(x2, width)))
    ya, yb = sorted((px(y1, height), px(y2, height)))
    return Box(label, xa, ya, xb, yb)


def check_phrase(phrase: str) -> str:
    """A `locate` phrase, stripped; a clear error for one that cannot be a phrase."""
    phrase = phrase.strip()
    if not phrase:
        raise ConfigError("locate: the phrase is empty; give the thing to find, e.g. 'the red cup'")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise ConfigError(f"locate: the phrase is {len(phrase)} characters; at most "
                          f"{MAX_PHRASE_CHARS} are accepted")
    return phrase


def decode_with_markup(tokenizer, ids) -> str:
    """Decode generated ids keeping the grounding tags, which InternVL's tokenizer may mark as
    special (and so skip when decoding): runs between tags are decoded as usual."""
    tag_of = {tokenizer.token_to_id(t): t for t in GROUNDING_TOKENS}
    tag_of.pop(None, None)
    out: list[str] = []
    run: list[int] = []
    for tid in ids:
        tid = int(tid)
        if tid in tag_of:
            out.append(tokenizer.decode(run))
            out.append(tag_of[tid])
            run = []
        else:
            run.append(tid)
    out.append(tokenizer.decode(run))
    return "".join(out)


def has_markup(tokenizer, ids) -> bool:
    """True when `ids` hold a grounding tag token (then `decode_with_markup` is worth it)."""
    tags = {tokenizer.token_to_id(t) for t in GROUNDING_TOKENS}
    return any(int(t) in tags for t in ids)
