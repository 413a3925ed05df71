"""Export an InternVL (Qwen3) checkpoint to the host model directory of docs/MODEL_DIR.md.

    internvl-export --hf-model DIR --output DIR [--dtype float32|bfloat16]

Torch-free: weights are read with numpy from the safetensors files and the ONNX graphs are built
with `onnx.helper` (see `graphs.py`). Works for the native transformers layout and for the
remote-code layout of the published checkpoints (`checkpoint.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from internvl_ros.core.errors import ConfigError, InternVLError, ModelDirError
from internvl_ros.export.checkpoint import ModelSpec, Weights, read_spec
from internvl_ros.export.gptq import GPTQConfig, gptq_linear, read_gptq_config
from internvl_ros.export.graphs import OPSET, build_host_lm, build_layer, build_post, build_vit
from internvl_ros.export.quantize import QuantConfig, quantize_blockwise

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("split", "host")  # split: per-layer files (the Axera contract); host: one graph
DEFAULT_MAX_POSITIONS = 4096  # rows of the host graph's RoPE tables: its longest context
EMBED_FILE = "model.embed_tokens.weight.npy"
INFO_FILE = "internvl_export.json"
COPY_FILES = (  # copied verbatim when present in the checkpoint folder
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "added_tokens.json", "preprocessor_config.json",
)
_MAX_PROTO_BYTES = 1_900_000_000  # protobuf limit is 2 GiB; above this use external data

_LAYER_TENSORS = (  # per decoder layer, after "lm.layers.{i}."; optional biases checked later
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_LAYER_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                 "self_attn.o_proj.bias")


DEFAULT_PREFIX = "qwen3"


def layer_file(i: int, prefix: str = DEFAULT_PREFIX) -> str:
    """File name of decoder layer `i` in the host layout."""
    return f"{prefix}_p128_l{i}_together.onnx"


def post_file(prefix: str = DEFAULT_PREFIX) -> str:
    """File name of the final norm + lm_head model."""
    return f"{prefix}_post.onnx"


def host_lm_file(prefix: str = DEFAULT_PREFIX) -> str:
    """File name of the host layout's language model (all layers + norm + lm_head)."""
    return f"{prefix}_host_lm.onnx"


def vit_file(image_size: int = 448) -> str:
    """File name of the ViT + projector model."""
    return f"internvl_vit_model_1x3x{image_size}x{image_size}.onnx"


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); result stays float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    size = sum(t.ByteSize() for t in model.graph.initializer)  # no copy of the raw data
    if path.exists():
        path.unlink()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if size > _MAX_PROTO_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")


def _quantizer(config: QuantConfig | None):
    """torch-layout (out, in) float weight -> QuantizedWeight (identity without a config)."""
    if config is None:
        return lambda w: w
    return lambda w: quantize_blockwise(np.ascontiguousarray(w.T), config)


def _layer_weights(weights: Weights, spec: ModelSpec, i: int, cast,
                   gptq: GPTQConfig | None = None, accuracy_level: int = 4) -> dict:
    """Layer i's tensors; with `gptq`, its packed linears as QuantizedWeights."""
    shapes = _layer_shapes(spec.text)
    packed = {n for n in _LINEARS
              if gptq is not None and f"lm.layers.{i}.{n[:-len('weight')]}qweight" in weights}
    w = {n: cast(weights.get(f"lm.layers.{i}.{n}", shapes[n]))
         for n in _LAYER_TENSORS if n not in packed}
    for n in packed:
        w[n] = _gptq_weight(weights, f"lm.layers.{i}.{n[:-len('.weight')]}", shapes[n], gptq,
                            accuracy_level)
    for n in _LAYER_BIASES:
        b = weights.get_optional(f"lm.layers.{i}.{n}", shapes[n])
        if b is not None:
            w[n] = cast(b)
    return w


def _gptq_weight(weights: Weights, base: str, shape: tuple, gptq: GPTQConfig,
                 accuracy_level: int):
    """The GPTQ-packed linear `base` ((N, K) = shape in torch layout) for MatMulNBits."""
    N, K = shape
    g_idx = f"{base}.g_idx"
    return gptq_linear(weights.get_raw(f"{base}.qweight"), weights.get_raw(f"{base}.qzeros"),
                       weights.get_raw(f"{base}.scales"),
                       weights.get_raw(g_idx) if g_idx in weights else None, gptq, K, N,
                       accuracy_level, name=base)


def _layer_shapes(t) -> dict:
    return {
        "input_layernorm.weight": (t.hidden,),
        "post_attention_layernorm.weight": (t.hidden,),
        "self_attn.q_proj.weight": (t.heads * t.head_dim, t.hidden),
        "self_attn.k_proj.weight": (t.kv_dim, t.hidden),
        "self_attn.v_proj.weight": (t.kv_dim, t.hidden),
        "self_attn.o_proj.weight": (t.hidden, t.heads * t.head_dim),
        "self_attn.q_norm.weight": (t.head_dim,),
        "self_attn.k_norm.weight": (t.head_dim,),
        "mlp.gate_proj.weight": (t.intermediate, t.hidden),
        "mlp.up_proj.weight": (t.intermediate, t.hidden),
        "mlp.down_proj.weight": (t.hidden, t.intermediate),
        "self_attn.q_proj.bias": (t.heads * t.head_dim,),
        "self_attn.k_proj.bias": (t.kv_dim,),
        "self_attn.v_proj.bias": (t.kv_dim,),
        "self_attn.o_proj.bias": (t.hidden,),
    }


class _LazyCast(Mapping):
    """Read-on-access view of some checkpoint tensors (keeps the ViT export's memory low)."""

    def __init__(self, weights: Weights, names: list[str], cast):
        self._weights, self._names, self._cast = weights, set(names), cast

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._cast(self._weights.get(name))

    def __iter__(self):
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def _vit_weights(weights: Weights, spec: ModelSpec, cast) -> Mapping[str, np.ndarray]:
    v, C = spec.vision, spec.vision.hidden
    keep = [n for n in weights.names() if n.startswith(("vit.", "proj."))]
    keep = [n for n in keep if not n.startswith("vit.encoder.layer.")
            or int(n.split(".")[3]) < v.num_layers]
    expected = {
        "vit.embeddings.patch_embeddings.projection.weight": (C, 3, v.patch_size, v.patch_size),
        "vit.embeddings.cls_token": (1, 1, C),
        "vit.embeddings.position_embeddings": (1, v.grid * v.grid + 1, C),
        "proj.layer_norm.weight": (4 * C,),
        "proj.linear_1.weight": (spec.text.hidden, 4 * C),
        "proj.linear_2.weight": (spec.text.hidden, spec.text.hidden),
    }
    for i in range(v.num_layers):
        p = f"vit.encoder.layer.{i}"
        expected.update({
            f"{p}.attention.q_proj.weight": (C, C), f"{p}.attention.k_proj.weight": (C, C),
            f"{p}.attention.v_proj.weight": (C, C),
            f"{p}.attention.projection_layer.weight": (C, C),
            f"{p}.mlp.fc1.weight": (v.intermediate, C), f"{p}.mlp.fc2.weight": (C, v.intermediate),
        })
    for name, shape in expected.items():
        got = weights.shape(name)
        if got is None:
            raise ModelDirError(f"{weights.model_dir}: vision weight '{name}' is missing.")
        if tuple(got) != shape:
            raise ModelDirError(
                f"{weights.model_dir}: vision weight '{name}' has shape {tuple(got)}, "
                f"expected {shape} from config.json (image_size {v.image_size}, patch "
                f"{v.patch_size}). Position-embedding interpolation is not supported."
            )
    return _LazyCast(weights, keep, cast)


def _copy_side_files(hf_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in COPY_FILES:
        src = hf_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    if "tokenizer.json" not in copied and _write_tokenizer_json(hf_dir, out_dir):
        copied.append("tokenizer.json (converted)")
    return copied


def _write_tokenizer_json(hf_dir: Path, out_dir: Path) -> bool:
    """Checkpoints with only vocab.json/merges.txt: let transformers write tokenizer.json."""
    try:
        import tempfile

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            shutil.copyfile(Path(tmp) / "tokenizer.json", out_dir / "tokenizer.json")
        log.info("wrote tokenizer.json converted from the tokenizer files of %s", hf_dir)
        return True
    except Exception as e:  # any failure leaves a clear warning instead
        log.warning("%s has no tokenizer.json and converting its tokenizer failed (%s). The "
                    "runtime needs tokenizer.json: save one with transformers' "
                    "AutoTokenizer.from_pretrained(...).save_pretrained(...).", hf_dir, e)
        return False


def export_model(hf_dir, out_dir, dtype: str = "float32",
                 prefix: str = DEFAULT_PREFIX, layout: str = "split",
                 quant: QuantConfig | None = None, lm_head_bits: int | None = None,
                 max_positions: int = DEFAULT_MAX_POSITIONS, accuracy_level: int = 4) -> Path:
    """Export `hf_dir` (InternVL + Qwen3, native or remote-code layout) into `out_dir`.

    Writes the language model as `{prefix}_p128_l{i}_together.onnx` + `{prefix}_post.onnx`
    (`layout="split"`, the Axera contract) or as one `{prefix}_host_lm.onnx` (`layout="host"`,
    onnxruntime only, `max_positions` tokens of context), then
    `internvl_vit_model_1x3x448x448.onnx`, `model.embed_tokens.weight.npy` (float32), copies of
    the config/tokenizer files and `internvl_export.json`. `dtype="bfloat16"` rounds every weight
    to bfloat16 (stored as float32, I/O stays float32). `quant` writes the decoder linears as
    MatMulNBits (round-to-nearest), the lm_head with `lm_head_bits` (default: quant.bits; 0 =
    float). A GPTQ-packed checkpoint (quantization_config in config.json) keeps its packed
    linears as MatMulNBits with `accuracy_level` (export/gptq.py); its float tensors (norms,
    embeddings, ViT, an unquantised lm_head) are read as usual. Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype '{dtype}' is not one of {DTYPES}.")
    if layout not in LAYOUTS:
        raise ConfigError(f"export layout '{layout}' is not one of {LAYOUTS}.")
    head_bits = lm_head_bits if lm_head_bits is not None else (quant.bits if quant else 0)
    head_quant = None
    if head_bits:
        head_quant = (QuantConfig(head_bits, quant.block_size, quant.symmetric,
                                  quant.accuracy_level) if quant is not None
                      else QuantConfig(head_bits, 32, True, accuracy_level))
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ModelDirError(f"--hf-model {hf_dir} is not a directory.")
    cast = round_bf16 if dtype == "bfloat16" else (lambda a: a)
    t0 = time.monotonic()
    spec = read_spec(hf_dir)
    weights = Weights(hf_dir)
    gptq = read_gptq_config(hf_dir)
    if gptq is not None and quant is not None:
        raise ConfigError(f"{hf_dir} is a GPTQ-packed checkpoint ({gptq.bits}-bit): its "
                          "weights are already quantised, so drop --bits (use --lm-head-bits "
                          "for a float lm_head)")
    if gptq is not None and any(n.startswith("vit.") and n.endswith(".qweight")
                                for n in weights.names()):
        raise ModelDirError(f"{hf_dir}: the vision tower is GPTQ-packed; only the language "
                            "model's linears may be (the ViT must stay float)")
    t = spec.text
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (%s layout, %d layers, hidden %d, vocab %d) as %s to %s",
             hf_dir, spec.layout, t.num_layers, t.hidden, t.vocab, dtype, out_dir)

    embed = cast(weights.get("lm.embed_tokens.weight", (t.vocab, t.hidden)))  # (vocab, hidden)
    np.save(out_dir / EMBED_FILE, embed)
    del embed

    for stale in out_dir.glob(f"{prefix}_p128_l*_together.onnx*"):  # from a bigger model
        index = stale.name[len(f"{prefix}_p128_l"):].split("_", 1)[0]
        if layout == "host" or (index.isdigit() and int(index) >= t.num_layers):
            stale.unlink()
    other = host_lm_file(prefix) if layout == "split" else post_file(prefix)
    for stale in (out_dir / other, out_dir / f"{other}.data"):  # the other layout's file
        if stale.exists():
            stale.unlink()
    to_q = _quantizer(quant)

    def layer(i: int) -> dict:
        w = _layer_weights(weights, spec, i, cast, gptq, accuracy_level)
        w.update({n: to_q(w[n]) for n in _LINEARS if isinstance(w[n], np.ndarray)})
        log.info("layer %d/%d read (%.1f s)", i + 1, t.num_layers, time.monotonic() - t0)
        return w

    head = "lm_head.weight" if "lm_head.weight" in weights else "lm.embed_tokens.weight"  # tied

    def head_weight():
        if gptq is not None and "lm_head.qweight" in weights:
            return _gptq_weight(weights, "lm_head", (t.vocab, t.hidden), gptq, accuracy_level)
        return _quantizer(head_quant)(cast(weights.get(head, (t.vocab, t.hidden))))

    norm = cast(weights.get("lm.norm.weight", (t.hidden,)))
    if layout == "host":
        lm_head = head_weight()
        model = build_host_lm(t, layer, norm, lm_head, max_positions)
        del lm_head
        _save_onnx(model, out_dir / host_lm_file(prefix))
        del model
    else:
        for i in range(t.num_layers):
            _save_onnx(build_layer(t, layer(i), i), out_dir / layer_file(i, prefix))
        lm_head = head_weight()
        _save_onnx(build_post(t, norm, lm_head), out_dir / post_file(prefix))
        del lm_head

    vit = build_vit(spec.vision, t.hidden, _vit_weights(weights, spec, cast))
    _save_onnx(vit, out_dir / vit_file(spec.vision.image_size))

    copied = _copy_side_files(hf_dir, out_dir)
    info = {
        "format": "internvl_ros.host_onnx",
        "version": 1,
        "dtype": dtype,
        "source_layout": spec.layout,
        "layout": layout,
        "prefix": prefix,
        "opset": OPSET,
        "num_layers": t.num_layers,
        "hidden_size": t.hidden,
        "kv_dim": t.kv_dim,
        "vocab_size": t.vocab,
        "image_size": spec.vision.image_size,
        "image_tokens": spec.vision.num_tokens,
        "copied_files": copied,
    }
    if layout == "host":
        info["max_positions"] = max_positions
    if gptq is not None:
        info["quantization"] = {"method": "gptq", "op": "com.microsoft.MatMulNBits",
                                "accuracy_level": accuracy_level, **gptq.__dict__,
                                "lm_head_bits": head_bits}
    elif quant is not None:
        info["quantization"] = {
            "method": "rtn_weight_only", "op": "com.microsoft.MatMulNBits", "bits": quant.bits,
            "block_size": quant.block_size, "symmetric": quant.symmetric,
            "accuracy_level": quant.accuracy_level,
            "lm_head_bits": head_quant.bits if head_quant else 0}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("export finished in %.1f s", time.monotonic() - t0)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: internvl-export --hf-model DIR --output DIR [--dtype float32|bfloat16]."""
    ap = argparse.ArgumentParser(
        prog="internvl-export",
        description="Export an InternVL3.5 (Qwen3) checkpoint to per-layer ONNX files for the "
                    "onnxruntime backend (layout: docs/MODEL_DIR.md).")
    ap.add_argument("--hf-model", required=True, type=Path,
                    help="transformers checkpoint folder (native or remote-code layout)")
    ap.add_argument("--output", required=True, type=Path, help="output model directory")
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="bfloat16 rounds the weights to bf16 (files and I/O stay float32)")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX,
                    help=f"layer file prefix (default: {DEFAULT_PREFIX})")
    ap.add_argument("--layout", choices=LAYOUTS, default="split",
                    help="split: one file per decoder layer + post (the Axera contract, any "
                         "backend); host: the whole language model in one onnxruntime graph "
                         "with an in-place KV cache (fastest on CPUs)")
    ap.add_argument("--bits", type=int, choices=(0, 4, 8), default=0,
                    help="write the decoder linears as int4/int8 MatMulNBits (round-to-nearest; "
                         "0 = float, the default)")
    ap.add_argument("--block-size", type=int, default=32, help="rows of K per scale (--bits)")
    ap.add_argument("--lm-head-bits", type=int, choices=(0, 4, 8), default=None,
                    help="bits of the lm_head (default: --bits; 0 keeps it float)")
    ap.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                    help="MatMulNBits compute type (4 = int8 activations, fastest on x86)")
    ap.add_argument("--max-positions", type=int, default=DEFAULT_MAX_POSITIONS,
                    help="--layout host: longest context (rows of the RoPE tables)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    try:
        quant = (QuantConfig(args.bits, args.block_size, True, args.accuracy_level)
                 if args.bits else None)
        out = export_model(args.hf_model, args.output, dtype=args.dtype, prefix=args.prefix,
                           layout=args.layout, quant=quant, lm_head_bits=args.lm_head_bits,
                           max_positions=args.max_positions)
    except InternVLError as e:
        print(f"internvl-export: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
