"""Opt-in int4 / int8 weight-only quantisation of an exported host model dir (onnxruntime).

    python -m internvl_ros.export.quantize IN_DIR OUT_DIR [--bits 4] [--block-size 32]
        [--asymmetric] [--lm-head-bits 4|8|0] [--accuracy-level 4] [--vit]

Every MatMul whose second input is a constant 2-D weight (K, N) becomes a `MatMulNBits`
(com.microsoft domain) node: round-to-nearest, one scale (and, asymmetric, one zero point) per
block of `block_size` rows of K, like the GPTQ INT4 weights of the NPU build but without
calibration. Activations, norms, RoPE, attention and the KV cache stay float32, and the model
contract (docs/MODEL_DIR.md) is unchanged, so the runtime loads OUT_DIR like any export.

The decoder layers are quantised; the post model (lm_head) with `lm_head_bits` (0 keeps it
float32); the ViT only with `--vit`. Other files (config, tokenizer, embeddings) are copied
from IN_DIR. The golden tests stay on the float32 export: this is an opt-in speed build for
CPUs (see docs/PERFORMANCE.md for measured decode speed and logit agreement with float32).

MatMulNBits layout (onnxruntime contrib op, bits b, k_blocks = ceil(K / block_size)):
- B (N, k_blocks, block_size * b / 8) uint8; for b = 4, row k of a block sits in byte k // 2,
  the low nibble for even k;
- scales (N * k_blocks,) float32;
- zero_points (N * ceil(k_blocks * b / 8),) uint8, packed like B; absent when symmetric, where
  onnxruntime uses 2^(b-1);
- dequantised W[k, n] = (q - zero_point) * scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from internvl_ros.core.errors import ConfigError, InternVLError, ModelDirError

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BITS = (4, 8)
INFO_FILE = "internvl_export.json"
_MAX_PROTO_BYTES = 1_900_000_000


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantisation settings (validated at construction)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    #: MatMulNBits accuracy_level: 0 = float compute, 4 = int8 activations (fastest on x86)
    accuracy_level: int = 4

    def __post_init__(self):
        if self.bits not in BITS:
            raise ConfigError(f"QuantConfig.bits={self.bits!r}: use one of {BITS}")
        if (not isinstance(self.block_size, int) or self.block_size < 16
                or self.block_size & (self.block_size - 1)):
            raise ConfigError(f"QuantConfig.block_size={self.block_size!r}: use a power of two "
                              ">= 16 (32 or 128 are usual)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"QuantConfig.accuracy_level={self.accuracy_level!r}: use 0..4")


@dataclass
class QuantizedWeight:
    """A (K, N) weight in MatMulNBits form."""

    packed: np.ndarray  # (N, k_blocks, block_size * bits / 8) uint8
    scales: np.ndarray  # (N, k_blocks) float32
    zero_points: np.ndarray | None  # (N, ceil(k_blocks * bits / 8)) uint8, None if symmetric
    K: int
    N: int
    bits: int
    block_size: int
    accuracy_level: int = 0
    #: act-order (GPTQ desc_act): row k of the packed weight multiplies input column perm[k]
    perm: np.ndarray | None = None  # (K,) int64

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def zero_points_or_default(self) -> np.ndarray:
        """The packed zero points, or the implicit symmetric ones (2^(b-1)) written out."""
        if self.zero_points is not None:
            return self.zero_points
        k_blocks = self.scales.shape[1]
        z = np.full((self.N, k_blocks), 1 << (self.bits - 1), np.uint8)
        return pack_zero_points(z, self.bits)


def pack_zero_points(z: np.ndarray, bits: int) -> np.ndarray:
    """(N, k_blocks) zero points in 0..2^b-1 -> MatMulNBits' (N, ceil(k_blocks * b / 8))."""
    z = np.asarray(z, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(z)
    if z.shape[1] % 2:
        z = np.concatenate([z, np.full((z.shape[0], 1), 1 << (bits - 1), np.uint8)], axis=1)
    return _pack_nibbles(z)


def fuse_quantized(weights: list) -> QuantizedWeight | None:
    """Stack QuantizedWeights that share K, bits, block size and input order along N (one
    MatMulNBits for q/k/v or gate/up); None when they cannot be fused."""
    first = weights[0]
    for w in weights[1:]:
        if (w.K, w.bits, w.block_size, w.accuracy_level) != \
                (first.K, first.bits, first.block_size, first.accuracy_level):
            return None
        if (w.perm is None) != (first.perm is None) or (
                w.perm is not None and not np.array_equal(w.perm, first.perm)):
            return None
    zp = None
    if any(w.zero_points is not None for w in weights):
        zp = np.concatenate([w.zero_points_or_default() for w in weights], axis=0)
    return QuantizedWeight(
        np.concatenate([w.packed for w in weights], axis=0),
        np.concatenate([w.scales for w in weights], axis=0), zp, first.K,
        sum(w.N for w in weights), first.bits, first.block_size, first.accuracy_level,
        first.perm)


def nbits_node(qw: QuantizedWeight, x: str, out: str, base: str) -> tuple:
    """A com.microsoft MatMulNBits node computing out = x @ W, and its initializers.

    Returns (nodes, initializers); an act-order weight gets a Gather of x's columns first."""
    nodes, inits = [], []
    if qw.perm is not None:
        inits.append(numpy_helper.from_array(np.asarray(qw.perm, np.int64), f"{base}_perm"))
        nodes.append(helper.make_node("Gather", [x, f"{base}_perm"], [f"{base}_x_perm"],
                                      axis=-1))
        x = f"{base}_x_perm"
    inputs = [x, f"{base}_Q{qw.bits}", f"{base}_scales"]
    inits += [numpy_helper.from_array(qw.packed, inputs[1]),
              numpy_helper.from_array(qw.scales.reshape(-1), inputs[2])]
    if qw.zero_points is not None:
        inputs.append(f"{base}_zero_points")
        inits.append(numpy_helper.from_array(qw.zero_points.reshape(-1), inputs[3]))
    attrs = dict(K=qw.K, N=qw.N, bits=qw.bits, block_size=qw.block_size)
    if qw.accuracy_level:
        attrs["accuracy_level"] = qw.accuracy_level
    nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=f"{base}_MatMulNBits",
                                  domain=MS_DOMAIN, **attrs))
    return nodes, inits


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 2m) values in 0..15 -> (..., m) bytes, even index in the low nibble."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of _pack_nibbles: (..., m) bytes -> (..., 2m) values in 0..15."""
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = b & 0x0F
    out[..., 1::2] = b >> 4
    return out


def quantize_blockwise(weight: np.ndarray, config: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest block quantisation of a (K, N) float weight along K."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ConfigError(f"quantize_blockwise needs a 2-D (K, N) weight, got {weight.shape}")
    K, N = weight.shape
    bs, bits = config.block_size, config.bits
    k_blocks = -(-K // bs)
    w = np.zeros((N, k_blocks * bs), dtype=np.float32)  # (N, K padded): one row per column
    w[:, :K] = weight.T
    w = w.reshape(N, k_blocks, bs)  # (N, k_blocks, bs)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if config.symmetric:
        # the value of largest magnitude maps to -2^(b-1): one more level than +-(2^(b-1) - 1)
        idx = np.abs(w).argmax(axis=-1)[..., None]  # (N, k_blocks, 1)
        extreme = np.take_along_axis(w, idx, axis=-1)  # (N, k_blocks, 1)
        scale = extreme / -mid
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(w / safe) + mid, 0, qmax)  # (N, k_blocks, bs)
        zero = None
    else:
        lo = np.minimum(w.min(axis=-1, keepdims=True), 0.0)  # (N, k_blocks, 1)
        hi = np.maximum(w.max(axis=-1, keepdims=True), 0.0)
        scale = (hi - lo) / qmax
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.rint(-lo / safe), 0, qmax)  # (N, k_blocks, 1)
        q = np.clip(np.rint(w / safe) + zero, 0, qmax)
    q = q.astype(np.uint8)
    scales = scale[..., 0].astype(np.float32)  # (N, k_blocks)
    if bits == 4:
        packed = _pack_nibbles(q)  # (N, k_blocks, bs / 2)
    else:
        packed = q  # (N, k_blocks, bs)
    zp = None if zero is None else pack_zero_points(zero[..., 0], bits)
    return QuantizedWeight(np.ascontiguousarray(packed), np.ascontiguousarray(scales),
                           None if zp is None else np.ascontiguousarray(zp), K, N, bits, bs,
                           config.accuracy_level)


def dequantize_blockwise(qw: QuantizedWeight) -> np.ndarray:
    """The (K, N) float32 weight that MatMulNBits computes with."""
    mid = 1 << (qw.bits - 1)
    q = _unpack_nibbles(qw.packed) if qw.bits == 4 else qw.packed  # (N, k_blocks, bs)
    q = q.astype(np.float32)
    k_blocks = q.shape[1]
    if qw.zero_points is None:
        zero = np.full((qw.N, k_blocks), mid, np.float32)
    elif qw.bits == 4:
        zero = _unpack_nibbles(qw.zero_points)[:, :k_blocks].astype(np.float32)
    else:
        zero = qw.zero_points.astype(np.float32)
    w = (q - zero[..., None]) * qw.scales[..., None]  # (N, k_blocks, bs)
    w = w.reshape(qw.N, -1)[:, :qw.K].T  # (K, N), row k for input column perm[k]
    if qw.perm is not None:
        out = np.empty_like(w)
        out[qw.perm] = w
        w = out
    return np.ascontiguousarray(w)  # (K, N) in input-column order


def quantize_graph(model: onnx.ModelProto, config: QuantConfig,
                   head_config: QuantConfig | None | str = "same") -> dict:
    """Replace MatMul(x, const W (K, N)) by MatMulNBits in place; return counts and bytes.

    `head_config` applies to the lm_head weight of a host-layout graph (None keeps it float;
    "same" uses `config`)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    stats = {"quantized": 0, "kept": 0, "float_bytes": 0, "quant_bytes": 0}
    new_nodes, dropped = [], set()
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or users.get(node.input[1], 0) != 1:
            if node.op_type == "MatMul":
                stats["kept"] += 1
            new_nodes.append(node)
            continue
        cfg = config
        if head_config != "same" and weight.name.startswith("lm_head."):
            cfg = head_config
        if cfg is None:
            stats["kept"] += 1
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)  # (K, N)
        qw = quantize_blockwise(w, cfg)
        base = weight.name
        nodes, tensors = nbits_node(qw, node.input[0], node.output[0], base)
        graph.initializer.extend(tensors)
        new_nodes.extend(nodes)
        dropped.add(base)
        stats["quantized"] += 1
        stats["float_bytes"] += w.nbytes
        stats["quant_bytes"] += qw.nbytes
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if dropped:
        keep = [t for t in graph.initializer if t.name not in dropped]
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stats


def _save(model: onnx.ModelProto, path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()
    if sum(t.ByteSize() for t in model.graph.initializer) > _MAX_PROTO_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if dst.exists():
        dst.unlink()
    if link:  # only safe when nothing rewrites `src` in place later (np.save does)
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _quantize_file(src: Path, dst: Path, config: QuantConfig, head_config="same") -> dict:
    model = onnx.load(str(src))  # loads external data too
    stats = quantize_graph(model, config, head_config)
    _save(model, dst)
    return stats


def quantize_model_dir(in_dir, out_dir, bits: int = 4, block_size: int = 32,
                       symmetric: bool = True, accuracy_level: int = 4,
                       lm_head_bits: int | None = None, vit: bool = False,
                       link_files: bool = False) -> Path:
    """Write a weight-only quantised copy of the host model dir `in_dir` into `out_dir`.

    Decoder layers use `bits`; the post model (lm_head) uses `lm_head_bits` (default: `bits`;
    0 keeps it float32); the ViT is quantised only when `vit` is true. The other files are
    copied (hard-linked with `link_files`, which saves disk but shares the inode with `in_dir`).
    Returns `out_dir`.
    """
    from internvl_ros.core.modeldir import discover

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ModelDirError(f"{in_dir} is not a directory; pass an exported host model dir "
                            "(internvl-export --output DIR)")
    if in_dir.resolve() == out_dir.resolve():
        raise ConfigError("OUT_DIR must differ from IN_DIR (the float export is kept)")
    layer_cfg = QuantConfig(bits, block_size, symmetric, accuracy_level)
    head_bits = bits if lm_head_bits is None else lm_head_bits
    head_cfg = QuantConfig(head_bits, block_size, symmetric, accuracy_level) if head_bits else None
    paths = discover(in_dir, "onnxruntime")
    if any(p.parent != in_dir for p in [*paths.layers, paths.post]):
        raise ModelDirError(f"{in_dir}: expected the flat host layout of internvl-export "
                            "(layers and post in the folder itself)")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    totals = {"quantized": 0, "kept": 0, "float_bytes": 0, "quant_bytes": 0}

    def add(stats):
        for k in totals:
            totals[k] += stats[k]

    done = set()
    if paths.layout == "host":  # one graph: the layers with `bits`, its lm_head with head_cfg
        add(_quantize_file(paths.host_lm, out_dir / paths.host_lm.name, layer_cfg, head_cfg))
        done.add(paths.host_lm.name)
    for i, layer in enumerate(paths.layers):
        add(_quantize_file(layer, out_dir / layer.name, layer_cfg))
        done.add(layer.name)
        log.info("layer %d/%d quantised (%.1f s)", i + 1, len(paths.layers),
                 time.monotonic() - t0)
    if head_cfg is not None and paths.layout == "split":
        add(_quantize_file(paths.post, out_dir / paths.post.name, head_cfg))
        done.add(paths.post.name)
    if vit and paths.vit is not None:
        add(_quantize_file(paths.vit, out_dir / paths.vit.name, layer_cfg))
        done.add(paths.vit.name)
    for f in sorted(in_dir.iterdir()):
        if f.is_file() and f.name not in done and f.name != INFO_FILE \
                and f.name.removesuffix(".data") not in done:
            _link_or_copy(f, out_dir / f.name, link_files)

    info_path = in_dir / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["quantization"] = {
        "method": "rtn_weight_only", "op": "com.microsoft.MatMulNBits", "bits": bits,
        "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
        "lm_head_bits": head_bits, "vit": bool(vit), "source": str(in_dir),
        **totals,
    }
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("quantised %d MatMuls (%.0f MB -> %.0f MB) in %.1f s", totals["quantized"],
             totals["float_bytes"] / 1e6, totals["quant_bytes"] / 1e6, time.monotonic() - t0)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m internvl_ros.export.quantize IN_DIR OUT_DIR [options]."""
    ap = argparse.ArgumentParser(
        prog="python -m internvl_ros.export.quantize",
        description="Weight-only int4/int8 quantisation (onnxruntime MatMulNBits) of an "
                    "exported host model dir. The float export stays the reference.")
    ap.add_argument("in_dir", type=Path, help="exported float model dir (internvl-export)")
    ap.add_argument("out_dir", type=Path, help="output model dir")
    ap.add_argument("--bits", type=int, choices=BITS, default=4)
    ap.add_argument("--block-size", type=int, default=32,
                    help="rows of K per scale (power of two >= 16; default 32)")
    ap.add_argument("--asymmetric", action="store_true",
                    help="use a zero point per block (default: symmetric)")
    ap.add_argument("--lm-head-bits", type=int, choices=(0, *BITS), default=None,
                    help="bits of the post model's lm_head (default: --bits; 0 keeps float32)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits compute type: 4 = int8 activations (fastest on x86), "
                         "0 = float")
    ap.add_argument("--vit", action="store_true", help="quantise the ViT too (default: float)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    try:
        out = quantize_model_dir(args.in_dir, args.out_dir, bits=args.bits,
                                 block_size=args.block_size, symmetric=not args.asymmetric,
                                 accuracy_level=args.accuracy_level,
                                 lm_head_bits=args.lm_head_bits, vit=args.vit)
    except InternVLError as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
