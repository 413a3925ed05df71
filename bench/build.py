"""Build (once) and cache the benchmark's model dirs under `<repo>/.cache/bench/`.

    python bench/build.py quick|full [--json OUT]

Stages, each cached under a key of its inputs (the source of the code that writes it, the
library versions and the settings), built in a temporary folder and renamed when complete:
- `hf`: a random-weight transformers checkpoint (`export.tiny.make_tiny_model`). `quick` reuses
  the test suite's tiny model "a"; `full` has the InternVL3.5-1B shape (28 layers, hidden 1024,
  16/8 heads, head_dim 128, intermediate 3072, vocab 151,936, untied lm_head; InternViT-300M:
  24 layers of 1024, MLP 4096, 16 heads);
- `onnx`: its float32 host export (`export.exporter.export_model`);
- `q8`, `q4`: weight-only int8 and int4 builds of that export (`export.quantize`);
- `host-q8`, `host-q4`: the host layout (one graph, GroupQueryAttention, KV cache kept in the
  session) with int8 / int4 MatMulNBits, exported straight from `hf`;
- `axera`: a fake Axera-layout dir over the int8 ONNX files (`backends.fake_axengine`), for the
  host overhead and the bytes fed on the NPU code path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE_DIR, PKG_ROOT, ensure_import_path, write_json

ensure_import_path()

EXPORT_SRC = PKG_ROOT / "internvl_ros" / "export"
BACKENDS_SRC = PKG_ROOT / "internvl_ros" / "backends"

FULL_SPEC = dict(seed=0, layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                 intermediate=3072, vision_layers=24, vision_hidden=1024, vocab_size=151936)
#: the quantised builds the benchmark measures (see docs/PERFORMANCE.md for the choice)
VARIANTS = {
    "q8": dict(bits=8, block_size=32, symmetric=True, accuracy_level=4, lm_head_bits=8),
    "q4": dict(bits=4, block_size=32, symmetric=True, accuracy_level=4, lm_head_bits=4),
}
#: the host layout (`internvl-export --layout host`): one graph, KV cache kept in the session;
#: int4 with block 128 (about 20% faster than block 32 here, and the group size of GPTQ INT4
#: checkpoints; see docs/PERFORMANCE.md for its accuracy on these random weights)
HOST_VARIANTS = {
    "host-q8": dict(bits=8, block_size=32, accuracy_level=4, lm_head_bits=8),
    "host-q4": dict(bits=4, block_size=128, accuracy_level=4, lm_head_bits=4),
}
DONE = "BUILD_OK"


def _key(*parts, files=()) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for dist in ("transformers", "tokenizers", "onnx", "onnxruntime", "numpy", "torch"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:12]


def _cached(root: Path, stage: str, key: str, build, log) -> tuple:
    """Return (path, seconds spent, cached?) of stage `stage`, building it with build(tmp)."""
    final = root / f"{stage}-{key}"
    if (final / DONE).is_file():
        return final, 0.0, True
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"  building {stage} -> {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-building-", dir=root))
    try:
        build(tmp)
        (tmp / DONE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, stage, final)
    return final, time.perf_counter() - t0, False


def _prune(root: Path, stage: str, keep: Path, min_idle_s: float = 120.0) -> None:
    """Drop other builds of the same stage (a full-size build is GBs); spare recent ones."""
    now = time.time()
    for p in list(root.glob(f"{stage}-*")) + list(root.glob(f".{stage}-building-*")):
        if p != keep and now - p.stat().st_mtime > min_idle_s:
            shutil.rmtree(p, ignore_errors=True)


def prepare(spec: str, log=print) -> dict:
    """Build or reuse every stage of `spec` ("quick" or "full"); return paths and timings."""
    from internvl_ros.backends import fake_axengine
    from internvl_ros.export.quantize import quantize_model_dir

    root = CACHE_DIR / spec
    times, cached = {}, {}
    if spec == "quick":
        from internvl_ros.export.testing import tiny_model_dirs

        t0 = time.perf_counter()
        hf, onnx_dir = tiny_model_dirs("a")
        times["hf+onnx"], cached["hf+onnx"] = time.perf_counter() - t0, None
        onnx_key = _key(str(onnx_dir))
    elif spec == "full":
        from internvl_ros.export.exporter import export_model
        from internvl_ros.export.tiny import make_tiny_model

        hf_key = _key(FULL_SPEC, files=[EXPORT_SRC / "tiny.py", EXPORT_SRC / "corpus.py"])

        def build_hf(tmp):
            make_tiny_model(tmp, **FULL_SPEC)

        hf, times["hf"], cached["hf"] = _cached(root, "hf", hf_key, build_hf, log)
        onnx_key = _key(hf_key, files=[EXPORT_SRC / n for n in
                                       ("exporter.py", "graphs.py", "checkpoint.py")])
        onnx_dir, times["onnx"], cached["onnx"] = _cached(
            root, "onnx", onnx_key, lambda tmp: export_model(hf, tmp), log)
    else:
        raise ValueError(f"unknown spec {spec!r}: use quick or full")

    out = {"spec": spec, "hf": str(hf), "onnx": str(onnx_dir)}
    keys = {}
    for name, settings in VARIANTS.items():
        keys[name] = _key(onnx_key, settings, files=[EXPORT_SRC / "quantize.py"])
        out[name], times[name], cached[name] = _cached(
            root, name, keys[name],
            lambda tmp, s=settings: quantize_model_dir(onnx_dir, tmp, link_files=True, **s),
            log)
    for name, settings in HOST_VARIANTS.items():
        key = _key(onnx_key, settings, files=[EXPORT_SRC / n for n in (
            "exporter.py", "graphs.py", "quantize.py", "checkpoint.py")])
        out[name], times[name], cached[name] = _cached(
            root, name, key, lambda tmp, s=settings: _export_host(hf, tmp, **s), log)
    ax_key = _key(keys["q8"], files=[BACKENDS_SRC / "fake_axengine.py"])
    out["axera"], times["axera"], cached["axera"] = _cached(
        root, "axera", ax_key,
        lambda tmp: fake_axengine.make_fake_axera_dir(out["q8"], tmp), log)
    out = {k: str(v) for k, v in out.items()}
    out.update({"build_s": times, "cached": cached, "variants": {**VARIANTS, **HOST_VARIANTS},
                "full_spec": FULL_SPEC if spec == "full" else None})
    return out


def _export_host(hf, out, bits: int, block_size: int, accuracy_level: int,
                 lm_head_bits: int) -> None:
    from internvl_ros.export.exporter import export_model
    from internvl_ros.export.quantize import QuantConfig

    export_model(hf, out, layout="host", quant=QuantConfig(bits, block_size, True,
                                                           accuracy_level),
                 lm_head_bits=lm_head_bits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", choices=("quick", "full"))
    ap.add_argument("--json", type=Path, default=None, help="write the paths here")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = prepare(args.spec)
    if args.json:
        write_json(args.json, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
