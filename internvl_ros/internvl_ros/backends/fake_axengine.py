"""A test double of Axera's `axengine` (pyaxengine) that runs the exported ONNX models.

It enforces pyaxengine's contract exactly, so the NPU code path (fixed shape groups, bfloat16,
dummy first-slice cache, padded slices) runs in CI without an NPU:

- `InferenceSession(path, providers=..., provider_options=...)` loads a fake `.axmodel` (a
  small JSON manifest naming the ONNX file and the shape groups);
- `get_inputs(g)` / `get_outputs(g)` return NodeArgs with `.name`, `.shape`, `.dtype`;
- `run(output_names, input_feed, run_options=None, shape_group=0)` raises
  ValueError "Required inputs ([...]) are missing from input feed (...)" for a missing input,
  ValueError for a shape group out of range, and AssertionError
  "model inputs(NAME) expect shape ... and dtype ..." for a wrong shape or dtype; it returns a
  list of copies.

It also has pyaxengine's buffers and internal structure (read in AXERA-TECH/pyaxengine,
`axengine/_session.py`, `_axe.py`, `_axe_capi.py`, `_axclrt.py`, `_axclrt_capi.py`):

- `InferenceSession._sess` is the provider's session. On AxEngineExecutionProvider it has
  `_io[0].pInputs[i]` / `pOutputs[i]` with `phyAddr`, `pVirAddr`, `nSize`: one persistent
  buffer per input and output, sized for the largest shape group; `_handle`, `_context`,
  `_shape_count`. `axengine._axe_capi` has `engine_cffi`, `engine_lib`, `sys_lib`.
- `run()` does what pyaxengine's does: memmove every fed input to the start of its buffer,
  `AX_SYS_MflushCache` over the whole buffer, `AX_ENGINE_RunGroupIOSync`, then
  `AX_SYS_MinvalidateCache` and a copy of each output. The model computes from what the NPU
  sees: the bytes flushed from the CPU's view of the buffer to the "device" copy. Unflushed
  writes are invisible to it, as on the board.
- On AXCLRTExecutionProvider (the M.2 card) `_sess` has `_io` (an `axclrtEngineIO`),
  `_model_id`, `_context_id`, `_thread_context`; buffers live in device memory, reached only
  through `axclrt_lib.axclrtMemcpy` (`axengine._axclrt_capi`). `provider_options=[{"device_id":
  n}]` picks the card (`devices` cards exist).

Pointers are real addresses of numpy memory (device memory has addresses of its own), so
offsets are checked: a write outside a buffer raises. `counters` totals the bytes written into
input buffers, flushed, and copied to the card.

    from internvl_ros.backends import fake_axengine
    fake_axengine.make_fake_axera_dir(host_onnx_dir, out_root, kv_cache_len=511)
    with fake_axengine.installed():
        pipe = Pipeline.from_model_dir(out_root, backend="axengine")

`installed(bf16=False)` is an SDK older than bfloat16 support; `installed(internals=False)` is a
pyaxengine without the internal structure above (no `_io`, no `_axe_capi`).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import shutil
import sys
import time
import types
from pathlib import Path

import ml_dtypes
import numpy as np

FORMAT = "internvl_ros.fake_axmodel"
PROVIDERS = ["AxEngineExecutionProvider", "AXCLRTExecutionProvider"]
BF16 = np.dtype(ml_dtypes.bfloat16)
#: the published AXERA-TECH InternVL3_5-1B build: 9 prefill groups of 128 (prompts <= 1152)
PUBLISHED_MAX_PREFILL = 1152
PUBLISHED_KV_CACHE_LEN = 2047


class NodeArg:
    """As axengine.NodeArg: name, dtype (numpy dtype), shape (tuple of ints)."""

    def __init__(self, name: str, dtype, shape):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)

    def __repr__(self):
        return f"NodeArg({self.name!r}, {self.dtype}, {self.shape})"


class SessionOptions:
    pass


def _dtype(name: str) -> np.dtype:
    return BF16 if name == "bfloat16" else np.dtype(name)


# --------------------------------------------------------------------------------------------
# memory: CMM buffers (a CPU view + what the NPU sees) and the card's device memory


class Counters:
    """Bytes written into input buffers (memmove / host-to-device copies), flushed, read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.input_bytes = 0
        self.flushed_bytes = 0
        self.output_bytes = 0
        self.runs = 0
        self.npu_s = 0.0  # time inside the emulated NPU (the model's computation)

    def snapshot(self) -> dict:
        return {"input_bytes": self.input_bytes, "flushed_bytes": self.flushed_bytes,
                "output_bytes": self.output_bytes, "runs": self.runs, "npu_s": self.npu_s}


counters = Counters()


class _Ptr:
    """A `void *` / `char *` cdata: an address; `ptr + n` offsets it as char* arithmetic."""

    __slots__ = ("addr",)

    def __init__(self, addr: int):
        self.addr = int(addr)

    def __add__(self, n):
        return _Ptr(self.addr + int(n))

    def __int__(self):
        return self.addr

    def __index__(self):
        return self.addr

    def __eq__(self, other):
        return isinstance(other, _Ptr) and other.addr == self.addr

    def __hash__(self):
        return hash(self.addr)

    def __repr__(self):
        return f"<fake cdata 'void *' 0x{self.addr:x}>"


NULL = _Ptr(0)


class _Buffer:
    """One allocation: `device` is what the NPU reads and writes; CMM buffers also have `cpu`,
    the CPU's cached view at `vir` (flush copies cpu -> device, invalidate device -> cpu)."""

    def __init__(self, size: int, is_input: bool, cmm: bool, device_addr: int):
        self.size = int(size)
        self.is_input = is_input
        self.device = np.zeros(self.size, np.uint8)
        # fresh CMM is not zeroed on the board: garbage that is not even finite as bfloat16
        self.device[:] = 0xFF
        self.cpu = self.device.copy() if cmm else None
        self.phy = device_addr
        self.vir = int(self.cpu.ctypes.data) if cmm else None
        self.freed = False


class _Memory:
    """Address lookup for the buffers of every fake session: CPU views and device memory."""

    def __init__(self):
        self._views: dict[str, tuple[list[int], list[_Buffer]]] = {"cpu": ([], []),
                                                                   "device": ([], [])}
        self._next_phy = 0x1_0000_0000

    def alloc(self, size: int, is_input: bool, cmm: bool) -> _Buffer:
        buf = _Buffer(size, is_input, cmm, self._next_phy)
        self._next_phy += (max(size, 1) + 0xFFFF) & ~0xFFFF
        self._add("device", buf.phy, buf)
        if cmm:
            self._add("cpu", buf.vir, buf)
        return buf

    def _add(self, view, start, buf):
        starts, bufs = self._views[view]
        i = bisect.bisect(starts, start)
        starts.insert(i, start)
        bufs.insert(i, buf)

    def free(self, buf: _Buffer) -> None:
        for starts, bufs in self._views.values():
            for i in reversed(range(len(bufs))):
                if bufs[i] is buf:
                    del starts[i], bufs[i]
        buf.freed = True

    def find(self, addr: int, n: int, view: str):
        """(buffer, offset) of [addr, addr + n) inside one allocation of `view`, else raise."""
        starts, bufs = self._views[view]
        i = bisect.bisect(starts, addr) - 1
        if i >= 0 and addr + n <= starts[i] + bufs[i].size:
            return bufs[i], addr - starts[i]
        raise RuntimeError(f"fake axengine: {n} bytes at 0x{addr:x} are outside every "
                           f"{view} buffer (a write past a buffer on the board)")


_memory = _Memory()


class FakeFFI:
    """The part of a cffi FFI object that pyaxengine and the rows feeder use."""

    NULL = NULL

    def cast(self, ctype: str, value):
        if isinstance(value, np.ndarray):
            raise TypeError("cast of an ndarray: pass arr.ctypes.data")
        if ctype.strip() in ("uintptr_t", "uint64_t", "AX_U64", "size_t"):
            return int(value)
        return _Ptr(int(value))

    def new(self, ctype: str, init=None):
        """`new("void **")` -> [NULL], `new("uint64_t *")` -> [0]: one element, settable."""
        element = ctype.strip()[:-1].strip()
        return [init if init is not None else (NULL if element.endswith("*") else 0)]

    def memmove(self, dest, src, n: int) -> None:
        n = int(n)
        buf, off = _memory.find(int(dest), n, "cpu")
        if buf.freed:
            raise RuntimeError("fake axengine: memmove into a freed CMM buffer")
        ctypes.memmove(int(dest), int(src), n)
        if buf.is_input:
            counters.input_bytes += n

    def buffer(self, ptr, n: int):
        _memory.find(int(ptr), int(n), "cpu")
        return (ctypes.c_char * int(n)).from_address(int(ptr))


class _SysLib:
    """ax_sys: cache maintenance on CMM buffers (phy and vir must name the same bytes)."""

    def _range(self, phy, vir, size):
        buf, off = _memory.find(int(vir), int(size), "cpu")
        if int(phy) != buf.phy + off:
            raise RuntimeError(f"fake axengine: phyAddr 0x{int(phy):x} and pVirAddr do not name "
                               "the same bytes")
        return buf, off, int(size)

    def AX_SYS_MflushCache(self, phy, vir, size) -> int:
        buf, off, n = self._range(phy, vir, size)
        buf.device[off:off + n] = buf.cpu[off:off + n]
        if buf.is_input:
            counters.flushed_bytes += n
        return 0

    def AX_SYS_MinvalidateCache(self, phy, vir, size) -> int:
        buf, off, n = self._range(phy, vir, size)
        buf.cpu[off:off + n] = buf.device[off:off + n]
        return 0

    def AX_SYS_MemFree(self, phy, vir) -> int:
        buf, off = _memory.find(int(vir), 1, "cpu")
        if off or int(phy) != buf.phy:
            return -1
        _memory.free(buf)
        return 0


class _Handle:
    """What `_handle[0]` points to: the loaded model."""

    def __init__(self, model):
        self.model = model
        self.destroyed = False


class _EngineLib:
    """ax_engine: runs a shape group from the input buffers' device bytes."""

    def AX_ENGINE_RunGroupIOSync(self, handle, context, group, io) -> int:
        if handle is None or handle is NULL or handle.destroyed:
            return -1
        return handle.model.execute(int(group), [b._buf for b in io[0].pInputs],
                                    [b._buf for b in io[0].pOutputs])

    def AX_ENGINE_RunSyncV2(self, handle, context, io) -> int:
        return self.AX_ENGINE_RunGroupIOSync(handle, context, 0, io)

    def AX_ENGINE_DestroyHandle(self, handle) -> int:
        if handle is None or handle is NULL:
            return -1
        handle.destroyed = True
        return 0


class _AxclrtLib:
    """axcl_rt: device buffers reached by axclrtMemcpy only."""

    AXCL_MEMCPY_HOST_TO_HOST = 0
    AXCL_MEMCPY_HOST_TO_DEVICE = 1
    AXCL_MEMCPY_DEVICE_TO_HOST = 2
    AXCL_MEMCPY_DEVICE_TO_DEVICE = 3

    def __init__(self):
        self.ios: dict[int, _AxclIO] = {}
        self.models: dict[int, object] = {}

    def axclrtSetCurrentContext(self, ctx) -> int:
        return 0

    def _buffer(self, io, index, kind, dev_ptr, size) -> int:
        bufs = getattr(self.ios.get(int(io)), kind, None)
        if bufs is None or not 0 <= index < len(bufs):
            return -1
        dev_ptr[0] = _Ptr(bufs[index].phy)
        size[0] = bufs[index].size
        return 0

    def axclrtEngineGetInputBufferByIndex(self, io, index, dev_ptr, size) -> int:
        return self._buffer(io, index, "inputs", dev_ptr, size)

    def axclrtEngineGetOutputBufferByIndex(self, io, index, dev_ptr, size) -> int:
        return self._buffer(io, index, "outputs", dev_ptr, size)

    def axclrtMemcpy(self, dst, src, count, kind) -> int:
        count = int(count)
        if kind == self.AXCL_MEMCPY_HOST_TO_DEVICE:
            buf, off = _memory.find(int(dst), count, "device")
            ctypes.memmove(int(buf.device.ctypes.data) + off, int(src), count)
            if buf.is_input:
                counters.input_bytes += count
            return 0
        if kind == self.AXCL_MEMCPY_DEVICE_TO_HOST:
            buf, off = _memory.find(int(src), count, "device")
            ctypes.memmove(int(dst), int(buf.device.ctypes.data) + off, count)
            return 0
        return -1

    def axclrtEngineExecute(self, model_id, context_id, group, io) -> int:
        model, axio = self.models.get(int(model_id)), self.ios.get(int(io))
        if model is None or axio is None:
            return -1
        return model.execute(int(group), axio.inputs, axio.outputs)


class _AxclIO:
    def __init__(self, inputs, outputs):
        self.inputs, self.outputs = inputs, outputs


_engine_ffi, _engine_lib, _sys_lib = FakeFFI(), _EngineLib(), _SysLib()
_axclrt_ffi, _axclrt_lib = FakeFFI(), _AxclrtLib()


# --------------------------------------------------------------------------------------------
# the model: a fake .axmodel manifest over an ONNX file


class _Model:
    """Loaded fake .axmodel: shape groups and the computation (onnxruntime on float32)."""

    def __init__(self, path: Path, bf16: bool):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise RuntimeError(f"{path} is not a fake axmodel")
        onnx_path = Path(manifest.get("onnx") or path)
        if not onnx_path.is_absolute():
            onnx_path = path.parent / onnx_path
        self.onnx_path = str(onnx_path)
        self.kind = manifest["kind"]  # layer, post, vit; "zeros": no ONNX, zero outputs
        groups = manifest["groups"]
        names = [n["dtype"] for g in groups for n in g["inputs"] + g["outputs"]]
        if not bf16 and "bfloat16" in names:
            # pyaxengine's _transform_dtype on an SDK whose engine lacks AX_ENGINE_DT_BFLOAT16
            raise ValueError("Unsupported data type '<cdata 'AX_ENGINE_DATA_TYPE_T' 9>'.")
        self.inputs = [[NodeArg(n["name"], _dtype(n["dtype"]), n["shape"]) for n in g["inputs"]]
                       for g in groups]
        self.outputs = [[NodeArg(n["name"], _dtype(n["dtype"]), n["shape"])
                         for n in g["outputs"]] for g in groups]
        self.shape_count = len(groups)
        self._ort = None
        self.faults: list = []  # (group, input name, row): corrupt before that group runs

    def max_bytes(self, kind: str, index: int) -> int:
        nodes = self.inputs if kind == "inputs" else self.outputs
        return max(_nbytes(g[index]) for g in nodes)

    def execute(self, group: int, in_bufs, out_bufs) -> int:
        """Run a shape group on the device bytes of the input buffers; write the outputs."""
        if not 0 <= group < self.shape_count:
            return -1
        for fault in list(self.faults):
            if fault[0] == group:
                self.faults.remove(fault)
                self._corrupt(in_bufs, group, fault[1], fault[2])
        counters.runs += 1
        t0 = time.perf_counter()
        feed = {}
        for node, buf in zip(self.inputs[group], in_bufs, strict=True):
            raw = buf.device[:_nbytes(node)]
            feed[node.name] = raw.view(node.dtype).reshape(node.shape)
        outputs = self.compute(feed)
        for node, buf, value in zip(self.outputs[group], out_bufs, outputs, strict=False):
            value = np.ascontiguousarray(np.asarray(value).astype(node.dtype))
            if value.shape != node.shape:
                raise RuntimeError(f"fake axengine: {self.onnx_path} produced {node.name} of "
                                   f"shape {value.shape}, the axmodel declares {node.shape}")
            buf.device[:value.nbytes] = value.reshape(-1).view(np.uint8)
            counters.output_bytes += value.nbytes
        counters.npu_s += time.perf_counter() - t0
        return 0

    def _corrupt(self, in_bufs, group, name, row) -> None:
        """Change one row of input `name` behind the runtime's back (device and CPU view)."""
        for node, buf in zip(self.inputs[group], in_bufs, strict=True):
            if node.name == name:
                row_bytes = node.shape[-1] * node.dtype.itemsize
                sl = slice(row * row_bytes, (row + 1) * row_bytes)
                junk = np.full(node.shape[-1], 3.0, np.float32).astype(node.dtype)
                buf.device[sl] = junk.view(np.uint8)
                if buf.cpu is not None:
                    buf.cpu[sl] = buf.device[sl]
                return
        raise KeyError(name)

    def _session(self):
        if self._ort is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._ort = ort.InferenceSession(self.onnx_path, sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        return self._ort

    def compute(self, feed: dict[str, np.ndarray]) -> list:
        """The dummy cache of the first prefill slice is stripped, bfloat16 becomes float32;
        padded cache rows and padded slice rows are fed as they are (masked), as on the NPU.
        A "zeros" model (shapes only, for byte counts at the published size) returns zeros."""
        if self.kind == "zeros":
            group = next(g for g, nodes in enumerate(self.inputs)
                         if all(feed[n.name].shape == n.shape for n in nodes))
            return [np.zeros(n.shape, n.dtype) for n in self.outputs[group]]
        sess = self._session()
        onnx_in = {i.name: i for i in sess.get_inputs()}
        args = {}
        for name, value in feed.items():
            if name not in onnx_in:
                continue
            want = np.uint32 if onnx_in[name].type == "tensor(uint32)" else np.float32
            args[name] = np.ascontiguousarray(value).astype(want)
        if self.kind == "layer":
            n = args["input"].shape[1]
            past = args["mask"].shape[-1] - n
            if args["K_cache"].shape[1] != past:  # the dummy (1, 1, kv_dim) of the first slice
                args["K_cache"] = args["K_cache"][:, :past]
                args["V_cache"] = args["V_cache"][:, :past]
        return sess.run(None, args)


def _nbytes(node: NodeArg) -> int:
    return int(np.prod(node.shape)) * node.dtype.itemsize


# --------------------------------------------------------------------------------------------
# sessions, as pyaxengine's (`_base_session.Session` + the two providers)


class _BaseSession:
    def __init__(self, model: _Model):
        self._model = model
        self._shape_count = model.shape_count
        self._inputs = model.inputs
        self._outputs = model.outputs

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total "
                             f"{self._shape_count}.")
        return self._inputs[shape_group]  # IndexError at == count, as pyaxengine

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        if shape_group > self._shape_count:
            raise ValueError(f"Shape group '{shape_group}' is out of range, total "
                             f"{self._shape_count}.")
        return self._outputs[shape_group]

    def _check(self, output_names, input_feed, shape_group):
        missing = [i.name for i in self.get_inputs() if i.name not in input_feed]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed "
                             f"({input_feed}).")
        if output_names is not None:
            for name in output_names:
                if name not in [o.name for o in self.get_outputs()]:
                    raise ValueError(f"Output name '{name}' is not in model outputs name list.")
        if shape_group > self._shape_count - 1 or shape_group < 0:
            raise ValueError(f"Invalid shape group: {shape_group}")
        for key, npy in input_feed.items():
            for one in self.get_inputs(shape_group):
                if one.name == key:
                    assert list(one.shape) == list(npy.shape) and one.dtype == npy.dtype, (
                        f"model inputs({key}) expect shape {one.shape} and dtype {one.dtype}, "
                        f"however gets input with shape {npy.shape} and dtype {npy.dtype}")
                    break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._unload()
        return False


class _IOBuffer:
    """AX_ENGINE_IO_BUFFER_T: phyAddr, pVirAddr, nSize (+ the fake's allocation)."""

    def __init__(self, buf: _Buffer):
        self._buf = buf
        self.phyAddr = buf.phy
        self.pVirAddr = _Ptr(buf.vir)
        self.nSize = buf.size


class _EngineIO:
    """AX_ENGINE_IO_T."""

    def __init__(self, inputs, outputs):
        self.pInputs, self.nInputSize = inputs, len(inputs)
        self.pOutputs, self.nOutputSize = outputs, len(outputs)


class _AXEngineSession(_BaseSession):
    """As pyaxengine's AXEngineSession (AxEngineExecutionProvider, the board)."""

    def __init__(self, model: _Model):
        super().__init__(model)
        self._handle = [_Handle(model)]
        self._context = [object()]
        ins = [_IOBuffer(_memory.alloc(model.max_bytes("inputs", i), True, True))
               for i in range(len(model.inputs[0]))]
        outs = [_IOBuffer(_memory.alloc(model.max_bytes("outputs", i), False, True))
                for i in range(len(model.outputs[0]))]
        self._io = [_EngineIO(ins, outs)]

    def _unload(self):  # pyaxengine destroys the handle; the CMM buffers stay allocated
        if self._handle[0] is not None:
            _engine_lib.AX_ENGINE_DestroyHandle(self._handle[0])
        self._handle[0] = NULL

    def run(self, output_names, input_feed, run_options=None, shape_group=0):
        self._check(output_names, input_feed, shape_group)
        if output_names is None:
            output_names = [o.name for o in self.get_outputs(shape_group)]
        io = self._io[0]
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    npy = np.ascontiguousarray(npy)
                    _engine_ffi.memmove(io.pInputs[i].pVirAddr,
                                        _engine_ffi.cast("void *", npy.ctypes.data), npy.nbytes)
                    _sys_lib.AX_SYS_MflushCache(io.pInputs[i].phyAddr, io.pInputs[i].pVirAddr,
                                                io.pInputs[i].nSize)
                    break
        ret = _engine_lib.AX_ENGINE_RunGroupIOSync(self._handle[0], self._context[0],
                                                   shape_group, self._io)
        if ret != 0:
            raise RuntimeError("Failed to run model.")
        outputs = []
        for i, node in enumerate(self.get_outputs(shape_group)):
            buf = io.pOutputs[i]
            _sys_lib.AX_SYS_MinvalidateCache(buf.phyAddr, buf.pVirAddr, buf.nSize)
            npy = np.frombuffer(_engine_ffi.buffer(buf.pVirAddr, _nbytes(node)),
                                dtype=node.dtype).reshape(node.shape).copy()
            if node.name in output_names:
                outputs.append(npy)
        return outputs


class _AXCLRTSession(_BaseSession):
    """As pyaxengine's AXCLRTSession (AXCLRTExecutionProvider, the M.2 card)."""

    def __init__(self, model: _Model, provider_options: dict | None, devices: int):
        super().__init__(model)
        self._device_index = 0
        if isinstance(provider_options, dict) and "device_id" in provider_options:
            self._device_index = provider_options.get("device_id", 0)
        if devices == 0:
            raise RuntimeError("Get AXCL device failed 0x00000000, find total 0 device.")
        if self._device_index >= devices:
            raise RuntimeError(f"Device index {self._device_index} is out of range, total "
                               f"{devices} device.")
        self._thread_context = [object()]
        model_id = id(model)
        ins = [_memory.alloc(model.max_bytes("inputs", i), True, False)
               for i in range(len(model.inputs[0]))]
        outs = [_memory.alloc(model.max_bytes("outputs", i), False, False)
                for i in range(len(model.outputs[0]))]
        io = _AxclIO(ins, outs)
        _axclrt_lib.ios[id(io)] = io
        _axclrt_lib.models[model_id] = model
        self._model_id = [model_id]
        self._context_id = [1]
        self._io = [id(io)]

    def _unload(self):  # pyaxengine frees the device buffers, destroys the IO, unloads
        if self._io is not None:
            io = _axclrt_lib.ios.pop(self._io[0], None)
            for buf in (io.inputs + io.outputs) if io else []:
                _memory.free(buf)
            self._io = None
        if self._model_id[0]:
            _axclrt_lib.models.pop(self._model_id[0], None)
            self._model_id[0] = 0

    def run(self, output_names, input_feed, run_options=None, shape_group=0):
        self._check(output_names, input_feed, shape_group)
        if self._io is None:
            raise RuntimeError("IO not initialized")
        if output_names is None:
            output_names = [o.name for o in self.get_outputs(shape_group)]
        lib, ffi = _axclrt_lib, _axclrt_ffi
        dev_ptr, dev_size = ffi.new("void **"), ffi.new("uint64_t *")
        for key, npy in input_feed.items():
            for i, one in enumerate(self.get_inputs(shape_group)):
                if one.name == key:
                    npy = np.ascontiguousarray(npy)
                    lib.axclrtEngineGetInputBufferByIndex(self._io[0], i, dev_ptr, dev_size)
                    lib.axclrtMemcpy(dev_ptr[0], ffi.cast("void *", npy.ctypes.data), npy.nbytes,
                                     lib.AXCL_MEMCPY_HOST_TO_DEVICE)
        ret = lib.axclrtEngineExecute(self._model_id[0], self._context_id[0], shape_group,
                                      self._io[0])
        if ret != 0:
            raise RuntimeError(f"axclrtEngineExecute failed 0x{ret:08x}")
        outputs = []
        for i, node in enumerate(self.get_outputs(shape_group)):
            lib.axclrtEngineGetOutputBufferByIndex(self._io[0], i, dev_ptr, dev_size)
            npy = np.zeros(node.shape, dtype=node.dtype)
            lib.axclrtMemcpy(ffi.cast("void *", npy.ctypes.data), dev_ptr[0], npy.nbytes,
                             lib.AXCL_MEMCPY_DEVICE_TO_HOST)
            if node.name in output_names:
                outputs.append(npy)
        return outputs


class _BareSession(_BaseSession):
    """A pyaxengine whose internals are not the ones above (no `_io`, no handles)."""

    def run(self, output_names, input_feed, run_options=None, shape_group=0):
        self._check(output_names, input_feed, shape_group)
        outs = self._model.compute(input_feed)
        names = output_names or [o.name for o in self.get_outputs(shape_group)]
        return [np.asarray(v).astype(n.dtype) for n, v in
                zip(self.get_outputs(shape_group), outs, strict=False) if n.name in names]

    def _unload(self):
        pass


class InferenceSession:
    """Fake axengine.InferenceSession (`_session.py`): picks the provider's session."""

    #: set by installed(): the fake's SDK and layout
    _bf16, _internals, _devices = True, True, 1

    def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None,
                 **kwargs):
        provider, options = PROVIDERS[0], None
        if isinstance(providers, str):
            providers = [providers]
        for p in providers or []:
            name = p[0] if isinstance(p, tuple) else p
            if name not in PROVIDERS:
                raise ValueError(f"Selected provider(s): ['{name}'] is(are) not available.")
        if providers:
            first = providers[0]
            provider = first[0] if isinstance(first, tuple) else first
            options = first[1] if isinstance(first, tuple) else None
        if options is None and provider_options:
            options = provider_options[0]
        self._provider = provider
        self._provider_options = options
        model = _Model(Path(path_or_bytes), self._bf16)
        if not self._internals:
            self._sess = _BareSession(model)
        elif provider == PROVIDERS[1]:
            self._sess = _AXCLRTSession(model, options, self._devices)
        else:
            self._sess = _AXEngineSession(model)
        self.calls: list[int] = []  # shape groups run through run(), for tests

    def __enter__(self):
        self._sess.__enter__()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        return self._sess.__exit__(exc_type, exc_value, traceback)

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_outputs(shape_group)

    def get_providers(self):
        return self._provider

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
            run_options=None, shape_group: int = 0) -> list[np.ndarray]:
        out = self._sess.run(output_names, input_feed, run_options, shape_group)
        self.calls.append(shape_group)
        return out

    # test hooks (not pyaxengine API)
    def inject_fault(self, shape_group: int, input_name: str, row: int) -> None:
        """Corrupt row `row` of input `input_name` in the NPU's buffer right before the next
        run of `shape_group`, behind the runtime's back."""
        self._sess._model.faults.append((shape_group, input_name, row))


def make_module(bf16: bool = True, internals: bool = True,
                devices: int = 1) -> types.ModuleType:
    """A module object that looks like `axengine` to the backend."""
    mod = types.ModuleType("axengine")
    session = type("InferenceSession", (InferenceSession,),
                   {"_bf16": bf16, "_internals": internals, "_devices": devices})
    mod.InferenceSession = session
    mod.NodeArg = NodeArg
    mod.SessionOptions = SessionOptions
    mod.axengine_provider_name = PROVIDERS[0]
    mod.axclrt_provider_name = PROVIDERS[1]
    mod.get_all_providers = lambda: list(PROVIDERS)
    mod.get_available_providers = lambda: list(PROVIDERS)
    mod.__fake__ = True
    mod.__path__ = []  # a package: `axengine._axe_capi` and `axengine._axclrt_capi` below
    return mod


def _capi_modules(internals: bool) -> dict:
    if not internals:
        return {}
    axe = types.ModuleType("axengine._axe_capi")
    axe.engine_cffi, axe.engine_lib, axe.sys_lib = _engine_ffi, _engine_lib, _sys_lib
    axe.sys_cffi = _engine_ffi
    axcl = types.ModuleType("axengine._axclrt_capi")
    axcl.axclrt_cffi, axcl.axclrt_lib = _axclrt_ffi, _axclrt_lib
    return {"axengine._axe_capi": axe, "axengine._axclrt_capi": axcl}


_NAMES = ("axengine", "axengine._axe_capi", "axengine._axclrt_capi")


def install(**options) -> types.ModuleType:
    """Put the fake into sys.modules['axengine'] (returns the module)."""
    internals = options.get("internals", True)
    mod = make_module(**options)
    sys.modules["axengine"] = mod
    for name in _NAMES[1:]:
        sys.modules.pop(name, None)
    for name, sub in _capi_modules(internals).items():
        sys.modules[name] = sub
        setattr(mod, name.split(".")[1], sub)
    return mod


def uninstall() -> None:
    mod = sys.modules.get("axengine")
    if mod is not None and getattr(mod, "__fake__", False):
        for name in _NAMES:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def installed(bf16: bool = True, internals: bool = True, devices: int = 1):
    """Context manager: the fake axengine is importable inside, the previous state after.
    `bf16=False`: an SDK without bfloat16; `internals=False`: a pyaxengine without the
    internals the rows feeder uses; `devices`: M.2 cards present."""
    previous = {name: sys.modules.get(name) for name in _NAMES}
    install(bf16=bf16, internals=internals, devices=devices)
    try:
        yield sys.modules["axengine"]
    finally:
        for name, mod in previous.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


# --------------------------------------------------------------------------------------------
# host-layout dir -> fake Axera-layout dir


def _node(name, shape, dtype) -> dict:
    return {"name": name, "shape": [int(d) for d in shape],
            "dtype": "bfloat16" if np.dtype(dtype) == BF16 else np.dtype(dtype).name}


def _write_manifest(path: Path, onnx: Path | None, kind: str, groups: list) -> None:
    path.write_text(json.dumps({"format": FORMAT, "onnx": str(onnx.resolve()) if onnx else None,
                                "kind": kind, "groups": groups}, indent=1), encoding="utf-8")


def make_shape_only_layers(out_dir: str | Path, layers: int, hidden: int, kv_dim: int,
                           vocab: int, kv_cache_len: int = PUBLISHED_KV_CACHE_LEN,
                           max_prefill: int = PUBLISHED_MAX_PREFILL) -> tuple[list, Path]:
    """Layer and post .axmodel manifests of a given size that compute zeros (no ONNX): the
    published build's buffers and byte traffic without its weights. Returns (layers, post)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = ["K_cache", "V_cache", "indices", "input", "mask"]
    for i in range(layers):
        groups = layer_groups(names, ["K_cache_out", "V_cache_out", "output"], hidden, kv_dim,
                              kv_cache_len, 128, max_prefill)
        paths.append(out_dir / f"zeros_p128_l{i}_together.axmodel")
        _write_manifest(paths[-1], None, "zeros", groups)
    post = out_dir / "zeros_post.axmodel"
    _write_manifest(post, None, "zeros", [{"inputs": [_node("input", (1, 1, hidden), BF16)],
                                           "outputs": [_node("logits", (1, 1, vocab),
                                                             np.float32)]}])
    return paths, post


def layer_groups(names_in, names_out, hidden: int, kv_dim: int, kv_cache_len: int,
                 prefill_len: int, max_prefill: int, dtype=BF16, index_dtype=np.uint32,
                 prefill_dtype=None) -> list:
    """Shape groups of one layer as the Axera build: 0 = decode, 1..G = prefill slices.
    `prefill_dtype` (default `dtype`) gives the prefill groups another float dtype."""
    k, v, idx, inp, mask = names_in
    ko, vo, out = names_out

    def group(n, cache_rows, mask_len, dt):
        return {"inputs": [_node(k, (1, cache_rows, kv_dim), dt),
                           _node(v, (1, cache_rows, kv_dim), dt),
                           _node(idx, (1, n), index_dtype),
                           _node(inp, (1, n, hidden), dt),
                           _node(mask, (1, n, mask_len), dt)],
                "outputs": [_node(ko, (1, n, kv_dim), dt), _node(vo, (1, n, kv_dim), dt),
                            _node(out, (1, n, hidden), dt)]}

    groups = [group(1, kv_cache_len, kv_cache_len + 1, dtype)]
    for g in range(max_prefill // prefill_len):
        past = g * prefill_len
        groups.append(group(prefill_len, max(past, 1), past + prefill_len,
                            dtype if prefill_dtype is None else prefill_dtype))
    return groups


def make_fake_axera_dir(host_dir: str | Path, out_root: str | Path,
                        kv_cache_len: int = PUBLISHED_KV_CACHE_LEN, prefill_len: int = 128,
                        max_prefill: int = PUBLISHED_MAX_PREFILL,
                        name: str = "InternVL3_5-1B_GPTQ_INT4",
                        hidden_dtype=BF16, prefill_dtype=None) -> Path:
    """Lay out a host (ONNX) model dir like the published AXERA-TECH download:
    `{name}/` (HF files), `{name}_axmodel/` (layers, post, embeddings), `vit-models/`.
    The `.axmodel` files are manifests that map back to the ONNX files. Layer I/O is
    `hidden_dtype` (bfloat16), or `prefill_dtype` in the prefill shape groups if given.
    `max_prefill=PUBLISHED_MAX_PREFILL` gives the published build's 9 prefill groups."""
    from ..core.modeldir import EMBEDDINGS_NAME, discover, load_config

    host_dir, out_root = Path(host_dir), Path(out_root)
    paths = discover(host_dir, "onnxruntime")
    cfg = load_config(paths.config)
    hf_out = out_root / name
    ax_out = out_root / f"{name}_axmodel"
    vit_out = out_root / "vit-models"
    for d in (hf_out, ax_out, vit_out):
        d.mkdir(parents=True, exist_ok=True)
    for f in sorted(host_dir.iterdir()):
        if f.is_file() and f.suffix not in (".onnx", ".npy", ".data") \
                and not f.name.endswith(".onnx.data"):
            shutil.copy2(f, hf_out / f.name)
    shutil.copy2(paths.embeddings, ax_out / EMBEDDINGS_NAME)

    import onnxruntime as ort

    def io_names(onnx_path):
        s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()], s

    for i, layer in enumerate(paths.layers):
        names_in, names_out, _ = io_names(layer)
        order = ["K_cache", "V_cache", "indices", "input", "mask"]
        if sorted(names_in) != sorted(order):
            raise ValueError(f"{layer}: inputs {names_in} are not {order}")
        groups = layer_groups(order, names_out[:3], cfg.hidden_size, cfg.kv_dim, kv_cache_len,
                              prefill_len, max_prefill, dtype=hidden_dtype,
                              prefill_dtype=prefill_dtype)
        _write_manifest(ax_out / f"{paths.prefix}_p{prefill_len}_l{i}_together.axmodel", layer,
                        "layer", groups)

    names_in, names_out, s = io_names(paths.post)
    vocab = s.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int):
        vocab = int(np.load(paths.embeddings, mmap_mode="r").shape[0])
    _write_manifest(ax_out / f"{paths.prefix}_post.axmodel", paths.post, "post", [{
        "inputs": [_node(names_in[0], (1, 1, cfg.hidden_size), hidden_dtype)],
        "outputs": [_node(names_out[0], (1, 1, vocab), np.float32)]}])

    if paths.vit is not None:
        names_in, names_out, _ = io_names(paths.vit)
        size = cfg.image_size
        _write_manifest(vit_out / f"internvl_vit_model_1x3x{size}x{size}.axmodel", paths.vit,
                        "vit", [{
                            "inputs": [_node(names_in[0], (1, 3, size, size), np.float32)],
                            "outputs": [_node(names_out[0],
                                              (1, cfg.num_image_token, cfg.hidden_size),
                                              np.float32)]}])
    return out_root
