"""The Session protocol every backend implements (modeled on onnxruntime / pyaxengine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class NodeInfo:
    """One model input or output: name, shape (None for a dynamic dim) and numpy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


class Session(Protocol):
    """One loaded model file.

    `dynamic_shapes`: True when inputs may take any size along dynamic dims (onnxruntime);
    False when every shape is fixed per shape group (NPU). `num_shape_groups` is 1 for
    dynamic sessions.
    """

    path: str
    dynamic_shapes: bool
    num_shape_groups: int

    def get_inputs(self, shape_group: int = 0) -> list[NodeInfo]: ...

    def get_outputs(self, shape_group: int = 0) -> list[NodeInfo]: ...

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray],
            shape_group: int = 0) -> list[np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Opens model files of one kind (`file_extension`) as Sessions."""

    name: str
    file_extension: str

    def open(self, path: str, role: str | None = None) -> Session:
        """A session for one model file; `role` ("layer", "post", "vit") may tune it."""
        ...
