"""A test double of Axera's `axengine` (pyaxengine) that runs the exported ONNX models.

It enforces pyaxengine's contract exactly, so the NPU code path (fixed shape groups, bfloat16,
dummy first-slice cache, padded slices) runs in CI without an NPU:

- `InferenceSession(path, providers=...)` loads a fake `.axmodel` (a small JSON manifest naming
  the ONNX file and the shape groups);
- `get_inputs(g)` / `get_outputs(g)` return NodeArgs with `.name`, `.shape`, `.dtype`;
- `run(output_names, input_feed, run_options=None, shape_group=0)` raises
  ValueError "Required inputs ([...]) are missing from input feed (...)" for a missing input,
  ValueError for a shape group out of range, and AssertionError
  "model inputs(NAME) expect shape ... and dtype ..." for a wrong shape or dtype; it returns a
  list of copies.

The computation strips the dummy cache of the first prefill slice, converts bfloat16 to float32,
runs onnxruntime and converts the outputs to the declared dtypes. Padded cache rows and padded
slice rows are fed as they are (masked), exactly what the NPU computes.

    from internvl_ros.backends import fake_axengine
    fake_axengine.make_fake_axera_dir(host_onnx_dir, out_root, kv_cache_len=511)
    with fake_axengine.installed():
        pipe = Pipeline.from_model_dir(out_root, backend="axengine")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np

FORMAT = "internvl_ros.fake_axmodel"
PROVIDERS = ["AxEngineExecutionProvider", "AXCLRTExecutionProvider"]
BF16 = np.dtype(ml_dtypes.bfloat16)


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


class InferenceSession:
    """Fake axengine.InferenceSession over a fake .axmodel manifest."""

    def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None,
                 **kwargs):
        if isinstance(providers, str):
            providers = [providers]
        for p in providers or []:
            name = p[0] if isinstance(p, tuple) else p
            if name not in PROVIDERS:
                raise ValueError(f"Selected provider(s): ['{name}'] is(are) not available.")
        path = Path(path_or_bytes)
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise RuntimeError(f"{path} is not a fake axmodel")
        onnx_path = Path(manifest["onnx"])
        if not onnx_path.is_absolute():
            onnx_path = path.parent / onnx_path
        self._onnx_path = str(onnx_path)
        self._kind = manifest["kind"]
        self._inputs = [[NodeArg(n["name"], _dtype(n["dtype"]), n["shape"]) for n in g["inputs"]]
                        for g in manifest["groups"]]
        self._outputs = [[NodeArg(n["name"], _dtype(n["dtype"]), n["shape"])
                          for n in g["outputs"]] for g in manifest["groups"]]
        self._shape_count = len(self._inputs)
        self._ort = None
        self.calls: list[int] = []  # shape groups run, for tests

    def _session(self):
        if self._ort is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._ort = ort.InferenceSession(self._onnx_path, sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        return self._ort

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

    def get_providers(self):
        return PROVIDERS[0]

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
            run_options=None, shape_group: int = 0) -> list[np.ndarray]:
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
        self.calls.append(shape_group)
        outputs = self._compute(input_feed, shape_group)
        declared = self.get_outputs(shape_group)
        result = []
        for node, value in zip(declared, outputs, strict=False):
            value = np.asarray(value).astype(node.dtype)
            if value.shape != node.shape:
                raise RuntimeError(f"fake axengine: {self._onnx_path} produced {node.name} of "
                                   f"shape {value.shape}, the axmodel declares {node.shape}")
            if output_names is None or node.name in output_names:
                result.append(value.copy())
        return result

    def _compute(self, feed: dict[str, np.ndarray], shape_group: int) -> list:
        sess = self._session()
        onnx_in = {i.name: i for i in sess.get_inputs()}
        args = {}
        for name, value in feed.items():
            if name not in onnx_in:
                continue
            want = np.uint32 if onnx_in[name].type == "tensor(uint32)" else np.float32
            args[name] = np.ascontiguousarray(value).astype(want)
        if self._kind == "layer":
            n = args["input"].shape[1]
            past = args["mask"].shape[-1] - n
            if args["K_cache"].shape[1] != past:  # the dummy (1, 1, kv_dim) of the first slice
                args["K_cache"] = args["K_cache"][:, :past]
                args["V_cache"] = args["V_cache"][:, :past]
        return sess.run(None, args)


def make_module() -> types.ModuleType:
    """A module object that looks like `axengine` to the backend."""
    mod = types.ModuleType("axengine")
    mod.InferenceSession = InferenceSession
    mod.NodeArg = NodeArg
    mod.SessionOptions = SessionOptions
    mod.axengine_provider_name = PROVIDERS[0]
    mod.axclrt_provider_name = PROVIDERS[1]
    mod.get_all_providers = lambda: list(PROVIDERS)
    mod.get_available_providers = lambda: list(PROVIDERS)
    mod.__fake__ = True
    return mod


def install() -> types.ModuleType:
    """Put the fake into sys.modules['axengine'] (returns the module)."""
    mod = make_module()
    sys.modules["axengine"] = mod
    return mod


def uninstall() -> None:
    mod = sys.modules.get("axengine")
    if mod is not None and getattr(mod, "__fake__", False):
        del sys.modules["axengine"]


@contextlib.contextmanager
def installed():
    """Context manager: the fake axengine is importable inside, the previous state after."""
    previous = sys.modules.get("axengine")
    install()
    try:
        yield sys.modules["axengine"]
    finally:
        if previous is None:
            sys.modules.pop("axengine", None)
        else:
            sys.modules["axengine"] = previous


# --------------------------------------------------------------------------------------------
# host-layout dir -> fake Axera-layout dir


def _node(name, shape, dtype) -> dict:
    return {"name": name, "shape": [int(d) for d in shape],
            "dtype": "bfloat16" if np.dtype(dtype) == BF16 else np.dtype(dtype).name}


def _write_manifest(path: Path, onnx: Path, kind: str, groups: list) -> None:
    path.write_text(json.dumps({"format": FORMAT, "onnx": str(onnx.resolve()), "kind": kind,
                                "groups": groups}, indent=1), encoding="utf-8")


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
                        kv_cache_len: int = 2047, prefill_len: int = 128,
                        max_prefill: int = 1024, name: str = "InternVL3_5-1B_GPTQ_INT4",
                        hidden_dtype=BF16, prefill_dtype=None) -> Path:
    """Lay out a host (ONNX) model dir like the published AXERA-TECH download:
    `{name}/` (HF files), `{name}_axmodel/` (layers, post, embeddings), `vit-models/`.
    The `.axmodel` files are manifests that map back to the ONNX files. Layer I/O is
    `hidden_dtype` (bfloat16), or `prefill_dtype` in the prefill shape groups if given."""
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
