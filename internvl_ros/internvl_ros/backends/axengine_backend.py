"""axengine backend (Axera pyaxengine): fixed shapes per shape group, bfloat16 I/O.

`axengine` is imported lazily; without an NPU (or the pyaxengine wheel) it raises ImportError,
which becomes a BackendError that says what to install.

Each session also offers `kv_rows`: an object that writes KV rows straight into pyaxengine's
persistent input buffers (`backends/axengine_rows.py`, the only door to pyaxengine's
internals), or None with the reason in `kv_rows_reason`. The core decides whether to use it
(`kv_feed`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.errors import BackendError, ConfigError, ModelDirError
from . import axengine_rows
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

    def __init__(self, path: str, provider: str | None = None, device_id: int | None = None,
                 role: str | None = None):
        axengine = import_axengine()
        if not os.path.isfile(path):
            raise ModelDirError(f"model file {path} does not exist")
        kwargs = {"providers": [provider]} if provider else {}
        if device_id is not None:
            kwargs["provider_options"] = [{"device_id": int(device_id)}]
        try:
            self._sess = axengine.InferenceSession(path, **kwargs)
        except Exception as exc:
            raise BackendError(_load_error(path, exc)) from None
        self.path = path
        self.provider = provider or _provider_of(self._sess)
        self.num_shape_groups = _count_shape_groups(self._sess)
        groups = range(self.num_shape_groups)
        raw_in = [self._sess.get_inputs(g) for g in groups]
        raw_out = [self._sess.get_outputs(g) for g in groups]
        self._inputs = [self._nodes(a) for a in raw_in]
        self._outputs = [self._nodes(a) for a in raw_out]
        self.kv_rows, self.kv_rows_reason = None, "not a decoder layer"
        if role in (None, "layer") and any(n.name == "K_cache" for n in self._inputs[0]):
            self.kv_rows, self.kv_rows_reason = axengine_rows.open_rows(
                self._sess, self.provider, raw_in, raw_out)

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
        """Release what pyaxengine allows: its context-manager exit destroys the model handle
        (AxEngine) or frees the card's buffers and unloads the model (AXCL). pyaxengine never
        frees the board's CMM input/output buffers; the rows door frees them when it knows the
        layout, otherwise they stay allocated until the process exits."""
        sess, self._sess = self._sess, None
        if sess is None:
            return
        try:
            exit_ = getattr(sess, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
            if self.kv_rows is not None:
                self.release_note = self.kv_rows.release()
        except Exception:  # closing must not raise; the process frees the rest at exit
            pass
        self.kv_rows = None


def _provider_of(sess) -> str | None:
    try:
        p = sess.get_providers()
    except Exception:
        return None
    return p[0] if isinstance(p, (list, tuple)) and p else p


def _load_error(path: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "Unsupported data type" in text or "bfloat16" in text.lower():
        return (f"axengine could not load {path}: {text}. This Axera SDK (or pyaxengine) does "
                "not support bfloat16, which the InternVL3.5 build uses for its layer inputs: "
                "upgrade to AX650 SDK 2.18 or newer (and the latest pyaxengine wheel)")
    return f"axengine could not load {path}: {text}"


class AxEngineBackend:
    """Opens .axmodel files. `provider`: AxEngineExecutionProvider (board) or
    AXCLRTExecutionProvider (M.2 card); default: axengine's first available. `device_id`
    picks the M.2 card (pyaxengine's provider_options); it implies AXCLRTExecutionProvider."""

    name = "axengine"
    file_extension = ".axmodel"

    def __init__(self, provider: str | None = None, num_threads: int | None = None,
                 device_id: int | None = None):
        if provider is not None and provider not in PROVIDERS:
            raise BackendError(f"unknown axengine provider '{provider}'; use one of "
                               f"{', '.join(PROVIDERS)}")
        if device_id is not None:
            if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
                raise ConfigError(f"device_id={device_id!r} must be an integer >= 0 (the M.2 "
                                  "card's index), or None")
            if provider == PROVIDERS[0]:
                raise ConfigError("device_id selects an M.2 card (AXCLRTExecutionProvider); "
                                  "the board's own NPU (AxEngineExecutionProvider) has none")
            provider = PROVIDERS[1]
        import_axengine()  # fail early with the install hint
        self.provider = provider
        self.device_id = device_id

    def open(self, path: str, role: str | None = None) -> AxEngineSession:
        return AxEngineSession(str(path), provider=self.provider, device_id=self.device_id,
                               role=role)
