"""onnxruntime backend: dynamic shapes, one InferenceSession per model file."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.errors import BackendError, ConfigError, ModelDirError
from .base import NodeInfo

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def _node(arg) -> NodeInfo:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise BackendError(f"onnxruntime: input/output '{arg.name}' has unsupported type "
                           f"{arg.type}")
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return NodeInfo(arg.name, shape, np.dtype(dtype))


class OnnxRuntimeSession:
    """A Session over onnxruntime.InferenceSession (dynamic shapes, one shape group)."""

    dynamic_shapes = True
    num_shape_groups = 1

    def __init__(self, path: str, providers: Sequence | None = None,
                 num_threads: int | None = None, low_memory: bool = False):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise ModelDirError(f"model file {path} does not exist")
        opts = ort.SessionOptions()
        # One session per layer: spinning worker threads of 28 idle sessions starve the one
        # that runs (about 6x slower decode on 2 cores). Never spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.intra_op_num_threads = int(num_threads) if num_threads else 0
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if low_memory:
            # For the ViT, run once per image: no prepacked second copy of its weights and no
            # arena holding its activations between requests (-0.6 GB peak RSS at full size,
            # not slower). Not for the layers: prepacking is what makes int4 decode fast.
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.enable_cpu_mem_arena = False
        try:
            self._sess = ort.InferenceSession(
                path, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime could not load {path}: {exc}. Re-export the "
                               "model dir (internvl-export)") from None
        self.path = path
        self._inputs = [_node(a) for a in self._sess.get_inputs()]
        self._outputs = [_node(a) for a in self._sess.get_outputs()]

    def get_inputs(self, shape_group: int = 0) -> list[NodeInfo]:
        return list(self._inputs)

    def get_outputs(self, shape_group: int = 0) -> list[NodeInfo]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray],
            shape_group: int = 0) -> list[np.ndarray]:
        if shape_group != 0:
            raise BackendError(f"{self.path}: onnxruntime sessions have one shape group, "
                               f"got shape_group={shape_group}")
        return self._sess.run(list(output_names) if output_names else None, feed)

    def close(self) -> None:
        self._sess = None


class OnnxRuntimeBackend:
    """Opens .onnx files. `provider`: an execution provider name or list (default CPU);
    `num_threads`: intra-op threads per session (default: onnxruntime's choice)."""

    name = "onnxruntime"
    file_extension = ".onnx"

    def __init__(self, provider=None, num_threads: int | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendError(f"onnxruntime is not installed ({exc}); pip install "
                               "onnxruntime") from None
        if isinstance(provider, str):
            provider = [provider]
        self.providers = provider
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError(f"num_threads={num_threads!r} must be an integer >= 1")
        self.num_threads = num_threads

    def open(self, path: str, role: str | None = None) -> OnnxRuntimeSession:
        return OnnxRuntimeSession(str(path), providers=self.providers,
                                  num_threads=self.num_threads, low_memory=(role == "vit"))
