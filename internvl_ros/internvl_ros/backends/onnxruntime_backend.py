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


def _session_options(num_threads: int | None, spinning: bool, low_memory: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    spin = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.intra_op_num_threads = int(num_threads) if num_threads else 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # No memory patterns: onnxruntime keeps one for every set of input shapes a session has run,
    # for the life of the session, and a layer's inputs change shape at every decode step (the
    # past length). On the tiny test model one generation to the end of the context (1,600
    # steps) left 6.3 MB of them behind, taken when a node first saw such a request (issue 16's
    # soak: a node's RSS rose 6 MB at minute 6); without them that generation leaves 1.0 MB
    # (the KV cache rows it wrote), at the same decode speed.
    opts.enable_mem_pattern = False
    if low_memory:
        # For the ViT, run once per image: no prepacked second copy of its weights and no
        # arena holding its activations between requests (-0.6 GB peak RSS at full size,
        # not slower). Not for the layers: prepacking is what makes int4 decode fast.
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
    return opts


def _inference_session(path: str, opts, providers):
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise ModelDirError(f"model file {path} does not exist")
    try:
        return ort.InferenceSession(
            path, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"onnxruntime could not load {path}: {exc}. Re-export the "
                           "model dir (internvl-export)") from None


class OnnxRuntimeSession:
    """A Session over onnxruntime.InferenceSession (dynamic shapes, one shape group)."""

    dynamic_shapes = True
    num_shape_groups = 1

    def __init__(self, path: str, providers: Sequence | None = None,
                 num_threads: int | None = None, low_memory: bool = False):
        # One session per layer: spinning worker threads of 28 idle sessions starve the one
        # that runs (about 6x slower decode on 2 cores). Never spin.
        opts = _session_options(num_threads, spinning=False, low_memory=low_memory)
        self._sess = _inference_session(path, opts, providers)
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


class OnnxRuntimeKVSession:
    """The host layout's one graph (export `--layout host`) with its KV cache kept inside
    onnxruntime: one OrtValue per layer and K/V, bound through IOBinding both to the
    `past_key_values.{i}.*` input and the `present.{i}.*` output, so GroupQueryAttention appends
    the new rows in place. A step feeds only the new rows' embeddings and two int32 scalars and
    reads one logits row. Implements core.host_llm.KVSession.
    """

    def __init__(self, path: str, providers: Sequence | None = None,
                 num_threads: int | None = None, spinning: bool = False):
        import onnxruntime as ort

        self._sess = _inference_session(
            path, _session_options(num_threads, spinning=spinning), providers)
        self._ort = ort
        self.path = path
        meta = self._sess.get_modelmeta().custom_metadata_map
        inputs = {a.name: a for a in self._sess.get_inputs()}
        outputs = {a.name: a for a in self._sess.get_outputs()}
        if meta.get("internvl_ros.layout") != "host_lm" or "inputs_embeds" not in inputs:
            raise ModelDirError(f"{path} is not a host-layout language model (internvl-export "
                                "--layout host)")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values."))// 2
        self._pairs = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}")
                       for i in range(self.num_layers) for kv in ("key", "value")]
        missing = [n for pair in self._pairs for n in pair if n not in inputs | outputs]
        if missing:
            raise ModelDirError(f"{path}: host graph lacks {missing}; re-export it")
        _, self.kv_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.hidden = inputs["inputs_embeds"].shape[-1]
        self.vocab = outputs["logits"].shape[-1]
        self.max_positions = int(meta.get("internvl_ros.max_positions", 0)) or None
        self.rows = 0
        self._cache: list = []
        self._io = None
        self._seqlens = np.zeros(1, np.int32)  # (1,) past + n - 1
        self._total = np.zeros((), np.int32)  # () past + n
        self._logits = np.zeros((1, 1, self.vocab), np.float32)  # (1, 1, vocab)

    def allocate(self, rows: int) -> None:
        """(Re)allocate a zeroed cache of `rows` rows per layer and bind everything."""
        ort = self._ort
        self._cache = [ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, self.kv_heads, rows, self.head_dim), np.float32))  # (1, KVH, rows, D)
            for _ in self._pairs]
        io = self._sess.io_binding()
        for (past, present), value in zip(self._pairs, self._cache, strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self._seqlens))
        io.bind_ortvalue_input("total_sequence_length",
                               ort.OrtValue.ortvalue_from_numpy(self._total))
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self._io, self.rows = io, rows

    def clear(self) -> None:
        """Zero every cache row (after a failure or non-finite output)."""
        for value in self._cache:
            value.numpy()[...] = 0  # numpy() of a CPU OrtValue shares its memory

    def step(self, embeds: np.ndarray, past: int) -> np.ndarray:
        """Run rows (1, n, hidden) at positions [past, past + n); return the logits (vocab,)
        of the last row (a copy: the bound buffer is overwritten by the next step)."""
        n = embeds.shape[1]
        self._seqlens[0] = past + n - 1
        self._total[...] = past + n
        self._io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        self._sess.run_with_iobinding(self._io)
        return self._logits.reshape(-1).copy()  # (vocab,)

    def close(self) -> None:
        self._io, self._cache, self._sess = None, [], None


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
        # The host graph's pool may spin between kernels (the per-layer sessions never do).
        # Off by default: on a loaded machine spinning threads fight the other processes for
        # the cores (decode 2.1 vs 7.1 tok/s measured under load; docs/PERFORMANCE.md).
        self.spinning = False

    def open(self, path: str, role: str | None = None):
        if role == "host_lm":
            return OnnxRuntimeKVSession(str(path), providers=self.providers,
                                        num_threads=self.num_threads, spinning=self.spinning)
        return OnnxRuntimeSession(str(path), providers=self.providers,
                                  num_threads=self.num_threads, low_memory=(role == "vit"))
