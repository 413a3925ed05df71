"""Preallocated KV cache: one K and one V array of (layers, 1, max_ctx, kv_dim)."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Rows [0, filled) hold the keys/values of the tokens fed so far; rows past `filled` are
    zero (the NPU's fixed-shape decode feeds the whole cache and masks them)."""

    def __init__(self, num_layers: int, max_ctx: int, kv_dim: int, dtype=np.float32):
        self.num_layers, self.max_ctx, self.kv_dim = num_layers, max_ctx, kv_dim
        self.k = np.zeros((num_layers, 1, max_ctx, kv_dim), dtype=dtype)  # (L, 1, ctx, kv_dim)
        self.v = np.zeros((num_layers, 1, max_ctx, kv_dim), dtype=dtype)  # (L, 1, ctx, kv_dim)
        self.filled = 0
        self._dirty = 0  # rows that may be non-zero

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

    def reset(self) -> None:
        """Forget everything; zero only the rows that were used."""
        self.k[:, :, :self._dirty] = 0
        self.v[:, :, :self._dirty] = 0
        self.filled = 0
        self._dirty = 0
