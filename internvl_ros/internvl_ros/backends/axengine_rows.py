"""The one door to pyaxengine's internals: write KV rows into the persistent input buffers.

pyaxengine has no public IO-binding API: its `run()` memmoves every input into the session's
one persistent buffer per input (sized for the largest shape group), flushes the whole buffer
and runs the group. Rows mode needs to write only the rows that changed, so it uses private
attributes, read in AXERA-TECH/pyaxengine (`axengine/_session.py`, `_axe.py`, `_axe_capi.py`,
`_axclrt.py`, `_axclrt_capi.py`, and the older `ax_session.py`):

- AxEngineExecutionProvider (the board), layout "axe-cmm": `session._sess` (or, in the older
  single-class layout, the session itself) has `_io[0].pInputs[i]` / `pOutputs[i]` with
  `phyAddr`, `pVirAddr`, `nSize` (CMM), `_handle[0]`, `_context[0]`, `_shape_count`; the C
  libraries are `engine_cffi`, `engine_lib`, `sys_lib` of `axengine._axe_capi` (or
  `_engine_ffi`, `_engine_lib`, `_sys_lib` on the older session). A row is memmoved to
  `pVirAddr + offset` and only its bytes are flushed (`AX_SYS_MflushCache` on the same offset
  of `phyAddr`); `AX_ENGINE_RunGroupIOSync` runs the group.
- AXCLRTExecutionProvider (the M.2 card), layout "axcl-device": `_sess._io[0]` (an
  `axclrtEngineIO`), `_model_id[0]`, `_context_id[0]`, `_thread_context[0]`; the library is
  `axclrt_cffi`, `axclrt_lib` of `axengine._axclrt_capi`. Buffers are device memory:
  `axclrtEngineGetInputBufferByIndex` gives the device address, `axclrtMemcpy` host-to-device at
  address + offset writes a row (as Axera's C++ runtime does on the card), and
  `axclrtEngineExecute` runs the group.

Layouts are recognised by what is found, never by a version string. `open_rows()` checks
everything at open time and returns `(None, reason)` when anything is missing; nothing here
raises into the caller at open. Nothing else in the project touches pyaxengine's internals.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np

#: the inputs written row by row (the rest are written whole on every run)
ROW_INPUTS = ("K_cache", "V_cache")


class _Missing(Exception):
    """An expected internal is not there (the message names it)."""


def _need(obj, name: str, where: str):
    if not hasattr(obj, name):
        raise _Missing(f"{where}.{name} is missing")
    return getattr(obj, name)


def _callable(lib, name: str, where: str):
    try:
        fn = getattr(lib, name)
    except Exception:  # cffi raises AttributeError or its own error for an absent symbol
        raise _Missing(f"{where}.{name} is missing") from None
    if not callable(fn):
        raise _Missing(f"{where}.{name} is not callable")
    return fn


def _capi(module: str, names: Sequence[str]):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        raise _Missing(f"{module} cannot be imported ({type(exc).__name__}: {exc})") from None
    return [_need(mod, n, module) for n in names]


def _nbytes(node) -> int:
    return int(np.prod(node.shape)) * np.dtype(node.dtype).itemsize


class _RowsIO:
    """What the core's rows feeder uses: `write_rows(name, start, rows)` and
    `run(feed, shape_group)` (feed: every input but the row inputs). Subclasses implement
    `_write(index, offset, array)`, `_execute(group)` and `_read(index, node)`."""

    layout = "?"

    def __init__(self, inputs: list, outputs: list):
        self._inputs = inputs  # per shape group: NodeArgs
        self._outputs = outputs
        names = [n.name for n in inputs[0]]
        self._index = {n: i for i, n in enumerate(names)}
        self.row_bytes = {}
        for name in ROW_INPUTS:
            node = inputs[0][self._index[name]]
            self.row_bytes[name] = int(node.shape[-1]) * np.dtype(node.dtype).itemsize
        self.dtype = {name: np.dtype(inputs[0][self._index[name]].dtype) for name in ROW_INPUTS}
        self.bytes_written = 0  # into input buffers, by this object
        # per group, looked up once: {input: (index, shape, dtype)}, [(shape, dtype, nbytes)]
        self._in_spec = [{n.name: (i, tuple(n.shape), np.dtype(n.dtype))
                          for i, n in enumerate(nodes)} for nodes in inputs]
        self._out_spec = [[(tuple(n.shape), np.dtype(n.dtype), _nbytes(n)) for n in nodes]
                          for nodes in outputs]
        self._needed = [sorted(set(spec) - set(ROW_INPUTS)) for spec in self._in_spec]

    def check(self, buffer_sizes: list[int]) -> None:
        """Same input order and row-input dtypes in every group; buffers big enough."""
        names = [n.name for n in self._inputs[0]]
        for g, nodes in enumerate(self._inputs):
            if [n.name for n in nodes] != names:
                raise _Missing(f"shape group {g} orders its inputs differently")
            for name in ROW_INPUTS:
                node = nodes[self._index[name]]
                if np.dtype(node.dtype) != self.dtype[name]:
                    raise _Missing(f"{name} is {np.dtype(node.dtype)} in shape group {g} but "
                                   f"{self.dtype[name]} in shape group 0: rows cannot be shared")
        for i, size in enumerate(buffer_sizes):
            need = max(_nbytes(nodes[i]) for nodes in self._inputs)
            if int(size) < need:
                raise _Missing(f"input buffer {i} holds {int(size)} bytes, the largest group "
                               f"needs {need}")

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        """Write (1, n, width) rows at row `start` of input `name`'s persistent buffer."""
        rows = np.ascontiguousarray(rows)
        if rows.dtype != self.dtype[name]:
            raise TypeError(f"{name} rows are {rows.dtype}, the buffer holds {self.dtype[name]}")
        self._write(self._index[name], int(start) * self.row_bytes[name], rows)

    def run(self, feed: dict[str, np.ndarray], shape_group: int) -> list[np.ndarray]:
        """Write the given inputs whole, then run the group on the buffers as they are."""
        spec = self._in_spec[shape_group]
        for name, arr in feed.items():
            index, shape, dtype = spec[name]
            assert shape == arr.shape and dtype == arr.dtype, (
                f"model inputs({name}) expect shape {shape} and dtype {dtype}, "
                f"however gets input with shape {arr.shape} and dtype {arr.dtype}")
            self._write(index, 0, np.ascontiguousarray(arr))
        if len(feed) != len(self._needed[shape_group]):
            missing = [n for n in self._needed[shape_group] if n not in feed]
            raise ValueError(f"rows run: inputs {missing} were not given")
        ret = self._execute(shape_group)
        if ret != 0:
            raise RuntimeError(f"running shape group {shape_group} failed "
                               f"(0x{ret & 0xFFFFFFFF:08x})")
        return [self._read(i, *out) for i, out in enumerate(self._out_spec[shape_group])]

    def release(self) -> str:
        """Free what pyaxengine leaves allocated at close; returns what was done."""
        return "nothing to free"


class CmmRows(_RowsIO):
    """AxEngineExecutionProvider: CMM buffers with a CPU view, cache flushes."""

    layout = "axe-cmm"

    def __init__(self, inner, ffi, engine_lib, sys_lib, inputs, outputs):
        super().__init__(inputs, outputs)
        self._inner, self._ffi, self._sys = inner, ffi, sys_lib
        io = _need(inner, "_io", "session")[0]
        self._ins = [io.pInputs[i] for i in range(len(inputs[0]))]
        self._outs = [io.pOutputs[i] for i in range(len(outputs[0]))]
        for b in self._ins + self._outs:
            for attr in ("phyAddr", "pVirAddr", "nSize"):
                _need(b, attr, "AX_ENGINE_IO_BUFFER_T")
        self._io = inner._io
        self._handle = _need(inner, "_handle", "session")
        self._context = _need(inner, "_context", "session")
        groups = int(_need(inner, "_shape_count", "session"))
        if groups != len(inputs):
            raise _Missing(f"session._shape_count is {groups}, {len(inputs)} groups were read")
        for name in ("memmove", "cast", "buffer"):
            _callable(ffi, name, "engine_cffi")
        self._flush = _callable(sys_lib, "AX_SYS_MflushCache", "sys_lib")
        self._invalidate = _callable(sys_lib, "AX_SYS_MinvalidateCache", "sys_lib")
        self._run_group = _callable(engine_lib, "AX_ENGINE_RunGroupIOSync", "engine_lib") \
            if groups > 1 else None
        self._run_one = _callable(engine_lib, "AX_ENGINE_RunSyncV2", "engine_lib") \
            if groups == 1 else None
        self.check([b.nSize for b in self._ins])

    def _write(self, index: int, offset: int, array: np.ndarray) -> None:
        buf, n = self._ins[index], array.nbytes
        if offset + n > buf.nSize:
            raise IndexError(f"write of {n} bytes at {offset} past input buffer {index} "
                             f"({buf.nSize} bytes)")
        dst = self._ffi.cast("void *", self._ffi.cast("char *", buf.pVirAddr) + offset)
        self._ffi.memmove(dst, self._ffi.cast("void *", array.ctypes.data), n)
        self._flush(buf.phyAddr + offset, dst, n)  # as run() does, on this range only
        self.bytes_written += n

    def _execute(self, group: int) -> int:
        if self._run_group is not None:
            return self._run_group(self._handle[0], self._context[0], group, self._io)
        return self._run_one(self._handle[0], self._context[0], self._io)

    def _read(self, index: int, shape: tuple, dtype, n: int) -> np.ndarray:
        buf = self._outs[index]
        self._invalidate(buf.phyAddr, buf.pVirAddr, n)  # only the bytes read, not the buffer
        return np.frombuffer(self._ffi.buffer(buf.pVirAddr, n), dtype=dtype).reshape(shape).copy()

    def release(self) -> str:
        """pyaxengine never frees its CMM buffers; after its handle is destroyed, free them."""
        free = getattr(self._sys, "AX_SYS_MemFree", None)
        if free is None:
            return "CMM buffers stay allocated (AX_SYS_MemFree not found)"
        freed = 0
        for buf in self._ins + self._outs:
            if buf.nSize and free(buf.phyAddr, buf.pVirAddr) == 0:
                buf.nSize = 0
                freed += 1
        return f"freed {freed} CMM buffers"


class AxclRows(_RowsIO):
    """AXCLRTExecutionProvider: device buffers reached through axclrtMemcpy at an offset."""

    layout = "axcl-device"

    def __init__(self, inner, ffi, lib, inputs, outputs):
        super().__init__(inputs, outputs)
        self._ffi, self._lib = ffi, lib
        self._io = _need(inner, "_io", "session")
        if self._io is None:
            raise _Missing("session._io is None (closed)")
        self._model_id = _need(inner, "_model_id", "session")
        self._context_id = _need(inner, "_context_id", "session")
        self._thread_ctx = getattr(inner, "_thread_context", None)
        for name in ("cast", "new"):
            _callable(ffi, name, "axclrt_cffi")
        get_in = _callable(lib, "axclrtEngineGetInputBufferByIndex", "axclrt_lib")
        get_out = _callable(lib, "axclrtEngineGetOutputBufferByIndex", "axclrt_lib")
        self._memcpy = _callable(lib, "axclrtMemcpy", "axclrt_lib")
        self._exec = _callable(lib, "axclrtEngineExecute", "axclrt_lib")
        self._set_ctx = getattr(lib, "axclrtSetCurrentContext", None)
        self._h2d = int(_need(lib, "AXCL_MEMCPY_HOST_TO_DEVICE", "axclrt_lib"))
        self._d2h = int(_need(lib, "AXCL_MEMCPY_DEVICE_TO_HOST", "axclrt_lib"))
        self._ins = [self._buffer(get_in, i) for i in range(len(inputs[0]))]
        self._outs = [self._buffer(get_out, i) for i in range(len(outputs[0]))]
        self.check([size for _, size in self._ins])

    def _buffer(self, getter, index: int):
        ptr, size = self._ffi.new("void **"), self._ffi.new("uint64_t *")
        if getter(self._io[0], index, ptr, size) != 0:
            raise _Missing(f"no device buffer for input/output {index}")
        return ptr[0], int(size[0])

    def _write(self, index: int, offset: int, array: np.ndarray) -> None:
        base, size = self._ins[index]
        n = array.nbytes
        if offset + n > size:
            raise IndexError(f"write of {n} bytes at {offset} past input buffer {index} "
                             f"({size} bytes)")
        dst = self._ffi.cast("void *", self._ffi.cast("char *", base) + offset)
        ret = self._memcpy(dst, self._ffi.cast("void *", array.ctypes.data), n, self._h2d)
        if ret != 0:
            raise RuntimeError(f"axclrtMemcpy to input {index} failed (0x{ret & 0xFFFFFFFF:08x})")
        self.bytes_written += n

    def _execute(self, group: int) -> int:
        if self._set_ctx is not None and self._thread_ctx is not None:
            self._set_ctx(self._thread_ctx[0])
        return self._exec(self._model_id[0], self._context_id[0], group, self._io[0])

    def _read(self, index: int, shape: tuple, dtype, n: int) -> np.ndarray:
        base, _ = self._outs[index]
        out = np.empty(shape, dtype=dtype)
        ret = self._memcpy(self._ffi.cast("void *", out.ctypes.data), base, out.nbytes,
                           self._d2h)
        if ret != 0:
            raise RuntimeError(f"axclrtMemcpy from output {index} failed")
        return out

    def release(self) -> str:
        return "pyaxengine frees the card's buffers at close"


def open_rows(session, provider: str | None, inputs: list, outputs: list):
    """(rows IO, description) for one axengine.InferenceSession, or (None, reason).

    `inputs` / `outputs`: NodeArgs per shape group, as read through the public API."""
    try:
        if len(inputs) < 1 or any(n not in [x.name for x in inputs[0]] for n in ROW_INPUTS):
            raise _Missing(f"the model has no {' and '.join(ROW_INPUTS)} inputs")
        inner = getattr(session, "_sess", session)
        _need(inner, "_io", "session")  # the session's structures first, then the C libraries
        if hasattr(inner, "_model_id") or provider == "AXCLRTExecutionProvider":
            ffi, lib = _capi("axengine._axclrt_capi", ("axclrt_cffi", "axclrt_lib"))
            rows = AxclRows(inner, ffi, lib, inputs, outputs)
        else:
            if hasattr(inner, "_engine_lib") and hasattr(inner, "_sys_lib"):  # older layout
                ffi = _need(inner, "_engine_ffi", "session")
                engine_lib, sys_lib = inner._engine_lib, inner._sys_lib
            else:
                ffi, engine_lib, sys_lib = _capi("axengine._axe_capi",
                                                 ("engine_cffi", "engine_lib", "sys_lib"))
            rows = CmmRows(inner, ffi, engine_lib, sys_lib, inputs, outputs)
    except _Missing as exc:
        return None, f"pyaxengine internals not as expected: {exc}"
    except Exception as exc:  # anything odd while probing: rows mode stays off
        return None, f"pyaxengine internals not usable: {type(exc).__name__}: {exc}"
    return rows, f"pyaxengine layout {rows.layout}"
