"""axengine backend (Axera pyaxengine): fixed shapes per shape group, bfloat16 I/O.

`axengine` is imported lazily; without an NPU (or the pyaxengine wheel) it raises ImportError,
which becomes a BackendError that says what to install.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.errors import BackendError, ModelDirError
from .base import NodeInfo

PROVIDERS = ("AxEngineExecutionProvider", "AXCLRTExecutionProvider")
_MAX_GROUPS = 256


def import_axengine():
    """`import axengine`, turning any failure into an actionable BackendError."""
    try:
        import axengine
    except Exception as exc:  # ImportError without a provider; OSError/RuntimeError at init
        raise BackendError(
            f"the axengine backend is not available ({type(exc).__name__}: {exc}). On the "
            "AX650N board (or a host with an Axera M.2 card) install Axera's pyaxengine wheel "
            "(pip install axengine-*.whl from the AXERA-TECH/pyaxengine releases); on a PC "
            "use --backend onnxruntime with an exported model dir") from None
    return axengine


def _count_shape_groups(sess) -> int:
    inner = getattr(sess, "_sess", None)
    count = getattr(inner, "_shape_count", None)
    if isinstance(count, int) and count > 0:
        return count
    n = 0
    while n < _MAX_GROUPS:  # pyaxengine raises ValueError/IndexError past the last group
        try:
            sess.get_inputs(n)
        except (ValueError, IndexError):
            break
        n += 1
    return max(n, 1)


class AxEngineSession:
    """A Session over axengine.InferenceSession (fixed shapes per shape group)."""

    dynamic_shapes = False

    def __init__(self, path: str, provider: str | None = None):
        axengine = import_axengine()
        if not os.path.isfile(path):
            raise ModelDirError(f"model file {path} does not exist")
        kwargs = {"providers": [provider]} if provider else {}
        try:
            self._sess = axengine.InferenceSession(path, **kwargs)
        except Exception as exc:
            raise BackendError(f"axengine could not load {path}: {exc}") from None
        self.path = path
        self.num_shape_groups = _count_shape_groups(self._sess)
        self._inputs = [self._nodes(self._sess.get_inputs(g)) for g in range(self.num_shape_groups)]
        self._outputs = [self._nodes(self._sess.get_outputs(g))
                         for g in range(self.num_shape_groups)]

    @staticmethod
    def _nodes(args) -> list[NodeInfo]:
        return [NodeInfo(a.name, tuple(int(d) for d in a.shape), np.dtype(a.dtype)) for a in args]

    def _check_group(self, shape_group: int) -> None:
        if not 0 <= shape_group < self.num_shape_groups:
            raise BackendError(f"{self.path}: shape group {shape_group} out of range "
                               f"(the model has {self.num_shape_groups})")

    def get_inputs(self, shape_group: int = 0) -> list[NodeInfo]:
        self._check_group(shape_group)
        return list(self._inputs[shape_group])

    def get_outputs(self, shape_group: int = 0) -> list[NodeInfo]:
        self._check_group(shape_group)
        return list(self._outputs[shape_group])

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray],
            shape_group: int = 0) -> list[np.ndarray]:
        names = list(output_names) if output_names else None
        return self._sess.run(names, feed, shape_group=shape_group)

    def close(self) -> None:
        self._sess = None


class AxEngineBackend:
    """Opens .axmodel files. `provider`: AxEngineExecutionProvider (board) or
    AXCLRTExecutionProvider (M.2 card); default: axengine's first available."""

    name = "axengine"
    file_extension = ".axmodel"

    def __init__(self, provider: str | None = None, num_threads: int | None = None):
        if provider is not None and provider not in PROVIDERS:
            raise BackendError(f"unknown axengine provider '{provider}'; use one of "
                               f"{', '.join(PROVIDERS)}")
        import_axengine()  # fail early with the install hint
        self.provider = provider

    def open(self, path: str, role: str | None = None) -> AxEngineSession:
        return AxEngineSession(str(path), provider=self.provider)
