"""The image work of a request, done once per frame: `EncodedFrame` and the `FrameCache`.

An `EncodedFrame` holds a request's images preprocessed into tiles, then (after the first
prefill that needs them) their ViT embeddings; the pixels are dropped once encoded. The
pipeline keys its KV-prefix reuse on the EncodedFrame object, so every question asked about one
EncodedFrame shares the rows of the system prompt and the image block.

The `FrameCache` keeps recent EncodedFrames by a caller-supplied frame key (e.g. `(camera,
stamp, arrival)`): a later request on a frame that was already encoded skips preprocessing and
the ViT (and, when nothing ran in between, the prefill of the shared prefix). It is an LRU
bounded by the bytes of the embeddings it holds (1 MB per tile for InternVL3.5-1B: 256 x 1024
float32) and, optionally, by a number of frames: a caller that can only ever ask again about a
few frames (the ROS node: the latest frame of each camera) says so, and the cache does not fill
its byte budget with frames nobody can name any more. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

#: default bound of a pipeline's frame cache: 64 frames of one tile for InternVL3.5-1B
DEFAULT_FRAME_CACHE_BYTES = 64 << 20


@dataclass(eq=False)
class EncodedFrame:
    """The images of one request: tiles per image, pixels until encoded, then the ViT's
    embeddings. Compared by identity (it stands for one frame's content)."""

    tiles: tuple[int, ...]  # tiles per image
    video: bool
    shapes: tuple[tuple[int, ...], ...]  # (H, W, 3) of each source image (a key sanity check)
    pixels: np.ndarray | None  # (n_tiles, 3, S, S) until encoded
    features: np.ndarray | None = None  # (n_tiles * tokens, hidden) float32 once encoded
    key: Hashable | None = None  # the cache key, when the caller gave a frame key

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles)

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else int(self.features.nbytes)


class FrameCache:
    """LRU of EncodedFrames by key, holding at most `max_bytes` of embeddings (0 = off) and at
    most `max_frames` frames (None = no count bound)."""

    def __init__(self, max_bytes: int = DEFAULT_FRAME_CACHE_BYTES, max_frames: int | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"frame_cache_bytes={max_bytes!r} must be an integer >= 0 "
                              "(0 turns the frame cache off)")
        if max_frames is not None and (isinstance(max_frames, bool)
                                       or not isinstance(max_frames, int) or max_frames < 0):
            raise ConfigError(f"frame_cache_frames={max_frames!r} must be None (no count "
                              "bound) or an integer >= 0 (0 turns the frame cache off)")
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self._frames: OrderedDict[Hashable, EncodedFrame] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def check_key(key) -> None:
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"frame_key {key!r} must be hashable, e.g. a tuple "
                              "(camera, stamp, arrival)") from None

    def get(self, key: Hashable) -> EncodedFrame | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is None:
                self.misses += 1
                return None
            self._frames.move_to_end(key)
            self.hits += 1
            return frame

    def put(self, key: Hashable, frame: EncodedFrame) -> None:
        """Store an encoded frame (evicting the least recently used ones to fit); a frame
        larger than the whole cache is not stored."""
        size = frame.nbytes
        count = self.max_frames
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if frame.features is None or size > self.max_bytes or count == 0:
                return
            while self._frames and (self._bytes + size > self.max_bytes
                                    or (count is not None and len(self._frames) >= count)):
                _, evicted = self._frames.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._frames[key] = frame
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._bytes
