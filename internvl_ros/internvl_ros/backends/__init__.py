"""Inference backends: a `Session` protocol and a registry of lazily imported backends.

    from internvl_ros.backends import get_backend
    backend = get_backend("onnxruntime", num_threads=2)
    session = backend.open("qwen3_p128_l0_together.onnx")

Backends are imported only when asked for, so `onnxruntime` or `axengine` need not be installed
unless used.
"""

from __future__ import annotations

import importlib
import inspect

from ..core.errors import BackendError
from .base import Backend, NodeInfo, Session

#: backend name -> "module:factory"; the factory takes keyword options and returns a Backend
BACKENDS = {
    "onnxruntime": "internvl_ros.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "axengine": "internvl_ros.backends.axengine_backend:AxEngineBackend",
}


def get_backend(name: str, **options) -> Backend:
    """Instantiate a registered backend by name (imports its module now). Options left at None
    are not passed; an option the backend does not take is a BackendError."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    module_name, factory = BACKENDS[name].split(":")
    module = importlib.import_module(module_name)
    make = getattr(module, factory)
    options = {k: v for k, v in options.items() if v is not None}
    takes = inspect.signature(make).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        odd = sorted(set(options) - set(takes))
        if odd:
            raise BackendError(f"the {name} backend does not take {', '.join(odd)} (it takes "
                               f"{', '.join(takes) or 'no options'})")
    return make(**options)


__all__ = ["BACKENDS", "Backend", "NodeInfo", "Session", "get_backend"]
