"""Preallocated KV cache: one K and one V array of (layers, 1, max_ctx, kv_dim)."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Rows [0, filled) hold the keys/values of the tokens fed so far.

    Rows past `filled` are zero at first, later stale rows of earlier requests. A new request
    does not zero them (up to 470 MB on the host, 234 MB on the NPU): the host feeds only
    rows [0, filled), and the NPU's fixed-shape decode masks the rest with -65536, so a stale
    row adds exp(-65536 + s) * v = 0 as long as it is finite. Rows that may not be finite (a
    step failed, or the model produced non-finite logits: `taint()`) are zeroed by the next
    `reset()`.

    `listeners`: callables `(layer or None, start, stop)` told of every row range written or
    zeroed (the NPU rows feeder, core/kvfeed.py, tracks which rows its buffers hold).
    """

    def __init__(self, num_layers: int, max_ctx: int, kv_dim: int, dtype=np.float32):
        self.num_layers, self.max_ctx, self.kv_dim = num_layers, max_ctx, kv_dim
        self.k = np.zeros((num_layers, 1, max_ctx, kv_dim), dtype=dtype)  # (L, 1, ctx, kv_dim)
        self.v = np.zeros((num_layers, 1, max_ctx, kv_dim), dtype=dtype)  # (L, 1, ctx, kv_dim)
        self.filled = 0
        self._dirty = 0  # rows that may be non-zero
        self.tainted = False  # rows [0, _dirty) may hold non-finite values
        self.listeners: list = []

    @property
    def dtype(self):
        return self.k.dtype

    def view(self, layer: int, length: int):
        """Contiguous (1, length, kv_dim) views of the first `length` rows of a layer."""
        return self.k[layer, :, :length], self.v[layer, :, :length]

    def write(self, layer: int, start: int, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store (1, n, kv_dim) keys/values at rows [start, start + n)."""
        n = k_new.shape[1]
        if start + n > self.max_ctx:
            raise IndexError(f"KV cache holds {self.max_ctx} rows; cannot write rows "
                             f"[{start}, {start + n})")
        self.k[layer, :, start:start + n] = k_new  # (1, n, kv_dim)
        self.v[layer, :, start:start + n] = v_new  # (1, n, kv_dim)
        self._dirty = max(self._dirty, start + n)
        for changed in self.listeners:
            changed(layer, start, start + n)

    def taint(self) -> None:
        """Mark the used rows as possibly non-finite: the next reset() zeroes them."""
        self.tainted = True

    def reset(self, clear: bool = True) -> None:
        """Forget everything. `clear` zeroes the rows that were used (always done when the
        cache is tainted); without it the stale rows stay, finite."""
        if clear or self.tainted:
            self.k[:, :, :self._dirty] = 0
            self.v[:, :, :self._dirty] = 0
            for changed in self.listeners:
                changed(None, 0, self._dirty)
            self._dirty = 0
            self.tainted = False
        self.filled = 0
